"""ONNX models through ONNX Runtime (the base install); CUDA is used when the runtime offers it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from terrabeam.predict.frameworks import Predictor


def load(path: str, threads: int, task: str) -> Predictor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=ort.get_available_providers())
    name = session.get_inputs()[0].name

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return predict
