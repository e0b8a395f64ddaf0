"""Records per TFRecord shard of an export that stays in an object store.

An Earth Engine export's mixer says how many patches there are, not how they fall into shards, and
terrabeam's manifest needs both (a record's grid index is its shard's offset plus its position).
Counting means reading every shard. A small export is read here, a shard at a time (one read, no
upload, one shard on disk at once): faster than starting a job. A larger one is counted by the
runner's workers beside the data, the counts coming back as Beam metrics, so none of it passes
through the launching machine (a Dataflow job takes minutes to start; an export of a gigabyte
takes seconds to read on Google Cloud).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from terrabeam import NAMESPACE, beam_local
from terrabeam.errors import RecordCountError
from terrabeam.storage import local_copy
from terrabeam.tfrecord import count_records

COUNTED = "shards_counted"
COUNT_HERE_MAX_BYTES = 2**30  # an export up to this size is counted by this machine


def count_shards(
    shards: dict[str, int], flags: Sequence[str], here_max_bytes: int | None = None
) -> list[int]:
    """Records in each shard of ``shards`` (URI → size, in order): here if they add up to at most
    ``here_max_bytes`` (default COUNT_HERE_MAX_BYTES), else by the workers of a pipeline with
    ``flags``."""
    limit = COUNT_HERE_MAX_BYTES if here_max_bytes is None else here_max_bytes
    if sum(shards.values()) > limit:
        return count_on_workers(list(shards), flags)
    return [count_here(uri) for uri in shards]


def count_here(uri: str) -> int:
    """Records of one shard, read through a temporary local copy."""
    from terrabeam import storage

    with tempfile.TemporaryDirectory(prefix="terrabeam-count-") as folder:
        path = f"{folder}/{uri.rsplit('/', 1)[-1]}"
        storage.copy_file(uri, path)
        return count_records(path)


class _CountShard(beam.DoFn):
    """(shard number, URI) → its record count as metric ``records_in_shard_<n>``."""

    def process(self, element: tuple[int, str]) -> Iterator[None]:
        number, uri = element
        path = local_copy(uri) if "://" in uri else uri  # as predict's workers read them
        beam.metrics.Metrics.counter(NAMESPACE, f"records_in_shard_{number}").inc(count_records(path))
        beam.metrics.Metrics.counter(NAMESPACE, COUNTED).inc()
        return iter(())


def count_on_workers(uris: Sequence[str], flags: Sequence[str]) -> list[int]:
    """Records in each shard of ``uris``, counted by a Beam pipeline with ``flags``."""
    pipeline = beam_local.pipeline(PipelineOptions(list(flags)))
    _ = (
        pipeline
        | "Shards" >> beam.Create(list(enumerate(uris)), reshuffle=len(uris) > 1)
        | "CountRecords" >> beam.ParDo(_CountShard())
    )
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals = {c.key.metric.name: c.committed or c.attempted or 0 for c in counters}
    if totals.get(COUNTED, 0) != len(uris):
        raise RecordCountError(
            f"{len(uris)} shards to count, the workers reported {totals.get(COUNTED, 0)} "
            f"(first: {uris[0] if uris else 'none'})"
        )
    return [int(totals.get(f"records_in_shard_{number}", 0)) for number in range(len(uris))]
