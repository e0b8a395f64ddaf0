"""ONNX models through OpenVINO on the CPU: at fp32, or with bf16 inference precision on CPUs with
AMX / AVX512-BF16 (the U-Net ≈ 2.5× ONNX Runtime's fp32 speed here, BENCHMARKS.md)."""

from __future__ import annotations

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
    compiled = ov.Core().compile_model(path, "CPU", compile_options(runtime))
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def predict(batch: np.ndarray) -> np.ndarray:
        # the request reuses its output buffer: copy before the next call
        return np.array(request.infer({0: batch})[output], copy=True)

    return predict
