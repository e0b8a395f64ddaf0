"""The ready configs in examples/ stay valid against the models they name (real demo data)."""

from __future__ import annotations

import sys

import pytest

from terrabeam.cli import main

EXAMPLES = __import__("conftest").REPO / "examples"


def test_landcover_example_validates_with_its_keras_model(tmp_path, demo_data, capsys):
    pytest.importorskip("keras")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from build_landcover_dnn import CLASSES, build_model
    finally:
        sys.path.remove(str(EXAMPLES))
    model_path = tmp_path / "landcover-dnn.keras"
    build_model().save(model_path)
    config = tmp_path / "landcover.yaml"
    config.write_text(
        (EXAMPLES / "sentinel2-landcover-dnn.yaml")
        .read_text()
        .replace("../data/demo", str(demo_data))
        .replace("../data/examples/landcover-dnn.keras", str(model_path))
    )
    assert main(["validate", str(config)]) == 0, capsys.readouterr().err
    assert f"classes: [{', '.join(CLASSES)}]" in config.read_text()


def test_cloudmask_demo_validates(demo_copy, capsys):
    assert main(["validate", str(demo_copy)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["stac-earth-search.yaml", "stac-planetary-computer.yaml"])
def test_stac_examples_are_valid_configs(name):
    """The STAC walkthrough's configs load (the services they name are not reachable here)."""
    from terrabeam.config import load_config
    from terrabeam.region import stated_grid

    config = load_config(EXAMPLES / name)
    assert config.source.kind == "stac" and config.schedule is not None
    grid, region = stated_grid(config)
    assert region.width > 0 and grid.crs == config.grid.crs
