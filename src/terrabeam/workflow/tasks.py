"""Step tasks: the start → poll protocol the runner drives.

A local task does its work in ``start()``. A remote task (an Earth Engine export or ingestion)
returns the task's operation name from ``start()``, which the runner records with the step, and is
polled until the task ends. A task given the id recorded by an earlier attempt adopts that task
instead of starting another, unless it failed or was cancelled.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as day_time
from pathlib import Path
from typing import Protocol

from terrabeam.config import PipelineConfig
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest
from terrabeam.sources.earthengine_pixels import uses_compute_pixels
from terrabeam.workflow import steps
from terrabeam.workspace import Workspace

log = logging.getLogger("terrabeam.workflow")


class StepTask(Protocol):
    def start(self) -> str | None: ...

    def poll(self) -> steps.StepReport | None: ...


def start_and_poll(
    task: StepTask,
    sleep: Callable[[float], None] = time.sleep,
    on_start: Callable[[str], None] | None = None,
) -> steps.StepReport:
    """Start a task (``on_start`` gets its external id, if any) and poll it with pauses growing
    from 1 s to 60 s until it reports."""
    external_id = task.start()
    if external_id and on_start is not None:
        on_start(external_id)
    pause = 1.0
    while (report := task.poll()) is None:
        sleep(pause)
        pause = min(pause * 2, 60.0)
    return report


@dataclass(frozen=True)
class RunContext:
    """What a step knows of its run beyond the workspace: window, creation time, a recorded task id."""

    run_id: str
    window: tuple[str, str] | None = None
    created: float | None = None
    external_id: str | None = None


class LocalTask:
    """A step that runs in this process: start() does the work, poll() returns its report."""

    def __init__(self, function: Callable[[], steps.StepReport]) -> None:
        self._function = function
        self._report: steps.StepReport | None = None

    def start(self) -> str | None:
        self._report = self._function()
        return None

    def poll(self) -> steps.StepReport | None:
        return self._report


def _adoptable(config: PipelineConfig, external_id: str | None, what: str) -> str | None:
    """The recorded task if it is still running or succeeded; None if there is none or it failed."""
    if not external_id:
        return None
    from terrabeam.earthengine import connect, task_state

    connect(config.earthengine)  # a resumed run may be a new process

    state = task_state(external_id)
    if state.state in ("FAILED", "CANCELLED"):
        log.warning(
            "earlier %s task %s %s (%s); starting a new one", what, external_id, state.state, state.error
        )
        return None
    log.info("resuming %s task %s (%s)", what, external_id, state.state)
    return external_id


class EarthEngineExportTask:
    """Export from Earth Engine to Cloud Storage, then into the run's export folder: downloaded, or,
    where the workers are elsewhere and the workspace is on Cloud Storage too, copied there inside
    the store, its shards' records counted here (a small export, read once) or by the workers."""

    def __init__(
        self, config: PipelineConfig, workspace: Workspace, context: RunContext, beam_args: Sequence[str] = ()
    ) -> None:
        self.config, self.workspace, self.context = config, workspace, context
        self.beam_args = beam_args
        self.operation: str | None = None
        self.started = time.perf_counter()

    def start(self) -> str | None:
        from terrabeam.sources.earthengine import start_export

        self.operation = _adoptable(self.config, self.context.external_id, "export")
        if self.operation is None:
            self.operation = start_export(
                self.config,
                self.context.run_id,
                self.context.window,
                self.context.created,
                after=self.context.external_id,
            )
            log.info("started Earth Engine export %s", self.operation)
        return self.operation

    def poll(self) -> steps.StepReport | None:
        from terrabeam.earthengine import raise_if_failed, task_state
        from terrabeam.sources.earthengine import download_export

        state = task_state(self.operation)
        if not state.done:
            return None
        raise_if_failed(state, "export")
        if self._workers_elsewhere():
            grid, manifest = self._publish_in_place()
        else:
            with self.workspace.staging("export") as staging:
                grid, manifest = download_export(self.config, self.context.run_id, staging)
        return steps.StepReport(
            "export",
            time.perf_counter() - self.started,
            {
                "patches": grid.total_patches,
                "shards": len(manifest.shard_records),
                "bands": manifest.bands,
                "region_pixels": [manifest.region_width, manifest.region_height],
                "earthengine_task": self.operation,
            },
        )

    def _workers_elsewhere(self) -> bool:
        remote = self.workspace.remote
        return remote is not None and remote.startswith("gs://") and self.config.runner.kind != "local"

    def _publish_in_place(self) -> tuple[Grid, ExportManifest]:
        from terrabeam.predict.pipeline import pipeline_flags
        from terrabeam.sources.earthengine import reference_export
        from terrabeam.sources.shard_counts import count_shards

        flags = pipeline_flags(self.config, self.beam_args)
        self.workspace.run_dir.mkdir(parents=True, exist_ok=True)
        # a ".staging-" folder: removed as a leftover if this process is killed meanwhile
        folder = Path(tempfile.mkdtemp(prefix=".export.staging-", dir=self.workspace.run_dir))
        try:
            grid, manifest, shards = reference_export(
                self.config, self.context.run_id, folder, lambda shards: count_shards(shards, flags)
            )
            self.workspace.publish_remote("export", shards, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return grid, manifest


class EarthEngineDeliverTask:
    """Deliver the map into an Earth Engine image collection, and write the local files too: its COGs
    registered in place (mode cog, at once), or the prediction shards ingested (mode tfrecord, a task
    to poll)."""

    def __init__(self, config: PipelineConfig, workspace: Workspace, context: RunContext) -> None:
        self.config, self.workspace, self.context = config, workspace, context
        self.operation: str | None = None
        self.report: steps.StepReport | None = None
        self.started = time.perf_counter()
        self.start_time, self.end_time, self.run_date = ingestion_times(config, context)

    def _register_cogs(self) -> steps.StepReport:
        from terrabeam.layout import ExportManifest, manifest_path
        from terrabeam.sinks.earthengine import asset_id
        from terrabeam.sinks.earthengine_cog import register_cogs
        from terrabeam.sinks.mosaic import TILES_FOLDER
        from terrabeam.sinks.tiles import map_layers

        report = steps.deliver_step(self.config, self.workspace)
        predict_dir = self.workspace.require_step("predict")
        bands = ExportManifest.read(manifest_path(predict_dir, self.config.predict.prefix)).bands
        layers = map_layers(self.config, bands)
        deliver = self.workspace.step_dir("deliver")
        first = f"{self.config.name}-{layers[0].stem}-"
        tile_names = sorted(
            p.name.removeprefix(first).removesuffix(".tif")
            for p in (deliver / TILES_FOLDER).glob(f"{first}r*c*.tif")
        )
        base = asset_id(self.config, self.context.run_id, self.start_time, self.end_time, self.run_date)
        assets = register_cogs(
            self.config,
            deliver,
            layers,
            tile_names,
            base,
            self.context.run_id,
            self.start_time,
            self.end_time,
        )
        report.details["outputs"].extend(f"earthengine://{asset}" for asset in assets)
        report.details["earthengine_assets"] = assets
        report.seconds = time.perf_counter() - self.started
        return report

    def start(self) -> str | None:
        from terrabeam.sinks.earthengine import start_ingestion

        if self.config.outputs.earthengine.mode == "cog":  # registered at once: nothing to poll
            self.report = self._register_cogs()
            return None
        self.operation = _adoptable(self.config, self.context.external_id, "ingestion")
        if self.operation is None:
            predict_dir = self.workspace.require_step("predict")
            ingestion = start_ingestion(
                self.config,
                predict_dir,
                self.context.run_id,
                self.start_time,
                self.end_time,
                self.run_date,
                after=self.context.external_id,
            )
            self.operation = ingestion.operation
            if self.operation is None:
                log.warning("asset %s exists already; not ingesting again", ingestion.asset)
        return self.operation

    def poll(self) -> steps.StepReport | None:
        from terrabeam.earthengine import raise_if_failed, task_state
        from terrabeam.sinks.earthengine import asset_id

        if self.report is not None:
            return self.report
        if self.operation is not None:
            state = task_state(self.operation)
            if not state.done:
                return None
            raise_if_failed(state, "ingestion")
        report = steps.deliver_step(self.config, self.workspace)
        asset = asset_id(self.config, self.context.run_id, self.start_time, self.end_time, self.run_date)
        report.details["outputs"].append(f"earthengine://{asset}")
        report.details["earthengine_task"] = self.operation
        report.seconds = time.perf_counter() - self.started
        return report


def ingestion_times(config: PipelineConfig, context: RunContext) -> tuple[datetime, datetime, datetime]:
    """(start, end, run date) of the delivered image: the composite window for an Earth Engine source,
    else the run's window, else the run's day."""
    from terrabeam.sources.earthengine import run_composite_window, run_date

    day = run_date(context.window, context.created)
    if config.source.kind == "earthengine":
        start, end = run_composite_window(config.source, context.window, context.created)  # type: ignore[arg-type]
    elif context.window is not None:
        start, end = (datetime.fromisoformat(w).date() for w in context.window)
    else:
        start, end = day, day
    as_datetime = lambda d: datetime.combine(d, day_time(), UTC)  # noqa: E731
    return as_datetime(start), as_datetime(end), as_datetime(day)


def task_for(
    name: str,
    config: PipelineConfig,
    workspace: Workspace,
    beam_args: Sequence[str],
    context: RunContext,
) -> StepTask:
    """The task that runs step ``name`` of this config."""
    if name == "export" and config.source.kind == "earthengine" and not uses_compute_pixels(config):
        return EarthEngineExportTask(config, workspace, context, beam_args)
    if name == "deliver" and config.outputs.earthengine is not None:
        return EarthEngineDeliverTask(config, workspace, context)
    function = steps.LOCAL_STEPS[name]
    return LocalTask(lambda: function(config, workspace, beam_args))
