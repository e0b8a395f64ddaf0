"""Memory a finished phase of a run leaves behind, handed back before the next phase starts:
GDAL's block cache and the free memory glibc keeps in its arenas. Without this, each phase (a
step, the pipeline, the mosaic) would start from the last one's peak, and a run's peak memory
would grow with the scene (BENCHMARKS.md, scaling)."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import rasterio


def empty_gdal_cache() -> None:
    """Drop every block in GDAL's cache (shrinking it to nothing frees them); the cache limit in
    force before is restored."""
    with rasterio.Env(GDAL_CACHEMAX=0):
        pass


@contextmanager
def collected_after() -> Iterator[None]:
    """Collect the reference cycles a phase (a Beam pipeline) leaves, cheaply: objects alive before
    it are set aside (``gc.freeze``), so the collection at its end scans only what it made (~35 ms
    for the U-Net's map step against ~120 ms for a full collection with Beam loaded). Beam's
    finished bundle processors are such cycles, and they hold the DoFns and so the model. Everything
    is collectable as usual again afterwards (``gc.unfreeze``)."""
    gc.freeze()
    try:
        yield
        gc.collect()
    finally:
        gc.unfreeze()


def release_free_memory(collect: bool = True) -> None:
    """Hand memory freed by a phase back to the OS (glibc keeps it in its arenas otherwise).
    ``collect``: run Python's cycle collector first (~0.1 s with Beam loaded), for memory held by
    reference cycles; without it the call takes ~10 ms."""
    if collect:
        gc.collect()
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
