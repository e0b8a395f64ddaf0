"""GDAL reads beside GDAL writes in other threads: readers share, a writer runs alone.

GDAL's raster block cache is one per process. With the raster source reading ahead in a thread
while the tile writer wrote its scratch GeoTIFF in the bundle's thread, whole blocks of the map
went missing (tests/test_kernel_margin.py, ~1 run in 4; BENCHMARKS.md): a read elsewhere had
flushed or dropped a block the writer was filling. In a pipeline, reading a source takes
``reading()``, and encoding a tile with overviews (computed through the cache) takes
``writing()``, so no such file is written while another thread reads or writes one. The tile
writer keeps its scratch pixels outside GDAL (raw files) until a tile is complete, and a tile
without overviews is copied into its COG without passing through the cache, so it encodes beside
the reads (``reading()``; sinks/tiles.py). (The mosaic, after the pipeline, writes its COGs side
by side from finished tiles, as it always has.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadersWriterLock:
    """Any number of readers at once, or one writer alone; a waiting writer holds back new readers
    (so a steady stream of reads cannot starve the tile writer). Not re-entrant."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            while self._writing or self._writers_waiting:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                if not self._readers:
                    self._changed.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._changed:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._changed.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


GDAL_IO = ReadersWriterLock()
