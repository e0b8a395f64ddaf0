"""Files laid out exactly as Earth Engine exports them, written with the protoc oracle's classes and
Apache Beam's TFRecord framing (not terrabeam's), so readers are tested on bytes they did not write."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from apache_beam.io.tfrecordio import _TFRecordUtil


def write_earth_engine_export(
    folder: Path,
    example_pb2,
    patches: Sequence[np.ndarray],
    shard_names: Sequence[str],
    mixer_name: str,
    patch_dimensions: tuple[int, int],
    patches_per_row: int,
    bands: Sequence[str] = ("B4", "B8"),
) -> dict:
    """``patches`` ((bands, rows, cols) float arrays) split evenly over the gzip shards ``shard_names``
    in order, and the mixer ``mixer_name``; returns the mixer document."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(patches) // len(shard_names))
    for number, name in enumerate(shard_names):
        buffer = io.BytesIO()
        for patch in patches[number * per_shard : (number + 1) * per_shard]:
            example = example_pb2.Example()
            for band, values in zip(bands, patch, strict=True):
                example.features.feature[band].float_list.value.extend(values.ravel().tolist())
            _TFRecordUtil.write_record(buffer, example.SerializeToString())
        (folder / name).write_bytes(gzip.compress(buffer.getvalue()))
    mixer = {
        "projection": {
            "crs": "EPSG:32633",
            "affine": {"doubleMatrix": [10.0, 0.0, 400000.0, 0.0, -10.0, 5600000.0]},
        },
        "patchDimensions": list(patch_dimensions),
        "patchesPerRow": patches_per_row,
        "totalPatches": len(patches),
    }
    (folder / mixer_name).write_text(json.dumps(mixer))
    return mixer
