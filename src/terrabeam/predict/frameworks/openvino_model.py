"""ONNX, TensorFlow and PyTorch models through OpenVINO on the CPU: at fp32, or with bf16 inference
precision on CPUs with AMX / AVX512-BF16 (the U-Net ≈ 2.5× ONNX Runtime's fp32 speed here; the TF
and PyTorch models measured faster than their own frameworks' CPU paths: BENCHMARKS.md). A
SavedModel folder, a Keras file (exported to a SavedModel first), a TorchScript (.pt, .pth) or a
torch.export (.pt2) file is converted in memory when it loads (``openvino.convert_model``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from terrabeam.predict.engines import Runtime
from terrabeam.predict.frameworks import Predictor, require


def compile_options(runtime: Runtime) -> dict[str, str]:
    """OpenVINO CPU plugin properties: the inference precision (OpenVINO picks bf16 by itself on
    AMX CPUs unless told; terrabeam always says which), latency mode, threads."""
    options = {
        "INFERENCE_PRECISION_HINT": "bf16" if runtime.precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
    }
    if runtime.threads:
        options["INFERENCE_NUM_THREADS"] = str(runtime.threads)
    return options


def load(path: str, task: str, runtime: Runtime) -> Predictor:
    ov = require("openvino", "openvino")
    if path.endswith((".pt", ".pth", ".pt2")):
        model = _torch_model(ov, path)
    elif path.endswith((".keras", ".h5")) or Path(path).is_dir():
        model = _tensorflow_model(ov, path)
    else:
        model = path  # ONNX (or OpenVINO IR): read by OpenVINO itself
    compiled = ov.Core().compile_model(model, "CPU", compile_options(runtime))
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def predict(batch: np.ndarray) -> np.ndarray:
        # the request reuses its output buffer: copy before the next call
        return np.array(request.infer({0: batch})[output], copy=True)

    return predict


def _torch_model(ov, path: str):
    """A PyTorch file as an OpenVINO model (its weights and graph; PyTorch is needed to read it)."""
    torch = require("torch", "torch")
    if path.endswith(".pt2"):
        return ov.convert_model(torch.export.load(path))
    return ov.convert_model(torch.jit.load(path, map_location="cpu").eval())


def _tensorflow_model(ov, path: str):
    """A SavedModel folder (its serving signature) or a Keras file as an OpenVINO model."""
    if Path(path).is_dir():
        return ov.convert_model(path)
    tf = require("tensorflow", "tensorflow")
    keras_model = tf.keras.models.load_model(path, compile=False)
    with tempfile.TemporaryDirectory(prefix="terrabeam-savedmodel-") as folder:
        keras_model.export(folder, verbose=False)  # OpenVINO reads SavedModels, not Keras 3 objects
        return ov.convert_model(folder)
