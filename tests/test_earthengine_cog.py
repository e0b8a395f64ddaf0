"""COG-backed Earth Engine images (``outputs.earthengine.mode: cog``, the default) through the real
earthengine-api against the 127.0.0.1 playback (``image:importExternal``) and the Cloud Storage
emulator: the COGs meet Earth Engine's rules (checked with rasterio / rio-cogeo), are uploaded once
and pinned by generation, and hold the map's pixels. The exported patches are synthetic (the
``services`` fixture of test_earthengine.py); nothing here reached Google."""

# ruff: noqa: F811  (the fixtures imported from test_earthengine are parameters of the tests)
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from test_earthengine import PROJECT, WINDOW, _config, gcs, services  # noqa: F401 (fixtures)

from terrabeam.cli import main
from terrabeam.earthengine import EarthEngineError
from terrabeam.sinks.earthengine_cog import cog_rule_violations, upload_pinned

COLLECTION = f"projects/{PROJECT}/assets/terrabeam/landcover"
FOLDER = "staging/ee-landcover/r1/cog"


def _cog_config(tmp_path, playback, **outputs):
    return _config(
        tmp_path, playback, outputs={"earthengine": {"collection": COLLECTION}, "quicklook": False, **outputs}
    )


def test_a_small_map_is_one_cog_backed_image_pinned_by_generation(tmp_path, services, gcs):
    playback = services
    config = _cog_config(tmp_path, playback)
    assert main(["run", str(config), "--run", "r1", "--window", WINDOW]) == 0
    assert not [r for r in playback.requests if r.path.endswith("/image:import")]  # no ingestion task
    (request,) = playback.calls("POST", "/image:importExternal")
    assert request.body["overwrite"] is False
    manifest = request.body["imageManifest"]
    assert manifest["name"] == f"{COLLECTION}/ee-landcover_20250201"
    bands = ["class", "prob_water", "prob_land"]
    assert [t["id"] for t in manifest["tilesets"]] == bands  # one single-band COG per band
    for tileset in manifest["tilesets"]:
        (uri,) = tileset["sources"][0]["uris"]
        name = f"{FOLDER}/ee-landcover-{tileset['id']}.tif"
        assert uri == f"gs://terrabeam-test/{name}#{gcs.get_blob(name).generation}"
    assert manifest["bands"] == [
        {"id": "class", "tilesetId": "class", "tilesetBandIndex": 0, "pyramidingPolicy": "MODE",
         "missingData": {"values": [255]}},
        {"id": "prob_water", "tilesetId": "prob_water", "tilesetBandIndex": 0, "pyramidingPolicy": "MEAN"},
        {"id": "prob_land", "tilesetId": "prob_land", "tilesetBandIndex": 0, "pyramidingPolicy": "MEAN"},
    ]  # fmt: skip
    assert (manifest["startTime"], manifest["endTime"]) == ("2024-02-01T00:00:00Z", "2025-02-01T00:00:00Z")
    assert manifest["properties"]["run_id"] == "r1" and manifest["properties"]["pipeline"] == "ee-landcover"

    # What Earth Engine reads: valid under its rules, and the map's own pixels, band by band.
    deliver = tmp_path / "ws" / "r1" / "deliver"
    local = {"class": (deliver / "ee-landcover-classes.tif", 1)}
    local |= {b: (deliver / "ee-landcover-probabilities.tif", i) for i, b in enumerate(bands[1:], 1)}
    for band in bands:
        copy = tmp_path / f"uploaded-{band}.tif"
        gcs.blob(f"{FOLDER}/ee-landcover-{band}.tif").download_to_filename(copy)
        assert cog_rule_violations(copy) == []
        source, index = local[band]
        with rasterio.open(copy) as ds, rasterio.open(source) as ref:
            assert ds.count == 1 and ds.transform == ref.transform and ds.crs == ref.crs
            np.testing.assert_array_equal(ds.read(1), ref.read(index))
    assert not list((tmp_path / "ws" / "r1").glob(".earthengine-*"))  # scratch COGs removed

    # Again: the asset exists, nothing is uploaded or registered a second time.
    before = len(playback.requests)
    assert main(["run", str(config), "--window", WINDOW, "--force"]) == 0
    assert not playback.calls("POST", "/image:importExternal")[1:]
    assert len(playback.requests) > before


def test_a_tiled_map_is_one_image_per_tile(tmp_path, services, gcs):
    """44 × 17 px in tiles of 24 px (2 × 3 patches of 12 × 8: two tiles side by side) with no
    single-file COG: a band must not be spread over several COGs, so each tile is its own image."""
    config = _cog_config(tmp_path, services, tile_size=24, single_file_max_pixels=0)
    assert main(["run", str(config), "--run", "r1", "--window", WINDOW]) == 0
    requests = services.calls("POST", "/image:importExternal")
    names = [r.body["imageManifest"]["name"].rsplit("/", 1)[1] for r in requests]
    assert names == ["ee-landcover_20250201_r0000c0000", "ee-landcover_20250201_r0000c0001"]
    for request in requests:
        suffix = request.body["imageManifest"]["name"].rsplit("_", 1)[1]
        (uri,) = request.body["imageManifest"]["tilesets"][0]["sources"][0]["uris"]
        assert uri.startswith(f"gs://terrabeam-test/{FOLDER}/ee-landcover-class_{suffix}.tif#")


def _geotiff(path, count=1, **options):
    """A synthetic 1024 × 1024 raster written with ``options``."""
    profile = {"width": 1024, "height": 1024, "count": count, "dtype": "uint8", "crs": "EPSG:32633"}
    plain = path.with_suffix(".src.tif")
    with rasterio.open(plain, "w", driver="GTiff", transform=Affine(10, 0, 0, 0, -10, 0), **profile) as ds:
        ds.write(np.random.default_rng(0).integers(0, 9, (count, 1024, 1024)).astype(np.uint8))
    rasterio.shutil.copy(plain, path, **options)
    return path


@pytest.mark.parametrize(
    ("options", "count", "problem"),
    [
        ({"driver": "COG", "BLOCKSIZE": "512", "COMPRESS": "ZSTD"}, 1, None),
        ({"driver": "COG", "BLOCKSIZE": "128"}, 1, "tiles of 128×128 px"),
        ({"driver": "COG", "COMPRESS": "JPEG"}, 1, "compression JPEG"),
        ({"driver": "COG"}, 3, "3 bands pixel-interleaved"),
        ({"driver": "GTiff"}, 1, "not tiled"),
    ],
)
def test_earth_engine_cog_rules(tmp_path, options, count, problem):
    found = cog_rule_violations(_geotiff(tmp_path / "x.tif", count, **options))
    assert (found == []) if problem is None else any(problem in p for p in found), found


def test_an_object_with_other_bytes_is_never_replaced(tmp_path, gcs):
    path = tmp_path / "a.tif"
    path.write_bytes(b"first")
    uri = "gs://terrabeam-test/cog/a.tif"
    pinned = upload_pinned(path, uri)
    assert pinned == f"{uri}#{gcs.get_blob('cog/a.tif').generation}"
    assert upload_pinned(path, uri) == pinned  # the same bytes: kept, same generation
    path.write_bytes(b"other")
    with pytest.raises(EarthEngineError, match="exists with other bytes; terrabeam never replaces"):
        upload_pinned(path, uri)
    assert gcs.get_blob("cog/a.tif").download_as_bytes() == b"first"
