"""The readers-writer lock that keeps GDAL writes apart from other threads' GDAL reads (threads and
events only, no GDAL), and the tile writer's raw scratch read back through GDAL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import rasterio

from terrabeam.gdal_threads import ReadersWriterLock


def _hold(context, entered: threading.Event, release: threading.Event) -> threading.Thread:
    def body() -> None:
        with context():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def test_readers_share_and_a_writer_waits_for_them():
    lock = ReadersWriterLock()
    first, second, writer_in = threading.Event(), threading.Event(), threading.Event()
    release_readers, release_writer = threading.Event(), threading.Event()
    readers = [_hold(lock.reading, first, release_readers), _hold(lock.reading, second, release_readers)]
    assert first.wait(5) and second.wait(5)  # two readers inside at once
    writer = _hold(lock.writing, writer_in, release_writer)
    assert not writer_in.wait(0.2)  # the writer waits while readers are in
    release_readers.set()
    for thread in readers:
        thread.join(5)
    assert writer_in.wait(5)
    release_writer.set()
    writer.join(5)


def test_a_waiting_writer_holds_back_new_readers():
    lock = ReadersWriterLock()
    reader_in, writer_in, late_in = threading.Event(), threading.Event(), threading.Event()
    release_reader, release_writer, release_late = threading.Event(), threading.Event(), threading.Event()
    reader = _hold(lock.reading, reader_in, release_reader)
    assert reader_in.wait(5)
    writer = _hold(lock.writing, writer_in, release_writer)
    time.sleep(0.1)  # the writer is waiting now
    late = _hold(lock.reading, late_in, release_late)
    assert not late_in.wait(0.2)  # a new reader does not overtake the waiting writer
    release_reader.set()
    assert writer_in.wait(5) and not late_in.is_set()
    release_writer.set()
    assert late_in.wait(5)
    release_late.set()
    for thread in (reader, writer, late):
        thread.join(5)


def test_writers_run_one_at_a_time():
    lock = ReadersWriterLock()
    inside, most = [0], [0]
    guard = threading.Lock()

    def write() -> None:
        for _ in range(50):
            with lock.writing():
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most[0] == 1


def test_tile_scratch_reads_back_through_its_raw_vrt(tmp_path):
    """Synthetic predictions: a tile's raw scratch, read by GDAL through the VRT the writer makes,
    has the pixels written, georeferencing, band descriptions and nodata."""
    from affine import Affine

    from terrabeam.grid import Grid, PatchKey
    from terrabeam.sinks.tiles import MapLayer, WriteMapTiles
    from terrabeam.tiling import Tiling

    grid = Grid.covering("EPSG:32633", Affine(10, 0, 500000, 0, -10, 5000000), 100, 60, (64, 48))
    tiling = Tiling.for_grid(grid, 100, 60, 4096)
    layer = MapLayer("probabilities", ["prob_a", "prob_b"], "float32", float("nan"), "average", ["a", "b"])
    sink = WriteMapTiles(str(tmp_path), "t", [layer], tiling, None, ("zstd", None), overviews=False)
    sink.start_bundle()
    rng = np.random.default_rng(0)
    expected = np.full((2, 60, 100), np.nan, np.float32)
    for index in tiling.patches(0):
        window = grid.patch_window(index)
        values = rng.random((2, 48, 64), dtype=np.float32)
        rows, cols = min(48, 60 - window.row_off), min(64, 100 - window.col_off)
        expected[:, window.row_off : window.row_off + rows, window.col_off : window.col_off + cols] = values[
            :, :rows, :cols
        ]
        sink.process((PatchKey(index, 0, index), {"prob_a": values[0], "prob_b": values[1]}))
    sink.finish_bundle()
    with rasterio.open(tmp_path / "t-probabilities-r0000c0000.tif") as ds:
        np.testing.assert_array_equal(ds.read(), expected)
        assert ds.transform == grid.transform and ds.crs == "EPSG:32633"
        assert ds.descriptions == ("a", "b") and np.isnan(ds.nodata)
        assert ds.tags()["bands"] == "a,b"


@contextmanager
def _reading_load(tmp_path, readers: int = 3) -> Iterator[None]:
    """While inside: GDAL's cache at 1 MB, and threads reading resampled windows of a synthetic
    GeoTIFF through GDAL, each read under GDAL_IO.reading() as the raster source's are, so blocks
    are evicted all the time."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from terrabeam.gdal_threads import GDAL_IO

    source = _loaded_source(tmp_path / "source.tif")
    stop = threading.Event()

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with rasterio.open(source) as ds:
            while not stop.is_set():
                x, y = rng.integers(0, ds.width - 1200), rng.integers(0, ds.height - 300)
                with GDAL_IO.reading():
                    ds.read(
                        1, window=Window(x, y, 1200, 300), out_shape=(150, 600), resampling=Resampling.average
                    )

    with rasterio.Env(GDAL_CACHEMAX=2**20):
        threads = [threading.Thread(target=read, args=(seed,)) for seed in range(readers)]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)


def _loaded_source(path) -> str:
    """A synthetic 8192 × 4096 uint16 GeoTIFF (64 MB, 512² blocks) for the reading threads."""
    data = np.random.default_rng(1).integers(0, 10000, (4096, 8192), dtype=np.uint16)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=8192,
        height=4096,
        count=1,
        dtype="uint16",
        tiled=True,
        blockxsize=512,
        blockysize=512,
    ) as dst:
        dst.write(data, 1)
    return str(path)


def test_tiles_without_overviews_encode_exactly_beside_reads(tmp_path):
    """Synthetic predictions, real GDAL: the tile writer encodes tiles without overviews beside
    other threads' GDAL reads (sinks/tiles.py lets them share), in a 1 MB block cache that the
    reads keep churning; every tile's COG holds exactly the pixels written. Under the same load a
    multi-band GeoTIFF written through the cache loses blocks (the slow test below)."""
    from affine import Affine

    from terrabeam.grid import Grid, PatchKey
    from terrabeam.sinks.tiles import MapLayer, WriteMapTiles
    from terrabeam.tiling import Tiling

    width, height, patch = 4096, 2048, (256, 256)
    grid = Grid.covering("EPSG:32633", Affine(10, 0, 500000, 0, -10, 5000000), width, height, patch)
    tiling = Tiling.for_grid(grid, width, height, 1024)
    layer = MapLayer("probabilities", ["a", "b", "c"], "float32", float("nan"), "average", ["a", "b", "c"])
    out = tmp_path / "tiles"
    out.mkdir()
    rng = np.random.default_rng(0)
    expected = rng.random((3, height, width), dtype=np.float32)
    expected[:, ::7, ::5] = np.nan
    with _reading_load(tmp_path):
        sink = WriteMapTiles(str(out), "t", [layer], tiling, None, ("zstd", None), overviews=False)
        sink.setup()
        sink.start_bundle()
        for tile in range(tiling.count):
            for index in tiling.patches(tile):
                window = grid.patch_window(index)
                values = expected[
                    :, window.row_off : window.row_off + 256, window.col_off : window.col_off + 256
                ]
                sink.process((PatchKey(index, 0, index), dict(zip(["a", "b", "c"], values, strict=True))))
        sink.finish_bundle()
        sink.teardown()
    assert tiling.count == 8
    for tile in range(tiling.count):
        window = tiling.window(tile)
        with rasterio.open(out / f"t-probabilities-{tiling.name(tile)}.tif") as ds:
            assert ds.overviews(1) == []
            got = ds.read()
        want = expected[
            :, window.row_off : window.row_off + window.height, window.col_off : window.col_off + window.width
        ]
        np.testing.assert_array_equal(got, want, err_msg=f"tile {tile}")


@pytest.mark.slow
def test_the_load_finds_a_cache_race(tmp_path):
    """The load above is able to find the race it guards against: a 3-band pixel-interleaved
    GeoTIFF written window by window through GDAL's cache (the tile writer's old scratch) loses
    blocks beside it, here in at least 1 of 40 writes (31 of 40 when measured; BENCHMARKS.md).
    Synthetic data."""
    from rasterio.windows import Window

    data = np.random.default_rng(0).random((3, 1536, 2048), dtype=np.float32)
    lost = 0
    with _reading_load(tmp_path):
        for attempt in range(40):
            path = tmp_path / f"scratch-{attempt % 2}.tif"
            with rasterio.open(
                path,
                "w",
                driver="GTiff",
                width=2048,
                height=1536,
                count=3,
                dtype="float32",
                tiled=True,
                blockxsize=256,
                blockysize=256,
                interleave="pixel",
            ) as dst:
                for row in range(0, 1536, 192):
                    for col in range(0, 2048, 192):
                        window = Window(col, row, min(192, 2048 - col), min(192, 1536 - row))
                        dst.write(data[:, row : row + window.height, col : col + window.width], window=window)
            with rasterio.open(path) as ds:
                lost += not np.array_equal(ds.read(), data)
    assert lost >= 1
