"""What a finished phase leaves in memory is handed back: GDAL's block cache is emptied and its
limit restored. Synthetic raster; GDAL's own counters, read through the libgdal rasterio loaded."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from terrabeam.process_memory import empty_gdal_cache, release_free_memory


def _libgdal() -> ctypes.CDLL:
    libs = Path(rasterio.__file__).parent.parent / "rasterio.libs"
    gdal = ctypes.CDLL(str(next(libs.glob("libgdal*.so*"))))
    for name in ("GDALGetCacheUsed64", "GDALGetCacheMax64"):
        getattr(gdal, name).restype = ctypes.c_int64
    return gdal


def test_empty_gdal_cache_drops_the_blocks_and_keeps_the_limit(tmp_path):
    gdal = _libgdal()
    path = tmp_path / "b.tif"
    profile = {"driver": "GTiff", "width": 1024, "height": 1024, "count": 1, "dtype": "float32"}
    with rasterio.open(path, "w", crs="EPSG:32633", transform=from_origin(0, 0, 20, 20), **profile) as ds:
        ds.write(np.ones((1, 1024, 1024), np.float32))
    # the dataset stays open: closing it would drop its blocks anyway
    with rasterio.Env(GDAL_CACHEMAX=64 * 2**20), rasterio.open(path) as ds:
        ds.read(1)
        assert gdal.GDALGetCacheUsed64() >= 4 * 2**20  # the 4 MB band's blocks are cached
        empty_gdal_cache()
        assert gdal.GDALGetCacheUsed64() == 0
        assert gdal.GDALGetCacheMax64() == 64 * 2**20
        assert (ds.read(1) == 1).all()  # and the dataset reads on
    release_free_memory(collect=False)  # returns; malloc_trim is best effort
