"""`terrabeam schedule`: run the pipeline for every interval of a cron schedule, on one machine.

Each fire time closes a window [previous fire, this fire); a window already delivered is never run
again; windows that closed while no scheduler was running are caught up by policy (all / latest /
none). The clock and the sleep are injectable, so tests can drive months in milliseconds.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from croniter import croniter

from terrabeam.config import PipelineConfig, ScheduleConfig
from terrabeam.errors import ConfigError, WorkspaceError
from terrabeam.workflow.state import RunState

log = logging.getLogger("terrabeam.schedule")

Window = tuple[str, str]


def fire_times(schedule: ScheduleConfig, until: datetime) -> list[datetime]:
    """Fire times from the first at or after ``schedule.start`` up to ``until`` (inclusive)."""
    times = []
    cursor = croniter(schedule.cron, schedule.start - timedelta(seconds=1))
    while (moment := cursor.get_next(datetime)) <= until:
        times.append(moment)
    return times


def closed_windows(schedule: ScheduleConfig, now: datetime) -> list[Window]:
    """Every window that has closed by ``now``, oldest first."""
    times = fire_times(schedule, now)
    return [(a.isoformat(), b.isoformat()) for a, b in zip(times, times[1:], strict=False)]


class Scheduler:
    """Decides which windows are due and runs them in order, one at a time."""

    def __init__(
        self,
        config: PipelineConfig,
        root: Path,
        run_window: Callable[[Window], object],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if config.schedule is None:
            raise ConfigError(f"{config.source_path or config.name}: no 'schedule:' section (cron, start)")
        self.config = config
        self.schedule = config.schedule
        self.root = root
        self.run_window = run_window
        self.clock = clock
        self.started = False
        self.skipped: set[Window] = set()  # missed windows the catch-up policy left out

    def delivered(self) -> set[Window]:
        """Windows done: delivered, or without data unless ``schedule.wait_for_data``."""
        closed = ("done",) if self.schedule.wait_for_data else ("done", "no_data")
        state = RunState(self.root / "terrabeam.db")
        try:
            return {
                (r.window_start, r.window_end)
                for r in state.list_runs()
                if r.pipeline == self.config.name and r.window_start and r.status in closed
            }
        finally:
            state.close()

    def due(self) -> list[Window]:
        """Windows to run now: closed and not delivered. On this scheduler's first look, the windows
        that closed before it started are filtered by the catch-up policy, and the ones it leaves out
        stay skipped; later windows always run (a failed one again at the next look)."""
        pending = [w for w in closed_windows(self.schedule, self.clock()) if w not in self.delivered()]
        pending = [w for w in pending if w not in self.skipped]
        if not self.started:
            self.started = True
            policy = self.schedule.catch_up
            chosen = pending if policy == "all" else pending[-1:] if policy == "latest" else []
            self.skipped.update(w for w in pending if w not in chosen)
            if self.skipped:
                log.warning("catch_up=%s: skipping %d missed window(s)", policy, len(self.skipped))
            return chosen
        return pending

    def run_due(self) -> list[Window]:
        """Run every due window, oldest first; a failure is logged and retried at the next look."""
        ran = []
        for window in self.due():
            log.info("running window %s – %s", *window)
            try:
                self.run_window(window)
            except Exception as exc:  # keep serving: the window stays due
                log.error("window %s – %s failed: %s", *window, exc)
                continue
            ran.append(window)
        return ran

    def seconds_to_next_fire(self) -> float:
        now = self.clock()
        return max(0.0, (croniter(self.schedule.cron, now).get_next(datetime) - now).total_seconds())

    def serve(self, stop: threading.Event, wait: Callable[[float], object] | None = None) -> None:
        """Run due windows, then sleep until the next fire time, until ``stop`` is set (SIGTERM)."""
        wait = wait or stop.wait
        with _scheduler_lock(self.root, self.config.name):
            while not stop.is_set():
                self.run_due()
                if stop.is_set():
                    break
                wait(self.seconds_to_next_fire() + 1)


@contextmanager
def _scheduler_lock(root: Path, pipeline: str) -> Iterator[None]:
    """One scheduler per pipeline and workspace: a second one refuses at once."""
    folder = root / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{pipeline}.scheduler.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceError(
                f"a scheduler for pipeline {pipeline!r} already runs on workspace {root}"
            ) from None
        yield
