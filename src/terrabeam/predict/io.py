"""Beam transforms around the model: keyed record reading, patch decoding, post-processing, shard writing.

Every element carries its key (shard number, position in shard), so workers may process patches
in any order; the writer groups by shard and restores the order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from terrabeam.errors import InputError, RecordCountError
from terrabeam.tfrecord import RecordWriter, decode_example, encode_example, read_records

NAMESPACE = "terrabeam"


class PatchKey(NamedTuple):
    shard: int
    position: int


class ReadKeyedRecords(beam.DoFn):
    """(shard number, shard path) → (PatchKey, serialized tf.train.Example) for every record."""

    def __init__(self) -> None:
        self.records_read = beam.metrics.Metrics.counter(NAMESPACE, "records_read")

    def process(self, shard: tuple[int, str]) -> Iterator[tuple[PatchKey, bytes]]:
        number, path = shard
        for position, payload in enumerate(read_records(path)):
            self.records_read.inc()
            yield PatchKey(number, position), payload


class DecodePatch(beam.DoFn):
    """Serialized Example → (C, H, W) float32 model input, bands in model order, normalised."""

    def __init__(
        self,
        shard_paths: Sequence[str],
        bands: Sequence[str],
        shape: tuple[int, int],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        self.shard_paths = list(shard_paths)
        self.bands = list(bands)
        self.shape = shape
        self.mean = None if mean is None else np.asarray(mean, np.float32)[:, None, None]
        self.std = None if std is None else np.asarray(std, np.float32)[:, None, None]

    def process(self, element: tuple[PatchKey, bytes]) -> Iterator[tuple[PatchKey, np.ndarray]]:
        key, payload = element
        where = f"{self.shard_paths[key.shard]} record {key.position}"
        try:
            features = decode_example(payload, frozenset(self.bands))
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        height, width = self.shape
        patch = np.empty((len(self.bands), height, width), dtype=np.float32)
        for i, band in enumerate(self.bands):
            values = features.get(band)
            if values is None:
                available = sorted(decode_example(payload))
                raise InputError(f"{where}: band {band!r} missing; the record has {available}")
            if len(values) != height * width:
                raise InputError(
                    f"{where}: band {band!r} has {len(values)} values, expected {height}×{width}="
                    f"{height * width} (patch size + kernel margin); check grid.kernel_size"
                )
            patch[i] = np.reshape(values, (height, width))
        if self.mean is not None:
            patch -= self.mean
            patch /= self.std
        yield key, patch


class PostProcess(beam.DoFn):
    """Model output (K, H, W) → Example at core size: ``class`` (int64 argmax) + ``prob_<class>`` floats."""

    def __init__(self, classes: Sequence[str], margin: tuple[int, int], logits: bool) -> None:
        self.classes = list(classes)
        self.margin = margin  # (kw/2, kh/2)
        self.logits = logits

    def process(self, element: tuple[PatchKey, PredictionResult]) -> Iterator[tuple[int, tuple[int, bytes]]]:
        key, result = element
        yield key.shard, (key.position, encode_example(self.features(np.asarray(result.inference))))

    def features(self, output: np.ndarray) -> dict[str, np.ndarray]:
        mx, my = self.margin
        _, height, width = output.shape
        core = output[:, my : height - my, mx : width - mx].astype(np.float32, copy=False)
        if self.logits:
            core = np.exp(core - core.max(axis=0, keepdims=True))
            core /= core.sum(axis=0, keepdims=True)
        features = {"class": np.argmax(core, axis=0).astype(np.int64)}
        for i, name in enumerate(self.classes):
            features[f"prob_{name}"] = core[i]
        return features


class _ShardFile:
    """One prediction shard being written under a temporary name, published by rename when complete."""

    def __init__(self, out_dir: str, name: str, compression_level: int) -> None:
        self.final = Path(out_dir) / name
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
    in order, so nothing needs grouping: memory holds only records that arrive out of turn, and
    each shard is published when the bundle finishes (a retried bundle rewrites its shards).
    """

    def __init__(self, out_dir: str, names: Sequence[str], compression_level: int) -> None:
        self.out_dir = out_dir
        self.names = list(names)
        self.compression_level = compression_level
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

    def finish_bundle(self) -> None:
        for number, shard in sorted(self._open.items()):
            self.records_written.inc(shard.publish(number))
        self._open = {}
