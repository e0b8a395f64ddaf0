"""The STAC source on a static catalog of synthetic Items (pystac, local files): the search by
window, region and query, per-Item masks, the reducers, and a whole run whose map equals the
raster source's on the same file. The real STAC API server: tests/test_stac_api_run.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import yaml
from affine import Affine
from conftest import write_conv_model, write_raster
from PIL import Image

from terrabeam.cli import main
from terrabeam.config import load_config
from terrabeam.errors import InputError
from terrabeam.region import stated_grid
from terrabeam.sources.stac import StacPatchReader, search_items

TRANSFORM = Affine(10, 0, 400000, 0, -10, 5600000)  # UTM 33N, 10 m
SHAPE = (50, 70)
REGION = [400050, 5599550, 400650, 5599950]  # UTM, inside the 700 m × 500 m rasters


def _item(folder: Path, name: str, when: str, red: np.ndarray, scl: np.ndarray, cloud: float) -> pystac.Item:
    red_path = write_raster(folder / f"{name}-red.tif", red.astype(np.uint16), TRANSFORM)
    scl_path = write_raster(folder / f"{name}-scl.tif", scl.astype(np.uint8), TRANSFORM)
    item = pystac.Item(
        name,
        {
            "type": "Polygon",
            "coordinates": [[[13.58, 50.53], [13.61, 50.53], [13.61, 50.55], [13.58, 50.55], [13.58, 50.53]]],
        },
        [13.58, 50.53, 13.61, 50.55],
        datetime.fromisoformat(when).replace(tzinfo=UTC),
        {"eo:cloud_cover": cloud},
    )
    item.add_asset("red", pystac.Asset(str(red_path), media_type=pystac.MediaType.GEOTIFF))
    item.add_asset("scl", pystac.Asset(str(scl_path), media_type=pystac.MediaType.GEOTIFF))
    return item


@pytest.fixture
def catalog(tmp_path) -> Path:
    """Synthetic: three dates with constant red 1000, 2000, 3000; the second date's SCL marks the
    left half as cloud (9); the third is 80 % cloudy by its metadata."""
    folder = tmp_path / "catalog"
    folder.mkdir()
    clear, half = np.full(SHAPE, 4), np.full(SHAPE, 4)
    half[:, :35] = 9
    root = pystac.Catalog("synthetic", "three dates over one place")
    for name, when, value, scl, cloud in (
        ("d1", "2024-05-02T10:00:00", 1000, clear, 10.0),
        ("d2", "2024-05-12T10:00:00", 2000, half, 20.0),
        ("d3", "2024-05-22T10:00:00", 3000, clear, 80.0),
    ):
        root.add_item(_item(folder, name, when, np.full(SHAPE, value), scl, cloud))
    root.normalize_and_save(str(folder / "stac"), pystac.CatalogType.SELF_CONTAINED)
    return folder / "stac" / "catalog.json"


def _config(tmp_path, catalog, **source) -> Path:
    write_conv_model(tmp_path / "model.onnx", channels=1, outputs=2, kernel=1)
    document = {
        "name": "stacky",
        "workspace": str(tmp_path / "ws"),
        "source": {
            "kind": "stac",
            "catalog": str(catalog),
            "bands": {"red": {"asset": "red", "scale": 1e-4}},
            "mask": {"asset": "scl", "classes": [3, 8, 9, 10]},
        }
        | source,
        "grid": {
            "crs": "EPSG:32633",
            "resolution": 10,
            "region": {"bbox": REGION},
            "patch_size": [32, 16],
            "kernel_size": [4, 4],
        },
        "model": {"path": str(tmp_path / "model.onnx"), "input_bands": ["red"], "classes": ["a", "b"]},
        "outputs": {"quicklook": False},
    }
    path = tmp_path / "stacky.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _composite(config_path: Path, window) -> np.ndarray:
    config = load_config(config_path)
    grid, region = stated_grid(config)
    items = search_items(config, window)
    reader = StacPatchReader(config, grid, config.grid.kernel_size, items)
    try:
        [(_, patch)] = reader.read_block(0, 0, 1)
    finally:
        reader.close()
    return patch["red"]


def test_search_by_window_and_query(tmp_path, catalog):
    config = load_config(_config(tmp_path, catalog))
    assert [i.id for i in search_items(config, ("2024-05-01", "2024-06-01"))] == ["d3", "d2", "d1"]
    assert [i.id for i in search_items(config, ("2024-05-10", "2024-05-22"))] == ["d2"]  # end exclusive
    assert search_items(config, ("2025-01-01", "2025-02-01")) == []
    clear = load_config(_config(tmp_path, catalog, query={"eo:cloud_cover": {"lt": 50}}))
    assert [i.id for i in search_items(clear, None)] == ["d2", "d1"]
    for item in search_items(config, None):
        assert Path(item.bands["red"][0]).exists() and item.bands["red"][1] == 1 and Path(item.mask).exists()


@pytest.mark.parametrize(
    ("reducer", "left", "right"),
    [
        ("median", 2000, 2000),  # left: d1, d3 (d2 is cloud there) → 2000; right: 1000, 2000, 3000
        ("mean", 2000, 2000),
        ("first", 1000, 1000),  # the earliest valid
        ("latest", 3000, 3000),  # the newest valid
    ],
)
def test_reducers_leave_masked_pixels_out(tmp_path, catalog, reducer, left, right):
    red = _composite(_config(tmp_path, catalog, reducer=reducer), ("2024-05-01", "2024-06-01"))
    assert red.shape == (16 + 4, 32 + 4)
    np.testing.assert_allclose(red[:, :2], left * 1e-4, rtol=1e-6)  # grid's left edge: cloudy in d2
    if reducer == "median":  # only d2 (cloudy left half) in the window: the left is no data (fill 0)
        only_d2 = _composite(_config(tmp_path, catalog, reducer=reducer), ("2024-05-10", "2024-05-20"))
        assert only_d2[:, :2].max() == 0 and only_d2[:, -2:].min() == pytest.approx(0.2)
    np.testing.assert_allclose(red[:, -2:], right * 1e-4, rtol=1e-6)


def test_a_run_equals_the_raster_source_on_the_same_file(tmp_path, catalog):
    """One Item in the window, no mask: the STAC run's map is the raster run's, pixel for pixel."""
    stac = _config(tmp_path, catalog, mask=None)
    assert main(["run", str(stac), "--run", "s", "--window", "2024-05-01/2024-05-10"]) == 0
    document = yaml.safe_load(stac.read_text())
    red = catalog.parent.parent / "d1-red.tif"  # the file the Item's asset points at
    document["source"] = {"bands": {"red": {"path": str(red), "scale": 1e-4}}}
    document["grid"]["align"] = "origin"
    raster = tmp_path / "raster.yaml"
    raster.write_text(yaml.safe_dump(document))
    assert main(["run", str(raster), "--run", "r"]) == 0
    for layer in ("classes", "probabilities"):
        runs = (tmp_path / "ws" / run / "deliver" / f"stacky-{layer}.tif" for run in ("s", "r"))
        with rasterio.open(next(runs)) as a, rasterio.open(next(runs)) as b:
            assert a.transform == b.transform and a.shape == b.shape
            np.testing.assert_array_equal(a.read(), b.read())
    summary = yaml.safe_load((tmp_path / "ws" / "s" / "summary.json").read_text())
    assert summary["steps"]["map"]["source_items"] == ["d1"]


def test_quicklook_shows_the_items_like_the_raster_source(tmp_path, catalog):
    """The quicklook's imagery of a STAC run is its Items' (here one), as the raster source's of
    the same file: the two PNGs differ only in the title line (run id, window)."""
    stac = _config(tmp_path, catalog, mask=None)
    document = yaml.safe_load(stac.read_text())
    document["outputs"] = {"quicklook": True, "quicklook_rgb": ["red", "red", "red"]}
    stac.write_text(yaml.safe_dump(document))
    assert main(["run", str(stac), "--run", "s", "--window", "2024-05-01/2024-05-10"]) == 0
    document["source"] = {
        "bands": {"red": {"path": str(catalog.parent.parent / "d1-red.tif"), "scale": 1e-4}}
    }
    document["grid"]["align"] = "origin"
    raster = tmp_path / "raster.yaml"
    raster.write_text(yaml.safe_dump(document))
    assert main(["run", str(raster), "--run", "r"]) == 0
    stac_png, raster_png = (
        np.asarray(Image.open(tmp_path / "ws" / run / "deliver" / "stacky-quicklook.png"))
        for run in ("s", "r")
    )
    assert stac_png.shape == raster_png.shape
    rows = np.flatnonzero((stac_png != raster_png).any(axis=(1, 2)))
    assert rows.size and rows.max() < 24  # the title line only
    no_imagery = tmp_path / "plain.yaml"
    document["outputs"] = {"quicklook": True}  # no RGB bands: the classes alone, fully opaque
    no_imagery.write_text(yaml.safe_dump(document))
    assert main(["run", str(no_imagery), "--run", "p"]) == 0
    plain = np.asarray(Image.open(tmp_path / "ws" / "p" / "deliver" / "stacky-quicklook.png"))
    assert plain.shape == stac_png.shape and (plain[30:-30] != stac_png[30:-30]).any()


def test_a_window_without_items_is_no_data(tmp_path, catalog, capsys):
    assert (
        main(["run", str(_config(tmp_path, catalog)), "--run", "e", "--window", "2025-01-01/2025-02-01"]) == 0
    )
    assert "run e: no data" in capsys.readouterr().out
    assert not (tmp_path / "ws" / "e" / "deliver").exists()
    assert main(["status", "e", "--workspace", str(tmp_path / "ws"), "--json"]) == 0
    assert '"no_data"' in capsys.readouterr().out


def test_missing_asset_names_the_item(tmp_path, catalog):
    config = load_config(_config(tmp_path, catalog, bands={"red": {"asset": "B04"}}))
    with pytest.raises(InputError, match=r"STAC Item d3: missing asset 'B04' \(assets: \['red', 'scl'\]\)"):
        search_items(config, None)


def test_bands_by_common_name(tmp_path, catalog):
    """eo:bands (STAC 1.0) or bands with eo:common_name (1.1) on the assets name the bands."""
    for path in sorted(catalog.parent.rglob("d*.json")):
        item = pystac.Item.from_file(str(path))
        item.assets["red"].extra_fields["eo:bands"] = [{"name": "B04", "common_name": "red"}]
        item.assets["scl"].extra_fields["bands"] = [{"name": "SCL"}]
        item.save_object(include_self_link=False, dest_href=str(path))
    config = load_config(_config(tmp_path, catalog, bands={"red": {"common_name": "red", "scale": 1e-4}}))
    [item] = search_items(config, ("2024-05-01", "2024-05-10"))
    assert item.bands["red"] == (str(catalog.parent.parent / "d1-red.tif"), 1)
    missing = load_config(_config(tmp_path, catalog, bands={"red": {"common_name": "coastal"}}))
    with pytest.raises(InputError, match="missing a band with common name 'coastal'"):
        search_items(missing, None)


def test_without_wait_for_data_a_window_without_items_is_closed(tmp_path, catalog):
    """A monthly schedule over the catalog: June 2024 has no Items; without schedule.wait_for_data
    the scheduler does not look at it again."""
    from terrabeam.workflow.runner import Runner
    from terrabeam.workflow.schedule import Scheduler

    path = _config(tmp_path, catalog)
    document = yaml.safe_load(path.read_text())
    document["schedule"] = {"cron": "0 0 1 * *", "start": "2024-05-01T00:00:00Z", "catch_up": "all"}
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    runner = Runner(config, tmp_path / "ws")
    clock = [datetime(2024, 7, 2, tzinfo=UTC)]
    scheduler = Scheduler(config, tmp_path / "ws", lambda w: runner.run(None, w), clock=lambda: clock[0])
    assert [w[0][:7] for w in scheduler.run_due()] == ["2024-05", "2024-06"]
    statuses = {r.window_start[:7]: r.status for r in runner.state().list_runs()}
    assert statuses == {"2024-05": "done", "2024-06": "no_data"}
    assert scheduler.run_due() == []  # June stays closed
