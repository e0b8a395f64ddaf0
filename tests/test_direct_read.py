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


def _readers(
    tmp_path, data, band_transform, grid_transform, resampling, nodata=None, kernel=(4, 4), patches=(5, 20)
):
    write_raster(tmp_path / "b.tif", data, band_transform, nodata=nodata)
    config = parse_config(
        {
            "name": "t",
            "source": {"bands": {"b": {"path": "b.tif", "scale": 0.5}}, "resampling": resampling},
            "model": {"path": "m.onnx", "input_bands": ["b"], "classes": ["a", "b"]},
        },
        tmp_path,
    )
    grid = Grid("EPSG:32633", grid_transform, 8, 8, *patches)  # 8 × 8 px patches: per row, total
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
        windows = [Window(0, 1, 44, 12), Window(3, 5, 20, 12), Window(26, 22, 18, 14), Window(10, 2, 6, 6)]
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


@pytest.mark.parametrize("resampling", RESAMPLINGS)
@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("nodata", [None, 7])
@pytest.mark.parametrize("remainder", [(0, 0), (5, 3)], ids=["whole-pixels", "partial-pixels"])
def test_direct_read_across_the_band_edges(tmp_path, resampling, factor, nodata, remainder):
    """Blocks at the region's edges reach past the band (the kernel margin, padding to whole
    patches). There the warp is a poor oracle: its kernel scale follows the warped extent, not the
    pixel sizes (bilinear/cubic values change with the padded grid's size), it rounds exact ties of
    an average either way, and with `average` it marks the grid row above the band valid. The
    oracles here: GDAL's RasterIO of the whole band (a window gives the same pixels as the whole
    read: no seams between blocks), numpy's exact block mean, and the band's geometry."""
    k = factor
    rng = np.random.default_rng(k)
    data = rng.integers(0, 50, (40 * k + remainder[0], 44 * k + remainder[1])).astype(np.uint16)
    if nodata is not None:
        data[rng.random(data.shape) < 0.05] = nodata
    band = Affine(10, 0, 400000, 0, -10, 5600000)
    grid_transform = Affine(10 * k, 0, 400000 + 10 * 2 * k, 0, -10 * k, 5600000 - 10 * k)
    # padded: 60 × 52 grid px, past the band
    reader, _ = _readers(tmp_path, data, band, grid_transform, resampling, nodata, patches=(7, 42))
    try:
        direct = reader.direct
        if direct is None:
            assert k > 1 and (nodata is not None or resampling == "lanczos")
            return
        ds = reader.dataset
        x0, y0 = -(direct.col_off // k), -(direct.row_off // k)  # first grid pixel inside the band
        nx, ny = ds.width // k, ds.height // k  # grid pixels the band covers whole (band pixel 0 on an edge)
        whole = ds.read(
            1, window=Window(0, 0, nx * k, ny * k), out_shape=(ny, nx), resampling=direct.resampling
        )
        expected = np.zeros((52, 60), np.float32)
        covered = np.zeros((52, 60), bool)
        expected[y0 : y0 + whole.shape[0], x0 : x0 + whole.shape[1]] = whole
        covered[y0 : y0 + ny, x0 : x0 + nx] = ds.read_masks(1) > 0 if k == 1 else True
        if resampling == "average":  # numpy: mean of the k × k band pixels, ties rounded up as GDAL does
            blocks = data[: whole.shape[0] * k, : whole.shape[1] * k].astype(float)
            means = blocks.reshape(whole.shape[0], k, whole.shape[1], k).mean(axis=(1, 3))
            np.testing.assert_array_equal(
                whole[covered[y0 : y0 + whole.shape[0], x0 : x0 + whole.shape[1]]],
                np.floor(means + 0.5)[covered[y0 : y0 + whole.shape[0], x0 : x0 + whole.shape[1]]],
            )
        # across the top/left edge, across the right/bottom edge, wholly outside, inside
        windows = [Window(0, 0, 60, 12), Window(30, 20, 30, 32), Window(0, 30, 48, 22), Window(52, 44, 8, 8)]
        windows.append(Window(10, 10, 20, 20))
        for window in windows:
            rows = slice(int(window.row_off), int(window.row_off + window.height))
            cols = slice(int(window.col_off), int(window.col_off + window.width))
            got = direct.read(ds, 1, window)
            holds_partial = (cols.start <= x0 + whole.shape[1] < cols.stop and ds.width % k) or (
                rows.start <= y0 + whole.shape[0] < rows.stop and ds.height % k
            )
            if holds_partial:
                assert got is None, "a window with partly covered grid pixels goes through the warp"
                continue
            assert got is not None
            values, valid = got
            np.testing.assert_array_equal(valid, covered[rows, cols])
            np.testing.assert_array_equal(values[valid], expected[rows, cols][valid])
            warp_valid = (
                reader.vrt.read(reader.alpha_band, window=window) > 0
                if reader.alpha_band is not None
                else reader.vrt.read_masks(1, window=window) > 0
            )
            # the warp agrees on validity except on grid pixels wholly outside the band
            inside = np.zeros((52, 60), bool)
            inside[y0 : y0 + whole.shape[0], x0 : x0 + whole.shape[1]] = True
            assert not (valid & ~warp_valid).any()
            assert not (warp_valid & ~valid & inside[rows, cols]).any()
            if resampling == "nearest":
                warped = reader.vrt.read(1, window=window, out_dtype="float32")
                np.testing.assert_array_equal(values[valid], warped[valid])
    finally:
        reader.close()
