"""The readers-writer lock that keeps GDAL writes apart from other threads' GDAL reads (threads and
events only, no GDAL), and the tile writer's raw scratch read back through GDAL."""

from __future__ import annotations

import threading
import time

import numpy as np
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
