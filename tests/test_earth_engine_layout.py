"""Files laid out exactly as Earth Engine exports them: shards `<prefix>-NNNNN.tfrecord.gz` continuing
the patch order, `<prefix>-mixer.json`, no terrabeam manifest, a kernel margin, non-square patches.
Written here from synthetic arrays with the protoc oracle's classes (not with terrabeam's encoder),
so the reader is tested on bytes it did not write. Prediction records must match the export's
patches one to one, in order, at core size."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
import yaml
from apache_beam.io.tfrecordio import _TFRecordUtil
from earth_engine_files import write_earth_engine_export
from onnx import TensorProto, helper, numpy_helper

from terrabeam.cli import main
from terrabeam.layout import list_shards
from terrabeam.tfrecord import decode_example, read_records

W, H, KW, KH = 12, 8, 4, 2  # core patch [width, height] and kernelSize, as in an export request
PER_ROW, TOTAL = 3, 7  # 3 patches per row, a last row of one patch (Earth Engine drops none here)


def _identity_onnx(path):
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [numpy_helper.from_array(np.array([1.0], np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    import onnx

    onnx.save(model, path)


def test_earth_engine_export_round_trip(tmp_path, example_pb2):
    rng = np.random.default_rng(4)
    export = tmp_path / "ws" / "ee" / "export"
    export.mkdir(parents=True)
    patches = [rng.random((2, H + KH, W + KW)).astype(np.float32) for _ in range(TOTAL)]
    for number, chunk in enumerate((patches[0:3], patches[3:5], patches[5:7])):  # three shards
        buffer = io.BytesIO()
        for patch in chunk:
            example = example_pb2.Example()
            for name, band in zip(("B4", "B8"), patch, strict=True):
                example.features.feature[name].float_list.value.extend(band.ravel().tolist())
            _TFRecordUtil.write_record(buffer, example.SerializeToString())
        (export / f"ee-{number:05d}.tfrecord.gz").write_bytes(gzip.compress(buffer.getvalue()))
    mixer = {
        "projection": {
            "crs": "EPSG:32633",
            "affine": {"doubleMatrix": [10.0, 0.0, 400000.0, 0.0, -10.0, 5600000.0]},
        },
        "patchDimensions": [W, H],
        "patchesPerRow": PER_ROW,
        "totalPatches": TOTAL,
    }
    (export / "ee-mixer.json").write_text(json.dumps(mixer))
    _identity_onnx(tmp_path / "id.onnx")
    config = tmp_path / "ee.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "ee",
                "workspace": str(tmp_path / "ws"),
                "source": {"bands": {"B4": {"path": "unused.tif"}, "B8": {"path": "unused.tif"}}},
                "grid": {"patch_size": [W, H], "kernel_size": [KW, KH]},
                "export": {"prefix": "ee"},
                "model": {
                    "path": str(tmp_path / "id.onnx"),
                    "input_bands": ["B4", "B8"],
                    "output": "probabilities",
                    "classes": ["a", "b"],
                },
            }
        )
    )
    assert main(["predict", str(config), "--run", "ee"]) == 0
    shards = list_shards(tmp_path / "ws" / "ee" / "predict", "predictions")
    assert [p.name for p in shards] == [f"predictions-{i:05d}.tfrecord.gz" for i in range(3)]
    assert [sum(1 for _ in read_records(s)) for s in shards] == [3, 2, 2]
    records = [decode_example(r) for s in shards for r in read_records(s)]
    for patch, record in zip(patches, records, strict=True):
        core = patch[:, KH // 2 : KH // 2 + H, KW // 2 : KW // 2 + W]
        np.testing.assert_array_equal(record["prob_a"].reshape(H, W), core[0])
        np.testing.assert_array_equal(record["prob_b"].reshape(H, W), core[1])
        np.testing.assert_array_equal(record["class"].reshape(H, W), np.argmax(core, axis=0))
    assert json.loads((tmp_path / "ws" / "ee" / "predict" / "predictions-mixer.json").read_text()) == mixer
    assert main(["deliver", str(config), "--run", "ee"]) == 0


def test_an_export_with_its_mixer_elsewhere_reads_with_export_mixer(tmp_path, example_pb2):
    """Earth Engine's mixer given explicitly (``export.mixer``) instead of ``<prefix>-mixer.json``."""
    test_earth_engine_export_round_trip(tmp_path, example_pb2)
    export = tmp_path / "ws" / "ee" / "export"
    moved = tmp_path / "downloads" / "my-mixer.json"
    moved.parent.mkdir()
    (export / "ee-mixer.json").rename(moved)
    config = tmp_path / "ee.yaml"
    assert main(["predict", str(config), "--run", "ee"]) == 1  # no mixer beside the shards
    document = yaml.safe_load(config.read_text())
    document["export"]["mixer"] = str(moved)
    config.write_text(yaml.safe_dump(document))
    assert main(["predict", str(config), "--run", "ee"]) == 0
    shards = list_shards(tmp_path / "ws" / "ee" / "predict", "predictions")
    assert [sum(1 for _ in read_records(s)) for s in shards] == [3, 2, 2]


@pytest.mark.parametrize(
    ("shard_names", "mixer_name"),
    [
        (["image_2021.tfrecord.gz"], "image_2021.json"),  # a single-file export
        (["l9-00000.tfrecord.gz", "l9-00001.tfrecord.gz"], "l9mixer.json"),
    ],
)
def test_an_export_named_otherwise_is_found_without_export_mixer(
    tmp_path, example_pb2, shard_names, mixer_name
):
    """Shards and mixer named by Earth Engine for another prefix than the config's; no manifest, no
    ``export.mixer``: predict finds them, in order, and deliver maps them."""
    rng = np.random.default_rng(6)
    patches = [rng.random((2, H + KH, W + KW)).astype(np.float32) for _ in range(6)]
    write_earth_engine_export(
        tmp_path / "ws" / "r" / "export", example_pb2, patches, shard_names, mixer_name, (W, H), PER_ROW
    )
    _identity_onnx(tmp_path / "id.onnx")
    config = tmp_path / "ee.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "ee",
                "workspace": str(tmp_path / "ws"),
                "source": {"bands": {"B4": {"path": "unused.tif"}, "B8": {"path": "unused.tif"}}},
                "grid": {"patch_size": [W, H], "kernel_size": [KW, KH]},
                "model": {
                    "path": str(tmp_path / "id.onnx"),
                    "input_bands": ["B4", "B8"],
                    "output": "probabilities",
                    "classes": ["a", "b"],
                },
            }
        )
    )
    assert main(["predict", str(config), "--run", "r"]) == 0
    shards = list_shards(tmp_path / "ws" / "r" / "predict", "predictions")
    assert len(shards) == len(shard_names)
    records = [decode_example(r) for s in shards for r in read_records(s)]
    for patch, record in zip(patches, records, strict=True):
        core = patch[:, KH // 2 : KH // 2 + H, KW // 2 : KW // 2 + W]
        np.testing.assert_array_equal(record["prob_b"].reshape(H, W), core[1])
    assert main(["deliver", str(config), "--run", "r"]) == 0
