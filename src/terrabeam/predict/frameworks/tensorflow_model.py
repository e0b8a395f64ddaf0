"""TensorFlow models: a Keras file (.keras, .h5) or a SavedModel folder (its serving signature)."""

from __future__ import annotations

from contextlib import suppress

import numpy as np

from terrabeam.predict.frameworks import Predictor, require


def load(path: str, threads: int, task: str) -> Predictor:
    tf = require("tensorflow", "tensorflow")
    if threads:
        with suppress(RuntimeError):  # already initialised in this process: keep its setting
            tf.config.threading.set_intra_op_parallelism_threads(threads)
    if path.endswith((".keras", ".h5")):
        model = tf.keras.models.load_model(path, compile=False)

        def predict(batch: np.ndarray) -> np.ndarray:
            return np.asarray(model(batch, training=False))

        return predict
    signature = tf.saved_model.load(path).signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1].keys()

    def serve(batch: np.ndarray) -> np.ndarray:
        outputs = signature(**{input_name: tf.constant(batch)})
        return next(iter(outputs.values())).numpy()

    return serve
