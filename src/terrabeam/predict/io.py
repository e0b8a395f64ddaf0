"""Beam transforms around the model and the Earth Engine-layout files: keyed record reading and
decoding (a patch source), the model's input and output, and prediction shard writing (a sink).

Every element carries its PatchKey (grid index, shard, position in shard), so workers may process
patches in any order; the shard writer restores the order, the map writer places patches by index.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import apache_beam as beam
import numpy as np

from terrabeam import NAMESPACE
from terrabeam.beam_ml import PredictionResult
from terrabeam.errors import InputError, RecordCountError
from terrabeam.grid import PatchKey
from terrabeam.region import TrueRegion
from terrabeam.tfrecord import RecordWriter, decode_example, encode_example, read_records

Patch = dict[str, np.ndarray]  # band name → (H, W) values (a source's element, with its PatchKey)


class ReadKeyedRecords(beam.DoFn):
    """(shard number, shard path) → (PatchKey, serialized tf.train.Example) for every record.

    ``offsets`` (first grid index of each shard, from the manifest's counts) give each record its
    grid index; without them a record's index is its position in its shard."""

    def __init__(self, offsets: Sequence[int] | None = None) -> None:
        self.offsets = list(offsets) if offsets else None
        self.records_read = beam.metrics.Metrics.counter(NAMESPACE, "records_read")

    def process(self, shard: tuple[int, str]) -> Iterator[tuple[PatchKey, bytes]]:
        number, path = shard
        if "://" in path:  # a shard in the workspace's object store: read a local copy
            from terrabeam.storage import local_copy

            path = local_copy(path)
        first = self.offsets[number] if self.offsets else 0
        for position, payload in enumerate(read_records(path)):
            self.records_read.inc()
            yield PatchKey(first + position, number, position), payload


class DecodeRecord(beam.DoFn):
    """(PatchKey, serialized Example) → (PatchKey, {band: (H, W) values}) for the named bands; errors
    name the shard file and the record."""

    def __init__(self, shard_paths: Sequence[str], bands: Sequence[str], shape: tuple[int, int]) -> None:
        self.shard_paths = list(shard_paths)
        self.bands = list(bands)
        self.shape = shape

    def process(self, element: tuple[PatchKey, bytes]) -> Iterator[tuple[PatchKey, Patch]]:
        key, payload = element
        where = f"{self.shard_paths[key.shard]} record {key.position}"
        try:
            features = decode_example(payload, frozenset(self.bands))
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        height, width = self.shape
        patch = {}
        for band in self.bands:
            values = features.get(band)
            if values is None:
                available = sorted(decode_example(payload))
                raise InputError(f"{where}: band {band!r} missing; the record has {available}")
            if len(values) != height * width:
                raise InputError(
                    f"{where}: band {band!r} has {len(values)} values, expected {height}×{width}="
                    f"{height * width} (patch size + kernel margin); check grid.kernel_size"
                )
            patch[band] = np.reshape(values, (height, width))
        yield key, patch


class PreparePatch(beam.DoFn):
    """{band: values} → (C, H, W) float32 model input: bands in model order, normalised, NaN where
    masked (the model's nodata value, or NaN, in any band).

    With ``region``, a patch whose core lies wholly outside it is all NaN, so the model skips it; a
    patch partly inside is kept whole (its margin is context for the pixels inside).
    """

    def __init__(
        self,
        bands: Sequence[str],
        normalization: tuple[Sequence[float], Sequence[float]] | None,
        nodata: float | None,
        region: TrueRegion | None = None,
    ) -> None:
        self.bands = list(bands)
        self.multiply = self.add = None
        if normalization is not None:
            self.multiply = np.asarray(normalization[0], np.float32)[:, None, None]
            self.add = np.asarray(normalization[1], np.float32)[:, None, None]
        self.nodata = nodata
        self.region = region

    def process(self, element: tuple[PatchKey, Patch]) -> Iterator[tuple[PatchKey, np.ndarray]]:
        key, features = element
        if self.region is not None and self.region.core_outside(key.index):
            shape = np.shape(features[self.bands[0]])
            yield key, np.full((len(self.bands), *shape), np.nan, np.float32)
            return
        patch = np.stack([features[band] for band in self.bands]).astype(np.float32, copy=False)
        masked = (patch == self.nodata).any(axis=0) if self.nodata is not None else None
        if self.multiply is not None:
            patch *= self.multiply
            patch += self.add
        if masked is not None and masked.any():
            patch[:, masked] = np.nan
        yield key, patch


NODATA_CLASS = 255  # class value of masked pixels (the class map's nodata)


class PostProcess(beam.DoFn):
    """Model output (K, H, W) → prediction bands at core size.

    Classification: ``class`` (int64 argmax, 255 where masked) + ``prob_<class>`` floats (softmax of
    logits); regression: one float band per output name. Masked pixels are NaN in float bands.
    """

    def __init__(self, names: Sequence[str], core: tuple[int, int], output: str) -> None:
        self.names = list(names)
        self.core = core  # (height, width) of a patch without its margin
        self.output = output

    def process(self, element: tuple[PatchKey, PredictionResult]) -> Iterator[tuple[PatchKey, Patch]]:
        key, result = element
        yield key, self.features(np.asarray(result.inference))

    def features(self, output: np.ndarray) -> dict[str, np.ndarray]:
        _, height, width = output.shape
        my, mx = (height - self.core[0]) // 2, (width - self.core[1]) // 2
        core = output[:, my : my + self.core[0], mx : mx + self.core[1]].astype(np.float32, copy=False)
        if self.output == "regression":
            return {name: core[i] for i, name in enumerate(self.names)}
        if self.output == "logits":
            core = np.exp(core - core.max(axis=0, keepdims=True))
            core /= core.sum(axis=0, keepdims=True)
        valid = np.isfinite(core).all(axis=0)
        if valid.all():  # most patches: no masked pixel
            labels = np.argmax(core, axis=0).astype(np.int64)
        else:
            labels = np.argmax(np.where(valid, core, 0), axis=0).astype(np.int64)
            labels[~valid] = NODATA_CLASS
        features = {"class": labels}
        for i, name in enumerate(self.names):
            features[f"prob_{name}"] = core[i]
        return features


class _ShardFile:
    """One prediction shard being written under a temporary name, published by rename when complete.
    In an object store (``out_dir`` a URI) it is written locally and uploaded whole when complete."""

    def __init__(self, out_dir: str, name: str, compression_level: int) -> None:
        self.remote = f"{out_dir.rstrip('/')}/{name}" if "://" in out_dir else None
        local_dir = Path(tempfile.mkdtemp(prefix="terrabeam-shard-")) if self.remote else Path(out_dir)
        self.final = local_dir / name
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.writer = RecordWriter(self.partial, compression_level)
        self.next_position = 0
        self.pending: dict[int, bytes] = {}

    def add(self, position: int, payload: bytes) -> None:
        """Write records in position order, holding back any that arrive ahead of their turn."""
        self.pending[position] = payload
        while self.next_position in self.pending:
            self.writer.write(self.pending.pop(self.next_position))
            self.next_position += 1

    def publish(self, number: int) -> int:
        self.writer.close()
        if self.pending:
            self.partial.unlink(missing_ok=True)
            raise RecordCountError(
                f"shard {number}: records {sorted(self.pending)[:5]} arrived but record "
                f"{self.next_position} never did"
            )
        if self.remote is not None:
            from terrabeam.storage import copy_file

            copy_file(str(self.partial), self.remote)
            shutil.rmtree(self.partial.parent, ignore_errors=True)
        else:
            os.replace(self.partial, self.final)
        return self.next_position


class WriteShard(beam.DoFn):
    """(shard number, [(position, payload)]) after a GroupByKey → one prediction shard in order.

    Used when records were reshuffled across workers; a shard's records meet on one worker.
    """

    def __init__(self, out_dir: str, names: Sequence[str], compression_level: int) -> None:
        self.out_dir = out_dir
        self.names = list(names)
        self.compression_level = compression_level
        self.records_written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")

    def process(self, element: tuple[int, Iterable[tuple[int, bytes]]]) -> None:
        number, records = element
        shard = _ShardFile(self.out_dir, self.names[number], self.compression_level)
        for position, payload in sorted(records, key=lambda item: item[0]):
            shard.add(position, payload)
        self.records_written.inc(shard.publish(number))


class StreamShardsInOrder(beam.DoFn):
    """(shard number, (position, payload)) → prediction shards, written as the records stream by.

    Without a shuffle every record of a shard is processed in the bundle that read the shard, and
    in order, so nothing needs grouping: memory holds only records that arrive out of turn. A shard
    is published as soon as its last record is written when the expected counts are known (so an
    interrupted run keeps its finished shards), else when the bundle finishes. A retried bundle
    rewrites its shards.
    """

    def __init__(
        self, out_dir: str, names: Sequence[str], compression_level: int, expected: Sequence[int] | None
    ) -> None:
        self.out_dir = out_dir
        self.names = list(names)
        self.compression_level = compression_level
        self.expected = list(expected) if expected else None
        self.records_written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")
        self._open: dict[int, _ShardFile] = {}

    def start_bundle(self) -> None:
        self._open = {}

    def process(self, element: tuple[int, tuple[int, bytes]]) -> None:
        number, (position, payload) = element
        shard = self._open.get(number)
        if shard is None:
            shard = self._open[number] = _ShardFile(self.out_dir, self.names[number], self.compression_level)
        shard.add(position, payload)
        if self.expected is not None and shard.next_position == self.expected[number] and not shard.pending:
            self.records_written.inc(shard.publish(number))
            self._open[number] = _PUBLISHED

    def finish_bundle(self) -> None:
        for number, shard in sorted(self._open.items()):
            if shard is not _PUBLISHED:
                self.records_written.inc(shard.publish(number))
        self._open = {}


_PUBLISHED: _ShardFile = object()  # type: ignore[assignment]  # marks a shard already published


class WritePredictionShards(beam.PTransform):
    """(PatchKey, prediction bands) → Earth Engine-layout prediction shards ``names`` in ``out_dir``
    (a folder or a URI), each record at its key's shard and position.

    With ``grouped`` the records of a shard are brought together first (they were spread over
    workers); otherwise each shard's records stream through one bundle in order.
    """

    def __init__(
        self,
        out_dir: str,
        names: Sequence[str],
        compression_level: int,
        expected: Sequence[int] | None,
        grouped: bool,
    ) -> None:
        super().__init__()
        self.out_dir, self.names, self.level = out_dir, list(names), compression_level
        self.expected, self.grouped = expected, grouped

    def expand(self, predictions: beam.PCollection) -> beam.PCollection:
        records = predictions | "EncodeRecord" >> beam.Map(
            lambda kv: (kv[0].shard, (kv[0].position, encode_example(kv[1])))
        )
        if self.grouped:
            return (
                records
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(WriteShard(self.out_dir, self.names, self.level))
            )
        return records | "StreamShardsInOrder" >> beam.ParDo(
            StreamShardsInOrder(self.out_dir, self.names, self.level, self.expected)
        )
