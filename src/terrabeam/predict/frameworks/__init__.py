"""Model engines behind one protocol: ``load(path, task, runtime) → predict(array) → array``.

One module per engine (engines.py decides which). per_patch models get (N, C, H, W) or (N, H, W, C)
float32 and return the same layout with outputs for bands; per_pixel models get (pixels, bands)
and return (pixels, outputs). ``task`` is "classification" or "regression" (scikit-learn picks
predict_proba or predict by it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import numpy as np

from terrabeam.errors import ModelError
from terrabeam.predict.engines import Runtime

Predictor = Callable[[np.ndarray], np.ndarray]

MODULES = {
    "onnxruntime": "onnx_model",
    "openvino": "openvino_model",
    "tensorflow": "tensorflow_model",
    "torch": "torch_model",
    "sklearn": "sklearn_model",
    "lightgbm": "lightgbm_model",
}


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"the {extra} engine needs the '{module}' package ({exc}); "
            f"install it with: pip install 'terrabeam[{extra}]'"
        ) from None


def load_predictor(framework: str, path: str, task: str, runtime: Runtime) -> Predictor:
    """Load the model at ``path`` on the runtime's engine; errors name the file. On a GPU, short
    batches are padded to the batch size (one shape: no re-planning by CUDA / TensorRT engines)."""
    adapter = importlib.import_module(f"terrabeam.predict.frameworks.{MODULES[runtime.engine]}")
    try:
        predictor = adapter.load(path, task, runtime)
    except ModelError:
        raise
    except FileNotFoundError:
        raise ModelError(f"model.path: model not found: {path}") from None
    except Exception as exc:  # each framework raises its own types for unreadable models
        raise ModelError(
            f"model.path: cannot load {framework} model {path} on {runtime.engine}: {exc}"
        ) from None
    return padded(predictor, runtime.batch_size) if runtime.batch_size > 1 else predictor


def padded(predictor: Predictor, batch_size: int) -> Predictor:
    """``predictor`` fed batches of exactly ``batch_size`` patches: a short one is filled with zero
    patches, whose outputs are dropped."""

    def predict(batch: np.ndarray) -> np.ndarray:
        short = batch_size - batch.shape[0]
        if short <= 0:
            return predictor(batch)
        filler = np.zeros((short, *batch.shape[1:]), dtype=batch.dtype)
        return np.asarray(predictor(np.concatenate([batch, filler])))[: batch.shape[0]]

    return predict
