"""Earth Engine-layout prediction shards from a tiled run: the tiles' records put back in the grid's
row-major order, ``records_per_shard`` per shard, by the runner's workers (one shard per task).

A tiled run writes each tile's prediction records in tile order beside its COGs; a shard covers a
contiguous range of grid indices, so it reads the records of the tiles its range crosses, each
tile's file front to back, and never holds more than one record.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import apache_beam as beam

from terrabeam import NAMESPACE
from terrabeam.sinks.tiles import records_file_name
from terrabeam.tfrecord import RecordWriter, read_records
from terrabeam.tiling import Tiling

RECORD_OVERHEAD = 64  # bytes per feature beyond its values: key, tags, lengths (generous)


def records_per_shard(tiling: Tiling, bands: Sequence[str], max_file_size: int) -> int:
    """Records per shard so that no shard's uncompressed size passes ``max_file_size``: class values
    take at most 2 bytes (255 is a 2-byte varint), floats 4."""
    pixels = tiling.grid.patch_width * tiling.grid.patch_height
    bound = 16 + sum(RECORD_OVERHEAD + pixels * (2 if band == "class" else 4) for band in bands)
    return max(1, max_file_size // bound)


def shard_ranges(total: int, per_shard: int) -> list[tuple[int, int]]:
    """[first, stop) grid indices of each shard."""
    return [(start, min(total, start + per_shard)) for start in range(0, total, per_shard)]


class AssembleShard(beam.DoFn):
    """(shard number, (first, stop)) → the shard file ``names[number]`` in ``out_dir`` (folder or URI),
    published under its name only when complete."""

    def __init__(
        self, tiles_dir: str, stem: str, tiling: Tiling, names: Sequence[str], out_dir: str, level: int
    ) -> None:
        self.tiles_dir, self.stem, self.tiling = tiles_dir, stem, tiling
        self.names, self.out_dir, self.level = list(names), out_dir, level
        self.records_written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")

    def _records(self, tile: int, first: int) -> Iterator[bytes]:
        """The tile's records from the first one whose grid index is at least ``first``."""
        path = f"{self.tiles_dir.rstrip('/')}/{records_file_name(self.stem, self.tiling, tile)}"
        if "://" in path:
            from terrabeam.storage import local_copy

            path = str(local_copy(path))
        skip = sum(1 for index in self.tiling.patches(tile) if index < first)
        for number, payload in enumerate(read_records(path)):
            if number >= skip:
                yield payload

    def process(self, element: tuple[int, tuple[int, int]]) -> None:
        number, (first, stop) = element
        remote = "://" in self.out_dir
        folder = Path(tempfile.mkdtemp(prefix="terrabeam-shard-")) if remote else Path(self.out_dir)
        final = folder / self.names[number]
        partial = final.with_name(f".{final.name}.partial")
        readers: dict[int, Iterator[bytes]] = {}
        try:
            with RecordWriter(partial, self.level) as writer:
                for index in range(first, stop):
                    tile = self.tiling.tile_of(index)
                    if tile not in readers:
                        readers[tile] = self._records(tile, first)
                    writer.write(next(readers[tile]))
            if remote:
                from terrabeam.storage import copy_file

                copy_file(str(partial), f"{self.out_dir.rstrip('/')}/{final.name}")
            else:
                os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
            if remote:
                shutil.rmtree(folder, ignore_errors=True)
        self.records_written.inc(stop - first)
