"""A scheduled pipeline on a real STAC API (stac-fastapi-pgstac over PostgreSQL + pgstac, started on
127.0.0.1 by tests/stac_services.py) whose Items' assets are served over HTTP from 127.0.0.1 and read
by GDAL through /vsicurl/: the demo Sentinel-2 scene's SWIR bands as one Item (16 Feb 2017) and a
second date made from them (10 Apr 2017, reflectance × 0.8). Monthly windows: February has the
scene (its map equals the raster source's on the same files), March has nothing (no data, nothing
delivered, looked at again with schedule.wait_for_data), April has the second date."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from conftest import write_conv_model
from rasterio.warp import transform_geom
from stac_services import load
from test_stac_out import _read, offline_validator

from terrabeam.cli import main
from terrabeam.config import load_config
from terrabeam.workflow.runner import Runner
from terrabeam.workflow.schedule import Scheduler
from terrabeam.workflow.state import RunState

pytestmark = pytest.mark.integration

SCENE = "T33UUU_20170216T102101"
COLLECTION = "terrabeam-s2-swir"
REGION = [332000, 5816000, 338400, 5820000]  # UTM 33N, inside the scene: 320 × 200 px at 20 m


def _item(item_id: str, when: str, files: dict[str, Path], url: str) -> dict:
    with rasterio.open(next(iter(files.values()))) as ds:
        left, bottom, right, top = ds.bounds
        ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
        geometry = transform_geom(ds.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    lons, lats = zip(*geometry["coordinates"][0], strict=True)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": geometry,
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": {"datetime": when, "eo:cloud_cover": 30},
        "links": [],
        "assets": {key: {"href": f"{url}/{path.name}", "roles": ["data"]} for key, path in files.items()},
    }


@pytest.fixture(scope="module")
def api(stac_api, asset_server, demo_data, tmp_path_factory) -> str:
    scene = demo_data / "s2l1c"
    first = {band: scene / f"{SCENE}_{band}.jp2" for band in ("B11", "B12")}
    later = tmp_path_factory.mktemp("later")
    second = {}
    for band, path in first.items():  # a second date made from the scene: 80 % of its reflectance
        with rasterio.open(path) as ds:
            profile = ds.profile | {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256}
            pixels = (ds.read() * 0.8).astype(np.uint16)
        second[band] = later / f"T33UUU_20170410_{band}.tif"
        with rasterio.open(second[band], "w", **profile) as out:
            out.write(pixels)
    items = [
        _item("S2_T33UUU_20170216", "2017-02-16T10:21:01Z", first, asset_server(scene)),
        _item("S2_T33UUU_20170410", "2017-04-10T10:20:00Z", second, asset_server(later)),
    ]
    collection = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": COLLECTION,
        "description": "SWIR bands of the demo Sentinel-2 scene and a date made from them",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [items[0]["bbox"]]},
            "temporal": {"interval": [["2017-02-16T10:21:01Z", "2017-04-10T10:20:00Z"]]},
        },
        "links": [],
    }
    load(stac_api, collection, items)
    return stac_api


def _document(tmp_path: Path, api: str) -> dict:
    write_conv_model(tmp_path / "conv.onnx")
    return {
        "name": "swir",
        "workspace": str(tmp_path / "ws"),
        "source": {
            "kind": "stac",
            "api": api,
            "collections": [COLLECTION],
            "query": {"eo:cloud_cover": {"lt": 50}},
            "bands": {
                "swir16": {"asset": "B11", "scale": 1e-4},
                "swir22": {"asset": "B12", "scale": 1e-4},
            },
            "resampling": "nearest",
        },
        "grid": {
            "crs": "EPSG:32633",
            "resolution": 20,
            "region": {"bbox": REGION},
            "patch_size": [64, 48],
            "kernel_size": [4, 4],
        },
        "model": {
            "path": str(tmp_path / "conv.onnx"),
            "input_bands": ["swir16", "swir22"],
            "output": "probabilities",
            "classes": ["a", "b"],
        },
        "outputs": {"quicklook": False},
        "schedule": {
            "cron": "0 0 1 * *",
            "start": "2017-02-01T00:00:00Z",
            "catch_up": "all",
            "wait_for_data": True,
        },
    }


def _runs(tmp_path: Path) -> dict[str, object]:
    state = RunState(tmp_path / "ws" / "terrabeam.db")
    try:
        return {r.window_start[:10]: r for r in state.list_runs()}
    finally:
        state.close()


def test_scheduled_windows_on_a_real_stac_api(api, tmp_path, demo_data):
    document = _document(tmp_path, api)
    path = tmp_path / "swir.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    runner = Runner(config, tmp_path / "ws")
    clock = [datetime(2017, 4, 2, tzinfo=UTC)]
    scheduler = Scheduler(config, tmp_path / "ws", lambda w: runner.run(None, w), clock=lambda: clock[0])

    assert len(scheduler.run_due()) == 2  # February and March
    runs = _runs(tmp_path)
    february, march = runs["2017-02-01"], runs["2017-03-01"]
    assert february.status == "done" and march.status == "no_data"
    assert "no STAC Items" in march.error
    assert not (tmp_path / "ws" / march.id / "deliver").exists()

    # February's map is the raster source's on the same files (read locally, same grid)
    raster = document | {
        "source": {
            "bands": {
                "swir16": {"path": str(demo_data / "s2l1c" / f"{SCENE}_B11.jp2"), "scale": 1e-4},
                "swir22": {"path": str(demo_data / "s2l1c" / f"{SCENE}_B12.jp2"), "scale": 1e-4},
            },
            "resampling": "nearest",
        },
        "workspace": str(tmp_path / "ws-raster"),
        "grid": document["grid"] | {"align": "origin"},
    }
    del raster["schedule"]
    (tmp_path / "raster.yaml").write_text(yaml.safe_dump(raster))
    assert main(["run", str(tmp_path / "raster.yaml"), "--run", "r"]) == 0
    feb_map = tmp_path / "ws" / february.id / "deliver" / "swir-probabilities.tif"
    with (
        rasterio.open(feb_map) as a,
        rasterio.open(tmp_path / "ws-raster" / "r" / "deliver" / "swir-probabilities.tif") as b,
    ):
        assert (a.width, a.height) == (320, 200) and a.transform == b.transform
        feb_pixels = a.read()
        np.testing.assert_array_equal(feb_pixels, b.read())

    # the run records the Items it used; its STAC Item links them and validates
    summary = json.loads((tmp_path / "ws" / february.id / "summary.json").read_text())
    assert summary["steps"]["map"]["source_items"] == ["S2_T33UUU_20170216"]
    item = _read(tmp_path / "ws" / february.id / "deliver" / "swir.item.json")
    assert item.validate(validator=offline_validator())
    sources = [link.href for link in item.links if link.rel == "derived_from" and "collections" in link.href]
    assert sources == [f"{api}/collections/{COLLECTION}/items/S2_T33UUU_20170216"]
    assert item.properties["start_datetime"] == "2017-02-01T00:00:00Z"

    # a month later: March is looked at again (wait_for_data), April has the second date
    clock[0] = datetime(2017, 5, 2, tzinfo=UTC)
    assert [w[0][:10] for w in scheduler.run_due()] == ["2017-03-01", "2017-04-01"]
    runs = _runs(tmp_path)
    assert runs["2017-03-01"].status == "no_data" and runs["2017-04-01"].status == "done"
    april = tmp_path / "ws" / runs["2017-04-01"].id
    assert json.loads((april / "summary.json").read_text())["steps"]["map"]["source_items"] == [
        "S2_T33UUU_20170410"
    ]
    with rasterio.open(april / "deliver" / "swir-probabilities.tif") as ds:
        assert not np.array_equal(ds.read(), feb_pixels)  # new imagery, a new map


def test_outputs_stac_posts_the_map_item_to_the_api(stac_api, tiny_pipeline, tmp_path):
    """outputs.stac: the run's map Item lands in the API's collection (created on first use) with
    absolute asset hrefs; posting it again replaces it."""
    from pystac_client import Client

    from terrabeam.sinks.stac_items import post_item

    document, write = tiny_pipeline
    document["outputs"]["stac"] = {"api": stac_api, "collection": "terrabeam-maps"}
    assert main(["run", str(write(document)), "--run", "p1"]) == 0
    deliver = tmp_path / "ws" / "p1" / "deliver"
    summary = json.loads((tmp_path / "ws" / "p1" / "summary.json").read_text())
    url = summary["steps"]["map"]["stac_item"]
    assert url == f"{stac_api}/collections/terrabeam-maps/items/tiny-p1"
    [found] = Client.open(stac_api).search(collections=["terrabeam-maps"], ids=["tiny-p1"]).items()
    assert found.properties["terrabeam:run"] == "p1"
    assert found.assets["classes"].href == (deliver / "tiny-classes.tif").as_uri()
    assert post_item(stac_api, "terrabeam-maps", deliver / "tiny.item.json", str(deliver)) == url
