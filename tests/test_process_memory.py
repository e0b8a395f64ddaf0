"""What a finished phase leaves in memory is handed back: GDAL's block cache is emptied and its
limit restored; the model a map's pipeline loaded is gone before its mosaic. Synthetic raster and
model (tiny_pipeline); GDAL's own counters, read through the libgdal rasterio loaded."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from terrabeam.cli import main
from terrabeam.process_memory import collected_after, empty_gdal_cache, release_free_memory


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


def _sessions(model: Path) -> int:
    """ONNX Runtime sessions of ``model`` among the objects Python's collector tracks (garbage not
    yet collected included)."""
    import onnxruntime as ort

    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, ort.InferenceSession)
        and isinstance(o._model_path, str)
        and Path(o._model_path).resolve() == model.resolve()
    )


def test_the_model_is_gone_before_the_mosaic(tiny_pipeline, monkeypatch):
    """The map step's pipeline ran in this process; when its mosaic starts, no session of the model
    is left: not the probe's, not the one Beam's Shared map keeps alive, not one held by the
    pipeline's uncollected bundle processors."""
    from terrabeam.workflow import maps

    document, write = tiny_pipeline
    model = Path(document["model"]["path"])
    at_mosaic = []
    mosaic = maps._mosaic

    def counting(*args, **kwargs):
        at_mosaic.append(_sessions(model))
        return mosaic(*args, **kwargs)

    monkeypatch.setattr(maps, "_mosaic", counting)
    assert main(["run", str(write()), "--run", "r"]) == 0
    assert at_mosaic == [0]


def test_collected_after_collects_the_cycles_the_block_made_and_unfreezes():
    class Node:
        pass

    before = gc.get_freeze_count()
    with collected_after():
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle
        ids = {id(a), id(b)}
        del a, b
    assert not any(id(o) in ids and isinstance(o, Node) for o in gc.get_objects())
    assert gc.get_freeze_count() == before == 0  # everything collectable as usual again


def test_malloc_arenas_are_capped_for_children_unless_the_user_chose(monkeypatch):
    """The cap reaches the processes a run starts (glibc reads MALLOC_ARENA_MAX as they start); a
    value already in the environment is the user's and stays."""
    import subprocess
    import sys

    from terrabeam.process_memory import MALLOC_ARENAS, limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    limit_malloc_arenas()
    child = [sys.executable, "-c", "import os; print(os.environ['MALLOC_ARENA_MAX'])"]
    assert subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip() == str(
        MALLOC_ARENAS
    )
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    limit_malloc_arenas()
    assert subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip() == "4"


def test_a_run_makes_no_full_collection_after_its_last_step(tiny_pipeline, monkeypatch):
    """A full collection with Beam loaded takes ~0.1 s; after a run's last step nothing needs the
    memory, so only the map step's own (frozen, cheap) collection runs. Synthetic scene."""
    from terrabeam.workflow import steps

    document, write = tiny_pipeline
    releases = []
    release = steps.release_free_memory
    monkeypatch.setattr(
        steps, "release_free_memory", lambda collect=True: releases.append(collect) or release(collect)
    )
    collections = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or collect(*a))
    assert main(["run", str(write()), "--run", "r"]) == 0
    assert releases and not any(releases)  # GDAL's step end: trimmed, not collected
    assert len(collections) == 1  # collected_after's, with the objects before the pipeline frozen


def test_the_step_server_and_the_flex_launcher_cap_malloc_arenas_too(tmp_path, monkeypatch, capsys):
    """Both entry points of a deployment set the cap first, as the CLI does (here they stop at a
    missing config, after it)."""
    import os

    from terrabeam.deploy import flex_main, step_server
    from terrabeam.process_memory import MALLOC_ARENAS

    for main_of in (step_server.main, flex_main.main):
        monkeypatch.setenv("MALLOC_ARENA_MAX", "x")  # restored (absent) after the test
        monkeypatch.delenv("MALLOC_ARENA_MAX")
        arguments = ["--config", str(tmp_path / "missing.yaml")]
        if main_of is flex_main.main:
            arguments += ["--workspace", "gs://bucket/ws", "--run", "r1"]
        assert main_of(arguments) != 0
        assert os.environ["MALLOC_ARENA_MAX"] == str(MALLOC_ARENAS)
