"""Model frameworks behind one protocol: ``load(path, threads, task) → predict(array) → array``.

One module per framework. per_patch models get (N, C, H, W) or (N, H, W, C) float32 and return the
same layout with outputs for bands; per_pixel models get (pixels, bands) and return (pixels, outputs).
``task`` is "classification" or "regression" (scikit-learn picks predict_proba or predict by it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import numpy as np

from terrabeam.errors import ModelError

Predictor = Callable[[np.ndarray], np.ndarray]

MODULES = {
    "onnx": "onnx_model",
    "tensorflow": "tensorflow_model",
    "torch": "torch_model",
    "sklearn": "sklearn_model",
    "lightgbm": "lightgbm_model",
}


def require(module: str, framework: str) -> ModuleType:
    """Import an optional framework, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"model.framework = {framework} needs the '{module}' package ({exc}); "
            f"install it with: pip install 'terrabeam[{framework}]'"
        ) from None


def load_predictor(framework: str, path: str, threads: int, task: str) -> Predictor:
    """Load the model at ``path`` with its framework; errors name the file."""
    adapter = importlib.import_module(f"terrabeam.predict.frameworks.{MODULES[framework]}")
    try:
        return adapter.load(path, threads, task)
    except ModelError:
        raise
    except FileNotFoundError:
        raise ModelError(f"model.path: model not found: {path}") from None
    except Exception as exc:  # each framework raises its own types for unreadable models
        raise ModelError(f"model.path: cannot load {framework} model {path}: {exc}") from None
