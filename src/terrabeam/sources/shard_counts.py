"""Records per TFRecord shard, counted where the shards are read: by the runner's workers.

An Earth Engine export's mixer says how many patches there are, not how they fall into shards, and
terrabeam's manifest needs both (a record's grid index is its shard's offset plus its position).
Counting means reading every shard; on a remote runner its workers do it beside the data, and the
counts come back as Beam metrics, so no shard passes through the launching machine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from terrabeam import NAMESPACE, beam_local
from terrabeam.errors import RecordCountError
from terrabeam.storage import local_copy
from terrabeam.tfrecord import count_records

COUNTED = "shards_counted"


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
