"""``terrabeam inspect``: verdicts on Earth Engine exports as Earth Engine names them (several shards +
``<prefix>-mixer.json``; one ``<prefix>.tfrecord.gz`` + ``<prefix>.json``), written from synthetic
arrays with the protoc classes; on terrabeam's own export, predict and deliver folders, made by the
real CLI from a small synthetic scene; and on damaged copies of both. Every ``--json`` is parsed
with ``json.load``."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from conftest import write_conv_model, write_raster
from earth_engine_files import write_earth_engine_export
from example_wire import length_delimited

from terrabeam.cli import main
from terrabeam.inspect import inspect_paths, kernel_candidates
from terrabeam.tfrecord import RecordWriter, encode_example, read_records

W, H, KW, KH = 12, 8, 4, 2  # Earth Engine's patchDimensions [width, height] and kernelSize
PER_ROW, TOTAL = 3, 7
EE_SHARDS = ["ee-00000.tfrecord.gz", "ee-00001.tfrecord.gz", "ee-00002.tfrecord.gz"]  # 3 + 3 + 1 patches


def _patches(count: int = TOTAL) -> list[np.ndarray]:
    rng = np.random.default_rng(8)
    return [rng.random((2, H + KH, W + KW)).astype(np.float32) for _ in range(count)]


@pytest.fixture
def ee_export(tmp_path, example_pb2):
    """An Earth Engine export: three shards continuing the patch order and ee-mixer.json."""
    folder = tmp_path / "export"
    write_earth_engine_export(folder, example_pb2, _patches(), EE_SHARDS, "ee-mixer.json", (W, H), PER_ROW)
    return folder


@pytest.fixture(scope="module")
def terrabeam_run(tmp_path_factory):
    """A run folder made by the real CLI (export, predict, deliver) from a synthetic 70×50 px scene of
    three bands and a 1×1 conv model: patches 32×16 with a [4, 4] margin, 3 per row, 12 in all."""
    root = tmp_path_factory.mktemp("tb")
    rng = np.random.default_rng(11)
    transform = Affine(10, 0, 400000, 0, -10, 5600000)
    bands = {}
    for name in ("red", "green", "nir"):
        data = rng.integers(0, 10000, (50, 70)).astype(np.uint16)
        bands[name] = {"path": str(write_raster(root / f"{name}.tif", data, transform)), "scale": 1e-4}
    write_conv_model(root / "model.onnx", channels=3, outputs=2, kernel=1)
    config = root / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "workspace": str(root / "ws"),
                "source": {"bands": bands},
                "grid": {"patch_size": [32, 16], "kernel_size": [4, 4]},
                "export": {"prefix": "tiny", "max_file_size": 20_000},
                "model": {
                    "path": str(root / "model.onnx"),
                    "input_bands": ["red", "green", "nir"],
                    "classes": ["land", "water"],
                },
            }
        )
    )
    for step in ("export", "predict", "deliver"):
        assert main([step, str(config), "--run", "r", "-q"]) == 0
    return root / "ws" / "r"


def _inspect_json(capsys, *paths) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["inspect", *map(str, paths), "--json"])
    return code, json.load(io.StringIO(capsys.readouterr().out))


def _violations(document: dict) -> list[str]:
    found = [v for r in document["reports"] for v in r["violations"]] + document["errors"]
    return [f"{v['file']} record {v['record']}: {v['message']}" for v in found]


def _only(document: dict) -> dict:
    (report,) = document["reports"]
    return report


# --- valid -----------------------------------------------------------------------------------------


def test_an_earth_engine_export_of_several_shards_is_valid(ee_export, capsys):
    code, document = _inspect_json(capsys, ee_export)
    report = _only(document)
    assert code == 0 and document["valid"] and report["valid"], _violations(document)
    assert [(s["records"], s["complete"], s["compressed"]) for s in report["shards"]] == [
        (3, True, True)
    ] * 2 + [(1, True, True)]
    assert report["records"] == TOTAL and report["mixer"] == str(ee_export / "ee-mixer.json")
    length = (W + KW) * (H + KH)
    assert report["features"] == [
        {"name": "B4", "type": "float", "length": length},
        {"name": "B8", "type": "float", "length": length},
    ]
    assert (report["patch_size"], report["kernel_size"], report["kernel_size_source"]) == (
        [W, H],
        [KW, KH],
        "inferred",
    )
    assert any("[8, 0] would fit too" in w["message"] for w in report["warnings"])  # 160 = 20 × 8 as well
    ingestion = report["earth_engine_ingestion"]
    assert not ingestion["ready"] and "core size 12×8: these hold 16×10" in ingestion["needs"][0]


@pytest.mark.parametrize("named", ["folder", "mixer", "shard"])
def test_a_single_file_earth_engine_export_is_valid_however_named(tmp_path, example_pb2, capsys, named):
    """``image_2021.tfrecord.gz`` + ``image_2021.json``: the folder, the mixer or the shard finds the set."""
    folder = tmp_path / "downloads"
    write_earth_engine_export(
        folder, example_pb2, _patches(6), ["image_2021.tfrecord.gz"], "image_2021.json", (W, H), PER_ROW
    )
    path = {"folder": folder, "mixer": folder / "image_2021.json", "shard": folder / "image_2021.tfrecord.gz"}
    code, document = _inspect_json(capsys, path[named])
    report = _only(document)
    assert code == 0 and report["valid"], _violations(document)
    assert report["whole_set"] and report["records"] == 6 and report["shards"][0]["number"] is None
    assert report["mixer"] == str(folder / "image_2021.json") and report["kernel_size"] == [KW, KH]


def test_terrabeams_run_folder_export_predictions_and_cogs(terrabeam_run, capsys):
    code, document = _inspect_json(capsys, terrabeam_run)
    assert code == 0 and document["valid"], _violations(document)
    by = {(r["kind"], r.get("prefix") or r["path"].rsplit("/", 1)[-1]): r for r in document["reports"]}
    assert set(by) == {
        ("tfrecord", "tiny"),
        ("tfrecord", "predictions"),
        ("cog", "tiny-classes.tif"),
        ("cog", "tiny-probabilities.tif"),
    }
    export, predictions = by["tfrecord", "tiny"], by["tfrecord", "predictions"]
    assert export["records"] == predictions["records"] == 12 and len(export["shards"]) == 6
    assert (export["kernel_size"], export["kernel_size_source"]) == ([4, 4], "manifest")
    assert {f["name"]: f["length"] for f in export["features"]} == {"green": 720, "nir": 720, "red": 720}
    assert not export["earth_engine_ingestion"]["ready"]  # the margin is still on
    assert {f["name"]: (f["type"], f["length"]) for f in predictions["features"]} == {
        "class": ("int64", 512),
        "prob_land": ("float", 512),
        "prob_water": ("float", 512),
    }
    assert predictions["kernel_size"] == [0, 0]
    assert predictions["earth_engine_ingestion"] == {"ready": True, "needs": []}
    cog = by["cog", "tiny-classes.tif"]
    assert cog["cog"] and cog["valid"] and (cog["width"], cog["height"], cog["dtype"]) == (70, 50, "uint8")
    assert cog["terrabeam_tags"]["TERRABEAM_PIPELINE"] == "tiny"
    assert cog["terrabeam_tags"]["TERRABEAM_RUN"] == "r"
    assert set(cog["terrabeam_tags"]) >= {"TERRABEAM_VERSION", "TERRABEAM_MODEL", "TERRABEAM_CONFIG_HASH"}


def test_human_output_is_the_verdict_without_json(terrabeam_run, capsys):
    capsys.readouterr()
    assert main(["inspect", str(terrabeam_run / "predict")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "predictions*: 6 shards, 12 records, every CRC checked" in out
    assert "Earth Engine ingestion: ready" in out and out.rstrip().endswith("inspected 1 file set: valid")


# --- damaged ---------------------------------------------------------------------------------------


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(payload offset, payload length) of each TFRecord frame of uncompressed ``data``."""
    frames, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        frames.append((offset + 12, length))
        offset += 16 + length
    return frames


def test_a_flipped_byte_fails_the_crc_of_its_shard_and_record(ee_export, capsys):
    shard = ee_export / "ee-00001.tfrecord.gz"
    data = bytearray(gzip.decompress(shard.read_bytes()))
    start, length = _frames(bytes(data))[2]
    data[start + length // 2] ^= 0x10
    shard.write_bytes(gzip.compress(bytes(data)))
    code, document = _inspect_json(capsys, ee_export)
    assert code == 1 and not document["valid"]
    assert _violations(document) == [f"{shard} record 2: data CRC mismatch in record at byte {start - 12}"]
    assert _only(document)["shards"][1] | {"path": ""} == {
        "path": "",
        "number": 1,
        "records": 2,
        "complete": False,
        "compressed": True,
        "size_bytes": shard.stat().st_size,
    }


@pytest.mark.parametrize("folder", ["export", "predict"])
def test_a_truncated_terrabeam_shard_names_shard_and_record(terrabeam_run, tmp_path, capsys, folder):
    copy = shutil.copytree(terrabeam_run / folder, tmp_path / folder)
    shard = sorted(copy.glob("*-00003.tfrecord.gz"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])
    code, document = _inspect_json(capsys, copy)
    assert code == 1
    (violation,) = _violations(document)
    assert violation.startswith(f"{shard} record ") and "unreadable in the record at byte" in violation
    # no second verdict on counts the damage already explains
    assert not any("totalPatches" in v or "shard_records" in v for v in _violations(document))


def test_mixer_total_patches_differs_from_the_records(ee_export, capsys):
    mixer = ee_export / "ee-mixer.json"
    mixer.write_text(json.dumps(json.loads(mixer.read_text()) | {"totalPatches": 8}))
    code, document = _inspect_json(capsys, ee_export)
    assert code == 1
    assert _violations(document) == [
        f"{mixer} record None: totalPatches=8 but 7 records found "
        "(ee-00000.tfrecord.gz: 3, ee-00001.tfrecord.gz: 3, ee-00002.tfrecord.gz: 1)"
    ]


def test_patches_per_row_against_the_region_of_terrabeams_manifest(terrabeam_run, tmp_path, capsys):
    copy = shutil.copytree(terrabeam_run / "export", tmp_path / "export")
    mixer = copy / "tiny-mixer.json"
    mixer.write_text(json.dumps(json.loads(mixer.read_text()) | {"patchesPerRow": 4}))  # 4 × 3 still 12
    code, document = _inspect_json(capsys, mixer)
    assert code == 1
    assert _violations(document) == [
        f"{mixer} record None: patchesPerRow=4 but the region is 70 px wide (tiny-manifest.json): "
        "ceil(70 / 32) = 3 patches per row"
    ]


def test_patches_per_row_beyond_total_patches(ee_export, capsys):
    mixer = ee_export / "ee-mixer.json"
    mixer.write_text(json.dumps(json.loads(mixer.read_text()) | {"patchesPerRow": 9}))
    code, document = _inspect_json(capsys, ee_export)
    assert code == 1 and _violations(document) == [
        f"{mixer} record None: patchesPerRow=9 is more than totalPatches=7"
    ]


def test_feature_lengths_that_change_between_records(tmp_path, example_pb2, capsys):
    patches = _patches()
    patches[4] = patches[4][:, :, :-1]  # patch 4 (shard 1, record 1) one column short
    folder = tmp_path / "export"
    write_earth_engine_export(folder, example_pb2, patches, EE_SHARDS, "ee-mixer.json", (W, H), PER_ROW)
    code, document = _inspect_json(capsys, folder)
    assert code == 1
    assert _violations(document) == [
        f"{folder / 'ee-00001.tfrecord.gz'} record 1: feature B4 has 150 float values where the first "
        "record has 160 float; feature B8 has 150 float values where the first record has 160 float"
    ]


def _replace_record(shard, index: int, payload: bytes) -> None:
    records = list(read_records(shard))
    records[index] = payload
    with RecordWriter(shard) as writer:
        for record in records:
            writer.write(record)


def test_a_malformed_example_with_good_crcs_names_shard_and_record(ee_export, capsys):
    """A Feature whose packed float list has 5 bytes: framing and CRCs fine, protobuf rejects it."""
    malformed = length_delimited(
        1,
        length_delimited(
            1, length_delimited(1, b"B4") + length_delimited(2, length_delimited(2, b"\x0a\x05" + bytes(5)))
        ),
    )
    shard = ee_export / "ee-00002.tfrecord.gz"
    _replace_record(shard, 0, malformed)
    code, document = _inspect_json(capsys, ee_export)
    assert code == 1
    (violation,) = _violations(document)
    assert violation.startswith(f"{shard} record 0: malformed tf.train.Example: packed float list of 5 bytes")


def test_bytes_features_and_a_missing_mixer_are_what_ingestion_lacks(tmp_path, capsys):
    """Synthetic records written by terrabeam's encoder plus a bytes_list feature, no mixer beside them:
    valid (a mixer is not required to read records), but not ingestible."""
    folder = tmp_path / "loose"
    folder.mkdir()
    patch = encode_example({"B4": np.zeros(64, np.float32)})
    # Example{features: Features{feature: {"id": Feature{bytes_list: BytesList{value: ["tile-7"]}}}}}
    bytes_feature = length_delimited(1, length_delimited(1, b"tile-7"))
    with_bytes = length_delimited(
        1, length_delimited(1, length_delimited(1, b"id") + length_delimited(2, bytes_feature))
    )
    with RecordWriter(folder / "t.tfrecord.gz") as writer:
        for _ in range(2):
            writer.write(patch + with_bytes)  # two Features messages merge: B4 and id
    code, document = _inspect_json(capsys, folder)
    report = _only(document)
    assert code == 0 and report["valid"], _violations(document)
    assert report["features"] == [
        {"name": "B4", "type": "float", "length": 64},
        {"name": "id", "type": "bytes", "length": 1},
    ]
    assert (report["patch_size"], report["kernel_size_source"]) == ([8, 8], "assumed")
    needs = report["earth_engine_ingestion"]["needs"]
    assert not report["earth_engine_ingestion"]["ready"]
    assert needs[0].startswith("a mixer") and "feature id is a bytes list" in needs[1]
    assert any("no mixer for t" in w["message"] for w in report["warnings"])


def test_a_missing_shard_number_breaks_the_order(ee_export, capsys):
    (ee_export / "ee-00001.tfrecord.gz").unlink()
    code, document = _inspect_json(capsys, ee_export)
    assert code == 1
    assert (
        f"{ee_export / 'ee'}* record None: shard 00001 is missing (ee-00002.tfrecord.gz follows): "
        in (_violations(document)[0])
    )


def test_a_tiled_geotiff_that_is_no_cog(tmp_path, capsys):
    """A plain tiled GeoTIFF whose overviews were added afterwards (synthetic 1024×1024 px)."""
    path = tmp_path / "plain.tif"
    data = np.random.default_rng(0).integers(0, 255, (1, 1024, 1024)).astype(np.uint8)
    with rasterio.open(
        path, "w", driver="GTiff", width=1024, height=1024, count=1, dtype="uint8", crs="EPSG:32633",
        transform=Affine(10, 0, 400000, 0, -10, 5600000), tiled=True, blockxsize=256, blockysize=256,
    ) as ds:  # fmt: skip
        ds.write(data)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4])
    code, document = _inspect_json(capsys, path)
    report = _only(document)
    assert (
        code == 1 and not report["cog"] and report["overviews"] == [2, 4] and report["terrabeam_tags"] == {}
    )
    assert _violations(document) and all(
        v.startswith(f"{path} record None: not a COG: ") for v in _violations(document)
    )
    assert main(["inspect", str(path)]) == 1
    assert "NOT a valid COG" in capsys.readouterr().out  # the result on stdout, as text without --json


def test_paths_that_name_nothing_to_inspect(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, document = _inspect_json(capsys, tmp_path / "absent", tmp_path / "notes.txt")
    assert code == 1 and document["reports"] == []
    assert [e["file"] for e in document["errors"]] == [str(tmp_path / "absent"), str(tmp_path / "notes.txt")]


def test_kernel_candidates_likeliest_first():
    assert kernel_candidates(12, 8, 160) == [(4, 2), (8, 0)]
    assert kernel_candidates(32, 16, 36 * 20)[0] == (4, 4)
    assert kernel_candidates(8, 8, 64) == [(0, 0)]
    assert kernel_candidates(8, 8, 63) == []


def test_a_set_named_twice_is_inspected_once(ee_export):
    inspection = inspect_paths([ee_export, ee_export / "ee-mixer.json", ee_export / "ee-00000.tfrecord.gz"])
    assert [(r.prefix, r.whole) for r in inspection.reports] == [("ee", True), ("ee", False)]
    assert inspection.valid
