"""PyTorch models: TorchScript (.pt, .pth) or torch.export programs (.pt2), on the CPU or a CUDA
GPU, at fp32 or under autocast to bf16 / fp16."""

from __future__ import annotations

import numpy as np

from terrabeam.predict.engines import Runtime
from terrabeam.predict.frameworks import Predictor, require


def load(path: str, task: str, runtime: Runtime) -> Predictor:
    torch = require("torch", "torch")
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    device = runtime.device
    if path.endswith(".pt2"):
        model = torch.export.load(path).module().to(device)
    else:
        model = torch.jit.load(path, map_location=device).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.precision)
    kind = device.partition(":")[0]

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(kind, dtype=dtype, enabled=dtype is not None):
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return predict
