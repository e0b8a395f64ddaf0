"""Memory a finished phase of a run leaves behind, handed back before the next phase starts:
GDAL's block cache and the free memory glibc keeps in its arenas. Without this, each phase (a
step, the pipeline, the mosaic) would start from the last one's peak, and a run's peak memory
would grow with the scene (BENCHMARKS.md, scaling)."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import rasterio

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt() parameter for MALLOC_ARENA_MAX


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas, for this process and the processes it starts (local Beam workers).

    glibc gives threads arenas of their own, up to 8 per core, and each keeps memory its thread
    freed; a run's reader, writer, model and compression threads spread a tile's arrays over many,
    so its memory crept up through each tile (U-Net, 16× the demo scene: median peak 741 MiB with
    glibc's default, 625 MiB with 2 arenas, run time unchanged; BENCHMARKS.md). A MALLOC_ARENA_MAX the
    user set wins. Call before threads start; arenas already made stay."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # read by glibc as each child process starts
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)


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
