"""PyTorch models: TorchScript (.pt, .pth) or torch.export programs (.pt2); on CUDA when available."""

from __future__ import annotations

import numpy as np

from terrabeam.predict.frameworks import Predictor, require


def load(path: str, threads: int, task: str) -> Predictor:
    torch = require("torch", "torch")
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if path.endswith(".pt2"):
        model = torch.export.load(path).module().to(device)
    else:
        model = torch.jit.load(path, map_location=device).eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device)).cpu().numpy()

    return predict
