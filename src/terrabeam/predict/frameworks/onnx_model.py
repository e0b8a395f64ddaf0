"""ONNX models through ONNX Runtime (the base install): the CPU, or CUDA / TensorRT on a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from terrabeam.errors import ModelError
from terrabeam.predict.engines import Runtime
from terrabeam.predict.frameworks import Predictor

SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime's session config key


def providers(runtime: Runtime, available: list[str]) -> list:
    """ONNX Runtime execution providers for the runtime's device, best first: TensorRT (fp16 when
    asked) where installed, CUDA, then the CPU for operators the GPU providers lack."""
    if runtime.device == "cpu":
        return ["CPUExecutionProvider"]
    index = runtime.gpu_index
    chosen: list = []
    if "TensorrtExecutionProvider" in available:
        options = {"device_id": index, "trt_fp16_enable": runtime.precision == "fp16"}
        chosen.append(("TensorrtExecutionProvider", options | {"trt_engine_cache_enable": True}))
    chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    return [*chosen, "CPUExecutionProvider"]


def load(path: str, task: str, runtime: Runtime) -> Predictor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = runtime.threads
    if runtime.device == "cpu":
        # No memory pattern: ONNX Runtime would keep one planned block per input shape it has seen;
        # without it the arena reuses freed chunks. U-Net, batch 4: −42 MiB, no slower
        # (BENCHMARKS.md).
        options.enable_mem_pattern = False
        # No spinning: between calls ONNX Runtime's pool threads would busy-wait for the next one,
        # on the cores the reads and the tile encoding need meanwhile. Light model, whole run: 16×
        # −4 %, 64× −10 %; the U-Net no slower (BENCHMARKS.md).
        options.add_session_config_entry(SPINNING, "0")
    session = ort.InferenceSession(path, options, providers=providers(runtime, ort.get_available_providers()))
    if runtime.device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelError(
            f"model.device {runtime.device}: ONNX Runtime could not start CUDA (session providers "
            f"{session.get_providers()}); check the driver and the CUDA libraries, or set device cpu"
        )
    name = session.get_inputs()[0].name

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return predict
