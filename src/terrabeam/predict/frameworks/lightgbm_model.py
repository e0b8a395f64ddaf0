"""LightGBM boosters saved as text files; a binary classifier's P(1) becomes two class columns."""

from __future__ import annotations

import numpy as np

from terrabeam.predict.engines import Runtime
from terrabeam.predict.frameworks import Predictor, require


def load(path: str, task: str, runtime: Runtime) -> Predictor:
    lightgbm = require("lightgbm", "lightgbm")
    booster = lightgbm.Booster(model_file=path)
    options = {"num_threads": runtime.threads} if runtime.threads else {}

    def predict(pixels: np.ndarray) -> np.ndarray:
        output = booster.predict(pixels, **options)
        if task == "classification" and output.ndim == 1:
            output = np.stack([1 - output, output], axis=1)
        return output

    return predict
