"""scikit-learn estimators saved with joblib or pickle: predict_proba for classes, predict otherwise."""

from __future__ import annotations

from terrabeam.errors import ModelError
from terrabeam.predict.engines import Runtime
from terrabeam.predict.frameworks import Predictor, require


def load(path: str, task: str, runtime: Runtime) -> Predictor:
    joblib = require("joblib", "sklearn")
    require("sklearn", "sklearn")
    model = joblib.load(path)
    if task == "classification":
        if not hasattr(model, "predict_proba"):
            raise ModelError(f"{path}: {type(model).__name__} has no predict_proba; use output: regression")
        return model.predict_proba
    return model.predict
