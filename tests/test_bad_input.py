"""Bad input → a clear error naming the file, field or record, a non-zero exit, and no step folder
that looks finished. Synthetic rasters and a 1×1-conv model (tiny_pipeline) unless the real U-Net
is the point of the test."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import yaml

from terrabeam.cli import main


def _fails(capsys, args, *fragments):
    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"
    return err


def _published(tmp_path, run="r"):
    run_dir = tmp_path / "ws" / run
    return (
        sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".write"))
        if run_dir.exists()
        else []
    )


def test_tiny_pipeline_runs(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    assert main(["run", str(write()), "--run", "r"]) == 0
    assert _published(tmp_path) == ["deliver", "run.json", "summary.json"]


def test_missing_file_names_field_and_path(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["source"]["bands"]["nir"]["path"] = str(tmp_path / "absent.tif")
    _fails(capsys, ["run", write(doc), "--run", "r"], "source.bands.nir.path", "absent.tif", "not found")
    assert "export" not in _published(tmp_path)


def test_band_index_beyond_file(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["source"]["bands"]["nir"]["band"] = 4
    _fails(capsys, ["run", write(doc), "--run", "r"], "source.bands.nir.band = 4", "nir.tif has only 1 band")
    assert "export" not in _published(tmp_path)


def test_model_band_not_in_source_fails_validation(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["model"]["input_bands"] = ["red", "green", "swir16"]
    _fails(capsys, ["run", write(doc), "--run", "r"], "tiny.yaml: model.input_bands ['swir16'] are not bands")
    assert _published(tmp_path) == []


def test_record_missing_a_band_names_shard_and_record(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    assert main(["export", str(write()), "--run", "r"]) == 0
    doc = copy.deepcopy(document)
    doc["source"]["bands"]["swir16"] = doc["source"]["bands"]["nir"]
    doc["model"]["input_bands"] = ["red", "green", "swir16"]
    _fails(
        capsys,
        ["predict", write(doc, "other.yaml"), "--run", "r"],
        "tiny-00000.tfrecord.gz record 0",
        "band 'swir16' missing",
        "'nir'",
    )
    assert "predict" not in _published(tmp_path)


def test_region_outside_the_rasters(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["grid"]["region"] = {"bbox": [100000, 100000, 100500, 100500]}
    _fails(capsys, ["run", write(doc), "--run", "r"], "red.tif", "does not overlap the region")
    assert "export" not in _published(tmp_path)


def test_other_crs_needs_a_resolution(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["grid"]["crs"] = "EPSG:4326"
    _fails(capsys, ["run", write(doc), "--run", "r"], "grid.resolution is required", "EPSG:32633")


def test_model_expecting_six_channels_given_five(tmp_path, demo_copy, capsys):
    doc = yaml.safe_load(demo_copy.read_text())
    doc["model"]["input_bands"] = ["blue", "green", "red", "nir", "swir16"]
    for key in ("mean", "std"):
        doc["model"]["normalization"][key] = doc["model"]["normalization"][key][:5]
    demo_copy.write_text(yaml.safe_dump(doc))
    _fails(
        capsys,
        ["run", demo_copy, "--run", "r"],
        "model_6b_l1c.onnx",
        "expects 6 input channels but model.input_bands gives 5",
    )
    assert "export" not in _published(tmp_path)


def test_patch_size_not_matching_a_fixed_size_model(tmp_path, demo_copy, capsys):
    doc = yaml.safe_load(demo_copy.read_text())
    doc["grid"]["kernel_size"] = [32, 32]
    demo_copy.write_text(yaml.safe_dump(doc))
    _fails(capsys, ["run", demo_copy, "--run", "r"], "expects patches of 256×256", "224×224")


def test_corrupted_tfrecord_names_file_and_offset(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    shard = tmp_path / "ws" / "r" / "export" / "tiny-00001.tfrecord.gz"
    data = bytearray(gzip.decompress(shard.read_bytes()))
    data[100] ^= 0x55
    shard.write_bytes(gzip.compress(bytes(data)))
    _fails(capsys, ["predict", config, "--run", "r"], str(shard), "CRC mismatch in record at byte 0")
    assert "predict" not in _published(tmp_path)


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_mixer_record_count_mismatch(tmp_path, tiny_pipeline, capsys, keep_manifest):
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    export = tmp_path / "ws" / "r" / "export"
    mixer = json.loads((export / "tiny-mixer.json").read_text())
    mixer["totalPatches"] += 1
    (export / "tiny-mixer.json").write_text(json.dumps(mixer))
    if not keep_manifest:  # an Earth Engine export has no manifest: the count is checked while reading
        (export / "tiny-manifest.json").unlink()
    _fails(
        capsys, ["predict", config, "--run", "r"], "tiny-mixer.json", f"totalPatches={mixer['totalPatches']}"
    )
    assert "predict" not in _published(tmp_path)
    assert not [p for p in (tmp_path / "ws" / "r").iterdir() if "staging" in p.name]


def test_unwritable_workspace(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    doc = copy.deepcopy(document)
    doc["workspace"] = str(blocker / "ws")
    _fails(capsys, ["run", write(doc), "--run", "r"], str(blocker / "ws"), "not writable")


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("export", "max_file_size"), -1, "export.max_file_size = -1: Input should be greater than 0"),
        (("grid", "kernel_size"), [3, 4], "grid.kernel_size = [3, 4]: kernel_size [3, 4] must be even"),
        (("model", "batch_size"), "many", 'model.batch_size = "many": Input should be a valid integer'),
        (("source", "derived"), {"ndvi": "(nir - rde) / (nir + red)"}, "unknown band(s) ['rde']"),
        (("source", "resampling"), "fancy", "source.resampling = \"fancy\": Input should be 'nearest'"),
    ],
)
def test_invalid_config_names_field_value_and_expectation(tiny_pipeline, capsys, path, value, fragment):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc[path[0]][path[1]] = value
    err = _fails(capsys, ["validate", write(doc)], "tiny.yaml: ", fragment)
    assert len(err.strip().splitlines()) == 1  # one problem, one line


def test_unknown_field_is_rejected(tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["model"]["bacth_size"] = 3
    _fails(capsys, ["validate", write(doc)], "model.bacth_size = 3: Extra inputs are not permitted")
