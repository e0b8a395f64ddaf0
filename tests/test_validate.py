"""`terrabeam validate` reports everything `run` would reject, at once, one line per problem naming
its field: bands opened (metadata only), the grid resolved, the model probed. Synthetic scene and
1×1-conv model (tiny_pipeline), through the installed command."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest


def _terrabeam(*args):
    return subprocess.run(
        [sys.executable, "-m", "terrabeam", *map(str, args)], capture_output=True, text=True
    )


def _problems(result) -> list[str]:
    """The problem lines under the heading of a failed validate."""
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    heading, *lines = result.stderr.strip().splitlines()
    assert heading.startswith("terrabeam: error: ")
    assert all(line.startswith("  ") for line in lines), result.stderr
    return [line.strip() for line in lines]


def test_every_problem_of_bands_grid_and_region_at_once(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    bands = doc["source"]["bands"]
    bands["green"]["path"] = str(tmp_path / "absent.tif")
    (tmp_path / "notes.tif").write_text("not a raster\n")
    bands["nir"]["path"] = str(tmp_path / "notes.tif")
    bands["swir"] = {"path": bands["red"]["path"], "band": 2}  # red.tif has one band
    doc["grid"]["region"] = {"bbox": [100000, 100000, 100500, 100500]}  # far from the scene
    config = write(doc)
    result = _terrabeam("validate", config)
    assert f"{config}: 4 problem(s) run would reject" in result.stderr
    problems = _problems(result)
    assert problems[0].startswith("source.bands.green.path: file not found")
    assert problems[1].startswith("source.bands.nir.path: cannot read") and "notes.tif" in problems[1]
    assert problems[2].startswith("source.bands.swir.band = 2:") and "has only 1 band" in problems[2]
    assert problems[3].startswith("source.bands.red.path:") and "does not overlap the region" in problems[3]
    assert len(problems) == 4


@pytest.mark.parametrize("crs", ["EPSG:99999", "UTM33"])
def test_an_unknown_crs_names_the_field_in_validate_and_in_run(tiny_pipeline, crs):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["grid"]["crs"] = crs
    config = write(doc)
    for command in ("validate", "run"):
        result = _terrabeam(command, config)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()  # no PROJ or GDAL chatter around it
        assert line.startswith(f"terrabeam: error: {config}: grid.crs: {crs} is not a known CRS")
        assert "CRSError" not in result.stderr


def test_a_grid_crs_without_resolution(tiny_pipeline):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["grid"]["crs"] = "EPSG:4326"
    (problem,) = _problems(_terrabeam("validate", write(doc)))
    assert problem.startswith("grid.resolution is required: grid.crs EPSG:4326 differs")


def test_a_model_problem_is_listed_with_the_others(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["source"]["bands"]["green"]["path"] = str(tmp_path / "absent.tif")
    doc["model"]["path"] = str(tmp_path / "absent.onnx")
    problems = _problems(_terrabeam("validate", write(doc)))
    assert [p.split(":")[0] for p in problems] == ["source.bands.green.path", "model.path"]


def test_a_runnable_config_is_valid(tiny_pipeline):
    document, write = tiny_pipeline
    config = write()
    result = _terrabeam("validate", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: valid")
