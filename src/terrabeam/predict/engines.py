"""Which engine, device and precision run the model, decided once per worker from the config and
what this machine offers; every refusal says what would work instead.

``auto`` rules (measured, BENCHMARKS.md "engines"): fp32 on the CPU runs the framework's own engine
(ONNX Runtime for ONNX files: OpenVINO at fp32 was no faster); bf16 on the CPU runs ONNX files on
OpenVINO (AMX / AVX512-BF16); a CUDA GPU, when the engine sees one, runs ONNX Runtime (CUDA, or
TensorRT where installed), PyTorch or TensorFlow on it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from terrabeam.config import ModelConfig
from terrabeam.errors import ModelError


@dataclass(frozen=True)
class Runtime:
    """How one model copy runs: engine, device ("cpu" or "cuda:N"), precision, intra-op threads
    (0: the engine's default) and the batch size batches are padded to on GPUs (uniform shapes)."""

    engine: str
    device: str
    precision: str
    threads: int
    batch_size: int

    @property
    def gpu_index(self) -> int:
        return int(self.device.partition(":")[2] or 0)


def default_threads(model: ModelConfig, local_workers: int | None) -> int:
    """model.threads, or for 0: this machine's cores shared by the local workers (each worker runs
    the model at once); on a remote runner (``local_workers`` None) the engine's default."""
    if model.threads or local_workers is None:
        return model.threads
    return max(1, (os.cpu_count() or 1) // max(1, local_workers))


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): OpenVINO's own reading of the
    CPU where installed, else the kernel's CPU flags."""
    try:
        import openvino

        return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def cuda_available(engine: str) -> bool:
    """Whether ``engine`` sees a CUDA GPU here (imports the framework)."""
    if engine == "onnxruntime":
        return "CUDAExecutionProvider" in onnxruntime_providers()
    if engine == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if engine == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return False


def resolve_runtime(model: ModelConfig, threads: int) -> Runtime:
    """The runtime for ``model`` on this machine, or a ModelError saying why not and what would do."""
    engine = model.engine
    own = model.framework if model.framework != "onnx" else "onnxruntime"
    wants_gpu = model.device.startswith("cuda")
    if engine == "auto":
        if model.framework == "onnx" and model.precision == "bf16" and not wants_gpu:
            if not openvino_installed():
                raise ModelError(
                    "model.precision bf16 on the CPU runs ONNX models on OpenVINO, which is not "
                    "installed: pip install 'terrabeam[openvino]' (or keep precision fp32)"
                )
            engine = "openvino"
        else:
            engine = own
    if engine == "openvino" and not openvino_installed():
        raise ModelError(
            "model.engine openvino needs the openvino package: pip install 'terrabeam[openvino]'"
        )
    device = model.device
    if device == "auto":
        device = (
            "cuda:0" if engine in ("onnxruntime", "torch", "tensorflow") and cuda_available(engine) else "cpu"
        )
    elif device.startswith("cuda"):
        if engine not in ("onnxruntime", "torch", "tensorflow"):
            raise ModelError(
                f"model.device {device}: engine {engine} runs on the CPU only; "
                "for a CUDA GPU use onnxruntime (ONNX files), torch or tensorflow"
            )
        if not cuda_available(engine):
            seen = f" (ONNX Runtime offers {onnxruntime_providers()})" if engine == "onnxruntime" else ""
            hint = (
                "install onnxruntime-gpu" if engine == "onnxruntime" else f"install a CUDA build of {engine}"
            )
            raise ModelError(
                f"model.device {device}: {engine} sees no CUDA GPU here{seen}; {hint} or set device cpu"
            )
    _check_precision(model.precision, engine, device)
    batch = model.batch_size if device != "cpu" and model.kind == "per_patch" else 0
    return Runtime(engine, device, model.precision, threads, batch)


def _check_precision(precision: str, engine: str, device: str) -> None:
    if precision == "fp32":
        return
    on_gpu = device != "cpu"
    if engine in ("sklearn", "lightgbm", "tensorflow"):
        hint = "; engine openvino runs it at bf16 on CPUs" if engine == "tensorflow" else ""
        raise ModelError(f"model.precision {precision}: {engine} models run at fp32 only{hint}")
    if precision == "fp16" and not on_gpu:
        raise ModelError(
            "model.precision fp16 is for GPUs (model.device cuda); on a CPU with AMX or AVX512-BF16 use bf16"
        )
    if precision == "bf16" and not on_gpu and not cpu_supports_bf16():
        raise ModelError(
            "model.precision bf16: this CPU has no bf16 units (AMX / AVX512-BF16), so bf16 would be "
            "emulated and slower than fp32; keep precision fp32"
        )
    if engine == "onnxruntime":
        if not on_gpu:
            raise ModelError(
                "model.precision bf16: ONNX Runtime has no bf16 on the CPU; use engine openvino (or auto)"
            )
        if precision == "bf16":
            raise ModelError("model.precision bf16: ONNX Runtime on GPUs offers fp16 (TensorRT); use fp16")
        if "TensorrtExecutionProvider" not in onnxruntime_providers():
            raise ModelError(
                "model.precision fp16 with ONNX Runtime needs its TensorRT provider "
                f"(this install offers {onnxruntime_providers()}); or keep fp32 on CUDA"
            )
    if engine == "openvino" and on_gpu:
        raise ModelError(f"model.device {device}: OpenVINO runs on the CPU here")
