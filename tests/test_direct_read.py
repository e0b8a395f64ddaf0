"""The raster source's direct read (GDAL RasterIO where band pixels nest in the grid's) against the
warp it replaces, as the oracle: the same values and masks on every resampling, factor, nodata and
window, edges included. Synthetic rasters."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from conftest import write_raster
from rasterio.windows import Window

from terrabeam.config import parse_config
from terrabeam.grid import Grid
from terrabeam.sources.raster import _BandReader

RESAMPLINGS = ["nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode"]


def _readers(tmp_path, data, band_transform, grid_transform, resampling, nodata=None, kernel=(4, 4)):
    write_raster(tmp_path / "b.tif", data, band_transform, nodata=nodata)
    config = parse_config(
        {
            "name": "t",
            "source": {"bands": {"b": {"path": "b.tif", "scale": 0.5}}, "resampling": resampling},
            "model": {"path": "m.onnx", "input_bands": ["b"], "classes": ["a", "b"]},
        },
        tmp_path,
    )
    grid = Grid("EPSG:32633", grid_transform, 8, 8, 5, 20)
    reader = _BandReader(config, "b", grid, kernel)
    return reader, grid


@pytest.mark.parametrize("resampling", RESAMPLINGS)
@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("nodata", [None, 7])
def test_direct_read_equals_the_warp(tmp_path, resampling, factor, nodata):
    rng = np.random.default_rng(factor)
    data = rng.integers(0, 50, (40 * factor + 5, 44 * factor + 3)).astype(np.uint16)
    band = Affine(10, 0, 400000, 0, -10, 5600000)
    grid_transform = Affine(10 * factor, 0, 400000 + 10 * 2 * factor, 0, -10 * factor, 5600000 - 10 * factor)
    reader, grid = _readers(tmp_path, data, band, grid_transform, resampling, nodata)
    try:
        windows = [Window(0, 0, 44, 12), Window(3, 5, 20, 12), Window(30, 30, 18, 14), Window(10, 2, 6, 6)]
        used = 0
        for window in windows:
            direct = reader.direct.read(reader.dataset, 1, window) if reader.direct else None
            warped = reader.vrt.read(1, window=window, out_dtype="float32")
            if reader.alpha_band is not None:
                valid = reader.vrt.read(reader.alpha_band, window=window) > 0
            else:
                valid = reader.vrt.read_masks(1, window=window) > 0
            if direct is None:
                continue
            used += 1
            np.testing.assert_array_equal(direct[1], valid)
            np.testing.assert_array_equal(direct[0][valid], warped[valid])
        if reader.direct is not None:
            assert used >= 2, "windows inside the band are read directly"
    finally:
        reader.close()


def test_no_direct_read_where_pixels_do_not_nest(tmp_path):
    data = np.ones((30, 30), np.uint16)
    band = Affine(10, 0, 400000, 0, -10, 5600000)
    for grid_transform in (Affine(15, 0, 400000, 0, -15, 5600000), Affine(10, 0, 400005, 0, -10, 5600000)):
        reader, _ = _readers(tmp_path, data, band, grid_transform, "average")
        assert reader.direct is None
        reader.close()
