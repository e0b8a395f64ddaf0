"""The export step from rasters, checked against rasterio/GDAL applied to the whole (synthetic)
scene at once: windows with margins, reprojection, scaling, derived bands, shards, memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import write_raster
from rasterio.enums import Resampling
from rasterio.warp import reproject

from terrabeam.config import parse_config
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, list_shards
from terrabeam.sources.raster import export_rasters
from terrabeam.tfrecord import decode_example, read_records

UTM = Affine(10, 0, 400000, 0, -10, 5600000)


def _config(tmp_path, bands, **sections):
    document = {
        "name": "t",
        "source": {"bands": bands, **sections.pop("source", {})},
        "model": {"path": "m.onnx", "input_bands": [next(iter(bands))], "classes": ["a", "b"]},
        **sections,
    }
    return parse_config(document, tmp_path)


def _patches(out, prefix="patches"):
    return [decode_example(r) for s in list_shards(out, prefix) for r in read_records(s)]


@pytest.mark.parametrize("block_width", [4096, 40, 20])  # one block per patch row, or several
def test_patches_with_margin_match_the_scene_and_fill_outside(tmp_path, monkeypatch, block_width):
    monkeypatch.setattr("terrabeam.sources.raster.BLOCK_WIDTH", block_width)
    rng = np.random.default_rng(0)
    scene = rng.integers(1, 1000, (37, 53)).astype(np.int16)  # not a multiple of the patch size
    write_raster(tmp_path / "b.tif", scene, UTM)
    config = _config(
        tmp_path,
        {"b": {"path": "b.tif", "scale": 0.5, "offset": -1}},
        source={"fill_value": -99},
        grid={"patch_size": [20, 12], "kernel_size": [6, 4]},
    )
    out = tmp_path / "out"
    out.mkdir()
    result = export_rasters(config, out)
    grid = result.grid
    assert (grid.patch_width, grid.patch_height, grid.patches_per_row, grid.total_patches) == (20, 12, 3, 12)
    assert grid.transform == UTM
    assert (result.manifest.region_width, result.manifest.region_height) == (53, 37)
    expected = np.full((grid.height + 4, grid.width + 6), -99, np.float32)
    expected[2 : 2 + 37, 3 : 3 + 53] = scene * np.float32(0.5) - 1
    patches = _patches(out)
    assert len(patches) == grid.total_patches
    for index, features in enumerate(patches):
        window = grid.patch_window(index, (6, 4))
        want = expected[window.row_off + 2 : window.row_stop + 2, window.col_off + 3 : window.col_stop + 3]
        np.testing.assert_array_equal(features["b"].reshape(16, 26), want)


def test_reprojection_and_resampling_match_gdal_on_the_whole_scene(tmp_path):
    rng = np.random.default_rng(1)
    scene = rng.random((60, 80)).astype(np.float32)
    lonlat = Affine(0.001, 0, 13.0, 0, -0.001, 52.5)
    write_raster(tmp_path / "geo.tif", scene, lonlat, crs="EPSG:4326")
    config = _config(
        tmp_path,
        {"v": {"path": "geo.tif"}},
        source={"resampling": "bilinear"},
        grid={"crs": "EPSG:32633", "resolution": 50, "patch_size": [16, 16]},
    )
    out = tmp_path / "out"
    out.mkdir()
    grid = export_rasters(config, out).grid
    assert grid.crs == "EPSG:32633"
    oracle = np.zeros((grid.height, grid.width), np.float32)
    reproject(
        scene,
        oracle,
        src_transform=lonlat,
        src_crs="EPSG:4326",
        dst_transform=grid.transform,
        dst_crs="EPSG:32633",
        resampling=Resampling.bilinear,
        src_nodata=None,
        dst_nodata=0,
    )
    mosaic = np.zeros_like(oracle)
    for index, features in enumerate(_patches(out)):
        w = grid.patch_window(index)
        mosaic[w.row_off : w.row_stop, w.col_off : w.col_stop] = features["v"].reshape(16, 16)
    inside = oracle != 0
    assert inside.mean() > 0.3
    np.testing.assert_allclose(mosaic[inside], oracle[inside], atol=1e-5)


def test_multiband_file_band_mapping_and_derived_ndvi(tmp_path):
    rng = np.random.default_rng(2)
    stack = rng.integers(1, 5000, (3, 20, 30)).astype(np.uint16)
    write_raster(tmp_path / "multi.tif", stack, UTM)
    config = _config(
        tmp_path,
        {
            "red": {"path": "multi.tif", "band": 3, "scale": 1e-4},
            "nir": {"path": "multi.tif", "band": 1, "scale": 1e-4},
        },
        source={"derived": {"ndvi": "(nir - red) / (nir + red)"}},
        grid={"patch_size": [30, 20]},
    )
    out = tmp_path / "out"
    out.mkdir()
    (patch,) = _patches(out) if export_rasters(config, out) else []
    red, nir = stack[2] * np.float32(1e-4), stack[0] * np.float32(1e-4)
    np.testing.assert_array_equal(patch["red"].reshape(20, 30), red)
    np.testing.assert_allclose(patch["ndvi"].reshape(20, 30), (nir - red) / (nir + red), rtol=1e-6)
    assert list(patch) == ["ndvi", "nir", "red"]


def test_shards_split_by_max_file_size_and_continue_the_order(tmp_path):
    write_raster(tmp_path / "b.tif", np.arange(64 * 64, dtype=np.float32).reshape(64, 64), UTM)
    config = _config(
        tmp_path,
        {"b": {"path": "b.tif"}},
        grid={"patch_size": [8, 8]},
        export={"prefix": "img", "max_file_size": 1000},  # 64 records of 8*8*4 + framing ≈ 290 B each
    )
    out = tmp_path / "out"
    out.mkdir()
    result = export_rasters(config, out)
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".tfrecord.gz")]
    assert names == sorted([*shards, "img-mixer.json", "img-manifest.json"])
    assert shards[:2] == ["img-00000.tfrecord.gz", "img-00001.tfrecord.gz"]
    assert len(shards) == len(result.manifest.shard_records) > 10
    assert sum(result.manifest.shard_records) == 64
    for shard in list_shards(out, "img"):
        assert sum(len(r) + 16 for r in read_records(shard)) <= 1000
    firsts = [features["b"][0] for features in _patches(out, "img")]
    grid = Grid.read_mixer(out / "img-mixer.json")
    assert firsts == [grid.patch_window(i).row_off * 64 + grid.patch_window(i).col_off for i in range(64)]
    assert ExportManifest.read(out / "img-manifest.json") == result.manifest


def test_geojson_region_selects_a_subset(tmp_path):
    write_raster(tmp_path / "b.tif", np.ones((100, 100), np.float32), UTM)
    from rasterio.warp import transform_geom

    box = {
        "type": "Polygon",
        "coordinates": [
            [(400100, 5599900), (400300, 5599900), (400300, 5599700), (400100, 5599700), (400100, 5599900)]
        ],
    }
    feature = {
        "type": "Feature",
        "properties": {},
        "geometry": transform_geom("EPSG:32633", "EPSG:4326", box),
    }
    (tmp_path / "aoi.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    config = _config(
        tmp_path, {"b": {"path": "b.tif"}}, grid={"region": {"geojson": "aoi.geojson"}, "patch_size": [8, 8]}
    )
    out = tmp_path / "out"
    out.mkdir()
    result = export_rasters(config, out)
    left, top = result.grid.transform.c, result.grid.transform.f
    assert 400090 <= left <= 400100 and 5599900 <= top <= 5599910
    assert 20 <= result.manifest.region_width <= 22 and 20 <= result.manifest.region_height <= 22


def test_memory_is_bounded_by_one_strip_not_the_scene(tmp_path):
    """A tall scene (256 × 32768 px, 32 MB as float32) exports holding a few strips of patches:
    no more memory than a scene 16 times shorter.

    Synthetic data. A short scene is exported first so that one-time costs (modules imported on
    first use, about 0.5 MB) are not counted as the export's memory.
    """
    grid = {"patch_size": [64, 64], "kernel_size": [16, 16]}
    peaks = {}
    for height in (2048, 2048, 32768):  # the first run is the warm-up
        _write_rows(tmp_path / f"{height}.tif", height)
        out = tmp_path / f"out-{height}"
        out.mkdir(exist_ok=True)
        config = _config(tmp_path, {"b": {"path": f"{height}.tif"}}, grid=grid)
        tracemalloc.start()
        export_rasters(config, out)
        peaks[height] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    scene_bytes = 256 * 32768 * 4
    strip_bytes = (256 + 16) * (64 + 16) * 4
    assert peaks[32768] < scene_bytes / 8, (
        f"peak {peaks[32768]} B is not far below the scene's {scene_bytes} B"
    )
    assert peaks[32768] - peaks[2048] < 10 * strip_bytes, f"peaks grow with the scene: {peaks}"


def _write_rows(path, height):
    """A 256-px-wide float32 raster whose pixels hold their row's first 256-row block."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=256,
        height=height,
        count=1,
        dtype="float32",
        crs="EPSG:32633",
        transform=UTM,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as ds:
        for row in range(0, height, 256):
            ds.write(np.full((1, 256, 256), row, np.float32), window=((row, row + 256), (0, 256)))


@pytest.mark.parametrize("compression_level", [0, 3])
def test_plain_and_gzip_shards(tmp_path, compression_level):
    write_raster(tmp_path / "b.tif", np.ones((10, 10), np.float32), UTM)
    config = _config(
        tmp_path,
        {"b": {"path": "b.tif"}},
        grid={"patch_size": [10, 10]},
        export={"compression_level": compression_level},
    )
    out = tmp_path / "out"
    out.mkdir()
    (shard,) = export_rasters(config, out).shards
    assert shard.name == ("patches-00000.tfrecord" if compression_level == 0 else "patches-00000.tfrecord.gz")
    assert (shard.read_bytes()[:2] == b"\x1f\x8b") == (compression_level > 0)


def test_geojson_polygon_masks_the_maps_outside_it(tmp_path, tiny_pipeline):
    """Synthetic scene: a triangle region is exported as its bounding box; in the delivered maps every
    pixel whose centre lies outside the triangle is nodata, every one inside is predicted."""
    from rasterio.features import geometry_mask
    from rasterio.warp import transform_geom

    from terrabeam.cli import main

    document, write = tiny_pipeline  # scene: 70 × 50 px of 10 m from (400000, 5600000)
    triangle = {
        "type": "Polygon",
        "coordinates": [[(400050, 5599950), (400650, 5599950), (400050, 5599550), (400050, 5599950)]],
    }
    document["grid"] = document["grid"] | {
        "region": {"geojson": transform_geom("EPSG:32633", "EPSG:4326", triangle)}
    }
    assert main(["run", str(write(document)), "--run", "r"]) == 0
    with rasterio.open(tmp_path / "ws" / "r" / "deliver" / "tiny-classes.tif") as classes:
        labels, transform, crs = classes.read(1), classes.transform, classes.crs
    with rasterio.open(tmp_path / "ws" / "r" / "deliver" / "tiny-probabilities.tif") as probabilities:
        probs = probabilities.read()
    outside = geometry_mask(
        [transform_geom("EPSG:4326", crs, transform_geom("EPSG:32633", "EPSG:4326", triangle))],
        out_shape=labels.shape,
        transform=transform,
    )
    assert outside.any() and (~outside).any()
    assert (labels[outside] == 255).all() and (labels[~outside] != 255).all()
    assert np.isnan(probs[:, outside]).all() and np.isfinite(probs[:, ~outside]).all()
