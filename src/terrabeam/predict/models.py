"""Model handlers for Beam's RunInference, and the probe that checks a model fits the config.

The ONNX handler is Beam's own ``OnnxModelHandlerNumpy``; terrabeam adds thread settings (so
several local workers do not oversubscribe the cores) and batching by whole patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

from terrabeam.config import ModelConfig
from terrabeam.errors import ModelError


class OnnxPatchModelHandler(OnnxModelHandlerNumpy):
    """Beam's ONNX handler, batching ``batch_size`` patches (C, H, W) per call, with set thread counts."""

    def __init__(self, model_uri: str, batch_size: int, threads: int = 0) -> None:
        super().__init__(
            model_uri,
            providers=ort.get_available_providers(),
            min_batch_size=1,
            max_batch_size=batch_size,
        )
        self._threads = threads

    def load_model(self) -> ort.InferenceSession:
        # SessionOptions cannot be pickled, so they are built here, on the worker.
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        self._session_options = options
        return super().load_model()


@dataclass(frozen=True)
class ModelSignature:
    """What the model accepts and returns, read from the model and one probe call."""

    channels: int
    height: int | None
    width: int | None
    classes: int


def _declared_dims(value_info) -> list[int | None]:
    """Dims of an ONNX graph input/output; None where symbolic (e.g. "batch_size")."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _load_graph(path: str) -> onnx.GraphProto:
    try:
        return onnx.load(path, load_external_data=False).graph
    except FileNotFoundError:
        raise ModelError(f"model.path: ONNX model not found: {path}") from None
    except Exception as exc:  # onnx raises DecodeError and others for files that are not models
        raise ModelError(f"model.path: cannot read ONNX model {path}: {exc}") from None


def probe_model(config: ModelConfig, model_path: str, patch_shape: tuple[int, int]) -> ModelSignature:
    """Check the model's declared shapes, then run it once on one patch of ``patch_shape`` (H, W).

    Mismatches fail naming both sides. The probe session skips graph optimisation, which costs more
    than the single call it serves.
    """
    graph = _load_graph(model_path)
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ModelError(f"{model_path}: expects {len(inputs)} inputs; terrabeam feeds one (N, C, H, W)")
    shape = _declared_dims(inputs[0])
    if len(shape) != 4:
        raise ModelError(f"{model_path}: input {inputs[0].name} has shape {shape}; expected (N, C, H, W)")
    _, channels, height, width = shape
    bands = len(config.input_bands)
    if channels is not None and channels != bands:
        raise ModelError(
            f"{model_path}: model expects {channels} input channels but model.input_bands gives "
            f"{bands} {config.input_bands}"
        )
    h, w = patch_shape
    if (height is not None and height != h) or (width is not None and width != w):
        raise ModelError(
            f"{model_path}: model expects patches of {height}×{width} (H×W) but the grid gives "
            f"{h}×{w} (patch_size + kernel_size); change grid.patch_size or grid.kernel_size"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    probe = np.zeros((1, bands, h, w), dtype=np.float32)
    try:
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        output = session.run(None, {inputs[0].name: probe})[0]
    except Exception as exc:  # ORT raises its own exception types
        raise ModelError(f"{model_path}: failed on a {probe.shape} probe input: {exc}") from None
    if output.ndim != 4 or output.shape[2:] != (h, w):
        raise ModelError(
            f"{model_path}: output shape {output.shape} for input {probe.shape}; expected "
            f"(N, classes, {h}, {w})"
        )
    if output.shape[1] != len(config.classes):
        raise ModelError(
            f"{model_path}: model returns {output.shape[1]} classes but model.classes lists "
            f"{len(config.classes)} {config.classes}"
        )
    return ModelSignature(bands, height, width, int(output.shape[1]))
