"""The two bounds of the predict step, each in a plain loop on in-memory or on-disk data.

model bound: the model alone on patches already decoded and normalised in memory (same threads,
same batch size), including loading the model. I/O bound: reading the export shards (gunzip, CRC,
decode) and writing prediction shards (post-process, encode, gzip) with no model and no Beam.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from terrabeam.config import PipelineConfig
from terrabeam.grid import Grid
from terrabeam.layout import list_shards, mixer_path, shard_name
from terrabeam.predict.io import PostProcess
from terrabeam.tfrecord import RecordWriter, decode_example, encode_example, read_records


def _shape(config: PipelineConfig, export_dir: Path) -> tuple[int, int]:
    grid = Grid.read_mixer(mixer_path(export_dir, config.export.prefix))
    kw, kh = config.grid.kernel_size
    return grid.patch_height + kh, grid.patch_width + kw


def load_patches(config: PipelineConfig, export_dir: Path) -> list[np.ndarray]:
    """Every patch of the export as the model's (C, H, W) float32 input (not timed)."""
    norm = config.model.normalization
    mean = np.asarray(norm.mean, np.float32)[:, None, None]
    std = np.asarray(norm.std, np.float32)[:, None, None]
    shape = _shape(config, export_dir)
    patches = []
    for shard in list_shards(export_dir, config.export.prefix):
        for record in read_records(shard):
            features = decode_example(record)
            patch = np.stack([np.reshape(features[b], shape) for b in config.model.input_bands])
            patches.append((patch - mean) / std)
    return patches


def model_bound(config: PipelineConfig, patches: list[np.ndarray]) -> float:
    """Seconds to load the model and run it over ``patches`` in batches of ``model.batch_size``."""
    model = config.model
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = model.threads
    session = ort.InferenceSession(
        str(config.resolve(model.path)), options, providers=ort.get_available_providers()
    )
    name = session.get_inputs()[0].name
    for i in range(0, len(patches), model.batch_size):
        session.run(None, {name: np.stack(patches[i : i + model.batch_size])})
    return time.perf_counter() - start


def io_bound(config: PipelineConfig, export_dir: Path, out_dir: Path) -> tuple[float, int]:
    """Seconds to read every export record and write a prediction record for it, with no model.

    The 'prediction' is one fixed array of random logits of the model's output shape; post-processing
    (softmax, argmax, crop) is included because a pipeline has to do it too.
    """
    h, w = _shape(config, export_dir)
    kw, kh = config.grid.kernel_size
    classes = config.model.classes
    logits = np.random.default_rng(0).normal(size=(len(classes), h, w)).astype(np.float32)
    post = PostProcess(classes, (h - kh, w - kw), "logits")
    bands = frozenset(config.model.input_bands)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = 0
    start = time.perf_counter()
    for number, shard in enumerate(list_shards(export_dir, config.export.prefix)):
        with RecordWriter(out_dir / shard_name("io", number), config.predict.compression_level) as writer:
            for record in read_records(shard):
                features = decode_example(record, bands)
                np.stack([np.reshape(features[b], (h, w)) for b in config.model.input_bands])
                writer.write(encode_example(post.features(logits)))
                records += 1
    return time.perf_counter() - start, records


def keras_pixel_bound(config: PipelineConfig, export_dir: Path) -> float:
    """Seconds for one whole-array ``model.predict`` over every core pixel of the export, in memory
    (loading the model included; decoding not timed): the model bound of a per-pixel Keras model."""
    import keras

    h, w = _shape(config, export_dir)
    kw, kh = config.grid.kernel_size
    rows = []
    for shard in list_shards(export_dir, config.export.prefix):
        for record in read_records(shard):
            features = decode_example(record)
            core = [
                np.reshape(features[b], (h, w))[kh // 2 : h - kh // 2, kw // 2 : w - kw // 2]
                for b in config.model.input_bands
            ]
            rows.append(np.stack(core, axis=-1).reshape(-1, len(core)))
    pixels = np.concatenate(rows)
    del rows
    start = time.perf_counter()
    model = keras.models.load_model(config.resolve(config.model.path), compile=False)
    model.predict(pixels, batch_size=65536, verbose=0)
    return time.perf_counter() - start
