"""Runs with memory: each run and step recorded in the workspace's SQLite state, transient failures
retried with exponential backoff and jitter, a re-run resuming from the first unfinished step, and a
per-pipeline lock so two processes never do the same work.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from terrabeam.config import PipelineConfig, WorkflowConfig
from terrabeam.errors import (
    DiskFullError,
    Interrupted,
    NoDataError,
    TerrabeamError,
    TransientError,
    WorkspaceError,
    chain,
    describe,
    find_cause,
    signal_number,
)
from terrabeam.progress import RUN_FILE, progress_file
from terrabeam.workflow import steps
from terrabeam.workflow.state import RunRecord, RunState
from terrabeam.workflow.tasks import LocalTask, RunContext, StepTask, start_and_poll, task_for
from terrabeam.workspace import Workspace, new_run_id

log = logging.getLogger("terrabeam.workflow")


# Tests may replace a step by a function(config, workspace, beam_args) → StepReport.
StepFunction = Callable[..., steps.StepReport]


_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Network trouble, HTTP 408/429/5xx, lost workers: worth another attempt. terrabeam's own
    errors (bad config, input, model) and anything unknown are permanent."""
    for cause in chain(exc):
        if isinstance(cause, TransientError | ConnectionError | TimeoutError):
            return True
        status = getattr(getattr(cause, "resp", None), "status", None) or getattr(cause, "status_code", None)
        if isinstance(status, int) and status in _TRANSIENT_HTTP:
            return True
        if isinstance(cause, TerrabeamError):
            return False
    return False


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n + 1: base × 2^(n-1), capped, times a random factor in [0.5, 1.5)."""

    base: float
    cap: float

    @classmethod
    def from_config(cls, workflow: WorkflowConfig) -> Backoff:
        return cls(workflow.backoff_seconds, workflow.max_backoff_seconds)

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.cap, self.base * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.5)


@contextmanager
def pipeline_lock(root: Path, pipeline: str, wait: bool) -> Iterator[None]:
    """An exclusive lock on ``<workspace>/.locks/<pipeline>.lock``, released even if the process dies."""
    folder = root / ".locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / f"{pipeline}.lock", "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise WorkspaceError(f"workspace {root} is not writable ({exc.strerror or exc})") from None
    try:
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle, flags)
        except BlockingIOError:
            raise WorkspaceError(
                f"pipeline {pipeline!r} is running in another process (lock {handle.name}); "
                "wait for it, or run without --no-wait to queue behind it"
            ) from None
        yield
    finally:
        handle.close()


class Runner:
    """Executes runs of one pipeline in one workspace, recording everything in its RunState."""

    def __init__(
        self,
        config: PipelineConfig,
        root: Path,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        step_functions: dict[str, StepFunction] | None = None,
        remote: str | None = None,
    ) -> None:
        """``root``: the local workspace folder (for a gs:// or s3:// workspace, its local mirror, with
        ``remote`` its URI)."""
        self.config = config
        self.root = root
        self.remote = remote
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.step_functions = step_functions or {}
        self.backoff = Backoff.from_config(config.workflow)

    def state(self) -> RunState:
        try:
            return RunState(self.root / "terrabeam.db")
        except OSError as exc:
            raise WorkspaceError(f"workspace {self.root} is not writable ({exc.strerror or exc})") from None

    def run(
        self,
        run_id: str | None = None,
        window: tuple[str, str] | None = None,
        beam_args: Sequence[str] = (),
        force: bool = False,
        wait: bool = True,
    ) -> RunRecord:
        """Run (or resume) the pipeline for ``window``; a delivered run is not repeated unless forced."""
        config = self.config
        steps.check_access(config)  # e.g. Earth Engine credentials: fail before touching the workspace
        with pipeline_lock(self.root, config.name, wait):
            pull_history(self.root, self.remote)
            state = self.state()
            try:
                record = self._open_run(state, run_id, window, force)
                if record.status == "done":
                    log.info("run %s already delivered; nothing to do", record.id)
                    return record
                return self._execute(state, record, beam_args)
            finally:
                state.close()
                push_history(self.root, self.remote)

    def _open_run(self, state: RunState, run_id: str | None, window, force: bool) -> RunRecord:
        config = self.config
        if run_id is not None:
            record = state.get_run(run_id)
            if record is not None and record.config_hash != config.fingerprint():
                raise WorkspaceError(
                    f"run {run_id} was made with another configuration (hash {record.config_hash}, now "
                    f"{config.fingerprint()}); start a new run instead"
                )
        else:
            record = None if force else state.find_run(config.name, config.fingerprint(), window)
        if record is None:
            new_id = run_id or new_run_id(self.root)
            state.create_run(
                new_id,
                config.name,
                config.fingerprint(),
                window,
                steps.run_steps(config),
                str(config.source_path or ""),
            )
            record = state.get_run(new_id)
        assert record is not None
        return record

    def _execute(self, state: RunState, record: RunRecord, beam_args: Sequence[str]) -> RunRecord:
        config = self.config
        window = (record.window_start, record.window_end) if record.window_start else None
        workspace = Workspace(self.root, record.id, self.remote, window, record.created)
        for leftover in workspace.remove_leftovers():
            log.info("removed %s, left by an interrupted step", leftover)
        workspace.claim(config.name, config.fingerprint(), same_config=True)
        state.reopen_run(record.id)
        reports = []
        try:
            started = time.perf_counter()
            steps.validate_before_run(config, beam_args)
            validate_seconds = time.perf_counter() - started
            kept = []
            for number, step in enumerate(record.steps, 1):
                if step.status == "done" and workspace.has_step(step.name):
                    reports.append(steps.StepReport(step.name, step.seconds or 0.0, step.outputs))
                    kept.append(step.name)
                    continue
                if kept:
                    log.info("run %s: resuming at %s (%s kept)", record.id, step.name, ", ".join(kept))
                    kept = []
                report = self._attempt(state, record, step.name, workspace, beam_args)
                for part, what in (("shards", "prediction shards"), ("tiles", "map tiles")):
                    if reused := report.details.get(f"{part}_reused"):
                        log.info("run %s: %d of %d %s kept", record.id, reused, report.details[part], what)
                reports.append(report)
                if number < len(record.steps):  # for the next step (~0.1 s; none after the last)
                    steps.release_free_memory()
            summary = steps.write_summary(config, workspace, reports, validate_seconds)
        except BaseException as exc:
            interrupt = find_cause(exc, KeyboardInterrupt)
            empty = find_cause(exc, NoDataError)
            if empty is not None:  # nothing to predict in this window: not a failure
                log.info("run %s: %s", record.id, empty)
                state.finish_run(record.id, "no_data", error=_one_line(empty))
                return state.get_run(record.id)
            status, error = ("failed", _one_line(exc)) if interrupt is None else _interrupted(interrupt)
            _record(exc, state, partial(state.finish_run, record.id, status, error=error))
            if interrupt is None:
                raise
            where = self.remote or self.root
            raise Interrupted(
                f"interrupted; resume with `terrabeam resume {record.id} --workspace {where}`",
                signal_number(interrupt),
                record.id,
            ) from exc
        data = json.loads(summary.read_text())
        state.finish_run(record.id, "done", pixels=data.get("pixels"), outputs=data.get("outputs"))
        return state.get_run(record.id)

    def _attempt(
        self, state: RunState, record: RunRecord, name: str, workspace: Workspace, beam_args: Sequence[str]
    ) -> steps.StepReport:
        limit = self.config.workflow.retries
        run_id = record.id
        window = (record.window_start, record.window_end) if record.window_start else None
        while True:
            attempt = state.start_attempt(run_id, name)
            recorded = next(s.external_id for s in state.get_run(run_id).steps if s.name == name)
            context = RunContext(run_id, window, record.created, recorded)
            task = self._task(name, workspace, beam_args, context)
            try:
                with progress_file(workspace.run_dir / RUN_FILE):
                    report = self._start_and_poll(task, state, run_id, name)
            except BaseException as exc:
                interrupt = find_cause(exc, KeyboardInterrupt)
                if interrupt is not None:
                    status, error = _interrupted(interrupt)
                elif not isinstance(exc, Exception):
                    raise
                elif find_cause(exc, NoDataError) is not None:
                    status, error = "no_data", _one_line(exc)
                else:
                    status = "pending" if is_transient(exc) and attempt < limit else "failed"
                    error = _one_line(exc)
                _record(exc, state, partial(state.fail_step, run_id, name, error, status))
                if status != "pending":
                    raise
                delay = self.backoff.delay(attempt, self.rng)
                log.warning("step %s attempt %d failed (%s); retrying in %.1f s", name, attempt, exc, delay)
                self.sleep(delay)
                continue
            state.finish_step(run_id, name, report.seconds, report.details)
            return report

    def _task(
        self, name: str, workspace: Workspace, beam_args: Sequence[str], context: RunContext
    ) -> StepTask:
        if name in self.step_functions:
            function = self.step_functions[name]
            return LocalTask(lambda: function(self.config, workspace, beam_args))
        return task_for(name, self.config, workspace, beam_args, context)

    def _start_and_poll(self, task: StepTask, state: RunState, run_id: str, name: str) -> steps.StepReport:
        """Start a task, record its external id, and poll with growing pauses until it reports."""
        return start_and_poll(
            task, self.sleep, lambda external_id: state.set_external_id(run_id, name, external_id)
        )


HISTORY = "terrabeam.db"


def pull_history(root: Path, remote: str | None) -> None:
    """For a gs:// / s3:// workspace: start from the run history kept beside its runs, if this
    machine's mirror has none yet (another machine ran the pipeline before)."""
    local = root / HISTORY
    if remote is None or local.exists():
        return
    from terrabeam import storage

    if storage.exists(f"{remote}/{HISTORY}"):
        storage.copy_file(f"{remote}/{HISTORY}", str(local))


def push_history(root: Path, remote: str | None) -> None:
    """Copy the run history (closed, so SQLite has folded its journal in) beside the remote runs."""
    local = root / HISTORY
    if remote is not None and local.exists():
        from terrabeam import storage

        storage.copy_file(str(local), f"{remote}/{HISTORY}")


def _record(exc: BaseException, state: RunState, write: Callable[[], None]) -> None:
    """Record how a step or run ended (``write``, a RunState change), best effort: after a full disk
    the database (often on the same disk) first gets its reserved space back; if it still cannot be
    written, say so and let the original error through."""
    if find_cause(exc, DiskFullError) is not None:
        state.release_reserve()
    try:
        write()
    except TerrabeamError as failure:
        log.warning("could not record the outcome in the run history: %s", failure)


def _interrupted(interrupt: KeyboardInterrupt) -> tuple[str, str]:
    """(status, error) recorded for an interrupted step or run."""
    return "interrupted", f"interrupted by {signal.Signals(signal_number(interrupt)).name}"


def _one_line(exc: BaseException) -> str:
    return describe(exc).splitlines()[0][:2000]
