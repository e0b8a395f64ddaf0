"""TensorFlow models: a Keras file (.keras, .h5) or a SavedModel folder (its serving signature), on
the CPU or a GPU."""

from __future__ import annotations

from contextlib import suppress

import numpy as np

from terrabeam.predict.engines import Runtime
from terrabeam.predict.frameworks import Predictor, require


def load(path: str, task: str, runtime: Runtime) -> Predictor:
    tf = require("tensorflow", "tensorflow")
    if runtime.threads:
        with suppress(RuntimeError):  # already initialised in this process: keep its setting
            tf.config.threading.set_intra_op_parallelism_threads(runtime.threads)
    device = "/CPU:0" if runtime.device == "cpu" else f"/GPU:{runtime.gpu_index}"
    if path.endswith((".keras", ".h5")):
        with tf.device(device):
            model = tf.keras.models.load_model(path, compile=False)

        def predict(batch: np.ndarray) -> np.ndarray:
            with tf.device(device):
                return np.asarray(model(batch, training=False))

        return predict
    with tf.device(device):
        signature = tf.saved_model.load(path).signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1].keys()

    def serve(batch: np.ndarray) -> np.ndarray:
        with tf.device(device):
            outputs = signature(**{input_name: tf.constant(batch)})
        return next(iter(outputs.values())).numpy()

    return serve
