"""`terrabeam plan` and the limits `run` enforces: exact counts against real runs, the JSON document,
and a 200 000 × 200 000 px region planned from metadata and refused without --yes."""

from __future__ import annotations

import json
import math
import time

import pytest
import rasterio
import yaml
from affine import Affine

from terrabeam.cli import main
from terrabeam.config import load_config
from terrabeam.errors import InputError
from terrabeam.layout import list_shards
from terrabeam.plan import LIST_PRICES, PRICES_AS_OF, check_limits, make_plan
from terrabeam.tfrecord import count_records

HUGE = 200_000


def test_demo_plan_counts_and_json(demo_copy, capsys):
    """Real data: the demo scene (768 × 384 px at 20 m) in patches of 192 px; the calibration reads,
    predicts and encodes real patches with the real U-Net."""
    assert main(["plan", str(demo_copy), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout
    assert plan["region_pixels"] == [768, 384]
    assert (plan["patches_per_row"], plan["patch_rows"], plan["patches"]) == (4, 2, 8)
    assert plan["tiles"] == 1 and plan["shards"] == [] and plan["steps"] == ["map"]
    calibration = plan["calibration"]
    assert calibration["patches"] == 8 and calibration["model"] > 0 and calibration["read"] > 0
    assert 0 < calibration["compression_ratio"] < 1  # the COGs are compressed
    assert plan["seconds"] > calibration["model_load"] + 8 * calibration["model"]
    assert plan["bytes_read"] > 768 * 384 * 6 * 2  # six uint16 bands at least once
    assert plan["over_limits"] == [] and plan["dataflow"] is None


def test_plan_matches_a_real_run(tiny_pipeline, tmp_path, capsys):
    """Synthetic scene (70 × 50 px) with tiles of 2 × 2 patches and prediction shards: the plan's
    patches, tiles and shards are what the run then writes."""
    document, write = tiny_pipeline
    document["outputs"] |= {"tile_size": 64, "tfrecord": True}
    config_path = write()
    config = load_config(config_path)
    plan = make_plan(config, calibrate_here=False)
    assert main(["-q", "run", str(config_path), "--run", "r"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "ws" / "r" / "summary.json").read_text())
    assert plan.patches == summary["patches"] == math.ceil(70 / 32) * math.ceil(50 / 16)
    assert plan.tiles == summary["steps"]["map"]["tiles"]
    shards = list_shards(tmp_path / "ws" / "r" / "deliver", config.predict.prefix)
    (predictions,) = plan.shards
    assert predictions.count == len(shards) > 1
    assert all(path.stat().st_size <= predictions.bytes_per_shard for path in shards)
    assert plan.seconds is None and plan.calibration is None


def test_export_shards_exact(tiny_pipeline, tmp_path, capsys):
    """Synthetic scene: the export's shard count (records sized exactly) is what `export` writes."""
    _, write = tiny_pipeline
    config_path = write()
    plan = make_plan(load_config(config_path), calibrate_here=False)
    assert main(["export", str(config_path), "--run", "e"]) == 0
    capsys.readouterr()
    written = list_shards(tmp_path / "ws" / "e" / "export", "tiny")
    export_plan = plan_for_export(config_path)
    assert export_plan.count == len(written) > 1
    assert (
        plan.patches
        == sum(count_records(path) for path in written)
        == math.ceil(70 / 32) * math.ceil(50 / 16)
    )


def plan_for_export(config_path):
    """The export shards of the same config with an Earth Engine sink (export → predict → deliver)."""
    document = yaml.safe_load(config_path.read_text())
    document["outputs"]["earthengine"] = {"collection": "projects/p/assets/c"}
    document["earthengine"] = {"project": "p", "staging": "gs://bucket/staging"}
    path = config_path.with_name("ee.yaml")
    path.write_text(yaml.safe_dump(document))
    plan = make_plan(load_config(path), calibrate_here=False)
    assert plan.steps == ["export", "predict", "deliver"]
    export, predictions = plan.shards
    assert (export.kind, predictions.kind, predictions.count) == ("export", "predictions", export.count)
    return export


@pytest.fixture
def huge_region(tmp_path) -> tuple[dict, callable]:
    """A synthetic 200 000 × 200 000 px band at 20 m: a sparse GeoTIFF (no block written, a few KiB),
    so nothing but its metadata can be read quickly; the model file does not exist, so a run that
    got past the limits would fail at once instead of working."""
    path = tmp_path / "huge.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=HUGE,
        height=HUGE,
        count=1,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(20, 0, 300000, 0, -20, 6000000),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        sparse_ok=True,
        nodata=0,
    ):
        pass
    assert path.stat().st_size < 2**24
    document = {
        "name": "huge",
        "workspace": str(tmp_path / "ws"),
        "source": {"bands": {"red": {"path": str(path)}}},
        "grid": {"patch_size": [192, 192], "kernel_size": [64, 64]},
        "model": {"path": str(tmp_path / "missing.onnx"), "input_bands": ["red"], "classes": ["a", "b"]},
        "runner": {
            "kind": "dataflow",
            "project": "p",
            "region": "us-central1",
            "temp_location": "gs://b/tmp",
            "machine_type": "n1-standard-4",
            "max_workers": 50,
        },
    }

    def write(doc: dict) -> str:
        config = tmp_path / "huge.yaml"
        config.write_text(yaml.safe_dump(doc))
        return str(config)

    return document, write


def test_huge_region_planned_quickly_and_refused(huge_region, capsys):
    document, write = huge_region
    config = write(document)
    started = time.perf_counter()
    assert main(["plan", config, "--json", "--no-calibrate"]) == 0
    assert time.perf_counter() - started < 10  # metadata only
    plan = json.loads(capsys.readouterr().out)
    per_side = math.ceil(HUGE / 192)
    assert plan["patches"] == per_side * per_side == 1_085_764
    assert plan["pixels"] == HUGE * HUGE
    assert plan["over_limits"] == ["1,085,764 patches > limits.max_patches 100,000"]
    dataflow = plan["dataflow"]
    assert dataflow["machine_type"] == "n1-standard-4"
    assert dataflow["usd_per_worker_hour"] == LIST_PRICES["n1-standard-4"]
    assert PRICES_AS_OF in dataflow["price_source"] and "stale" in dataflow["price_source"]
    assert dataflow["worker_hours"] is None  # nothing timed without calibration

    assert main(["run", config]) == 1
    error = capsys.readouterr().err
    assert error.startswith("terrabeam: error: ") and error.count("\n") == 1
    assert "1,085,764 patches > limits.max_patches 100,000" in error and "--yes" in error
    with pytest.raises(InputError, match="200,000 × 200,000 px"):
        check_limits(load_config(config), confirmed=False)
    check_limits(load_config(config), confirmed=True)  # --yes: no plan, no refusal


def test_schedule_refused_too(huge_region, capsys):
    """Synthetic: a scheduled pipeline over the limits is refused once, before any window runs."""
    document, write = huge_region
    document["schedule"] = {"cron": "0 6 1 * *", "start": "2024-01-01"}
    assert main(["schedule", write(document), "--once"]) == 1
    assert "limits.max_patches" in capsys.readouterr().err


def test_limits_from_the_config(huge_region, capsys):
    """Synthetic: limits are the config's; null lifts one; scratch has its own limit."""
    document, write = huge_region
    document["limits"] = {"max_patches": None, "max_scratch_bytes": 1000}
    config = load_config(write(document))
    plan = make_plan(config, calibrate_here=False)
    assert len(plan.over_limits) == 1 and "limits.max_scratch_bytes 1000 B" in plan.over_limits[0]
    document["limits"] = {"max_patches": None, "max_scratch_bytes": None}
    assert make_plan(load_config(write(document)), calibrate_here=False).over_limits == []
    # the limits do not change what a run makes: same config hash, so a run resumes after raising one
    assert load_config(write(document)).fingerprint() == config.fingerprint()


def test_dataflow_cost_from_the_price_table(huge_region, monkeypatch):
    """Synthetic timing: worker-hours = core-seconds per patch over a worker's vCPUs, plus starts;
    the config's price table wins over the list prices."""
    import terrabeam.plan as plan_module

    document, write = huge_region
    document["plan"] = {"prices": {"n1-standard-4": 0.5}}
    config = load_config(write(document))
    calibration = plan_module.Calibration(8, 0.01, 0.02, 0.0, 0.01, 1.0, 0.5, 2**30, 2, "onnxruntime", "cpu")
    cost = plan_module._dataflow_cost(config, 1_000_000, calibration)
    expected = (1_000_000 * 0.04 * 2 / 4 + 50 * plan_module.WORKER_START_SECONDS) / 3600
    assert cost.worker_hours == pytest.approx(expected, rel=1e-3)
    assert cost.usd == pytest.approx(expected * 0.5, abs=0.01)
    assert cost.hours == pytest.approx(expected / 50, rel=1e-2)
    assert cost.price_source == "plan.prices in the config"


def test_bad_price_names_its_field(huge_region, capsys):
    document, write = huge_region
    document["plan"] = {"prices": {"n1-standard-4": 0}}
    assert main(["plan", write(document), "--no-calibrate"]) == 1
    assert "plan.prices" in capsys.readouterr().err
