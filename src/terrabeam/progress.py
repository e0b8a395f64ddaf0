"""Progress of long steps: a bar on a terminal (done / total, rate, ETA, via tqdm), plain log lines
at every 10 % otherwise, so CI logs and files stay readable; inside ``progress_file`` also a small
JSON file, the live progress `terrabeam serve` shows."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("terrabeam.progress")

RUN_FILE = ".progress.json"  # the progress file in a run's folder, while a step of it runs
FILE_INTERVAL = 0.5  # seconds between two writes of the progress file

_progress_path: Path | None = None  # set by progress_file; a module global: watchers are threads


@contextmanager
def progress_file(path: Path) -> Iterator[None]:
    """While inside, every Progress also writes ``{label, done, total, unit, rate, updated}`` to
    ``path`` (replaced whole, at most every FILE_INTERVAL and when it closes); best effort. The file
    is removed on the way out: it tells of a step in progress only."""
    global _progress_path
    previous, _progress_path = _progress_path, path
    try:
        yield
    finally:
        _progress_path = previous
        path.unlink(missing_ok=True)


class Progress:
    """Counts units of work (patches) towards a known total."""

    def __init__(self, label: str, total: int, unit: str = "patch", stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._next_report = 0.1
        self._file, self._file_written = _progress_path, 0.0
        self._write_file()
        self._bar = (
            tqdm(total=total, desc=label, unit=unit, file=self.stream, leave=True, dynamic_ncols=True)
            if getattr(self.stream, "isatty", lambda: False)() and log.level <= logging.INFO
            else None  # off a terminal: log lines; none either once set above INFO (terrabeam -q)
        )

    def advance(self, count: int = 1) -> None:
        self.done += count
        if time.perf_counter() - self._file_written >= FILE_INTERVAL:
            self._write_file()
        if self._bar is not None:
            self._bar.update(count)
            return
        if self.total and self.done / self.total >= self._next_report:
            elapsed = time.perf_counter() - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate else 0.0
            plural = self.unit + ("es" if self.unit.endswith(("ch", "s")) else "s")
            log.info("%s: %d/%d %s, %.1f/s, ETA %.0f s", self.label, self.done, self.total, plural, rate, eta)
            while self._next_report <= self.done / self.total:
                self._next_report += 0.1

    def _write_file(self) -> None:
        if self._file is None:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        state = {"label": self.label, "done": self.done, "total": self.total, "unit": self.unit}
        state |= {"rate": self.done / elapsed if elapsed > 0 else 0.0, "updated": time.time()}
        partial = self._file.with_name(f".{self._file.name}.partial")
        try:
            partial.write_text(json.dumps(state))
            os.replace(partial, self._file)
        except OSError:  # the progress file must never fail the step it reports on
            return
        self._file_written = now

    def close(self) -> None:
        self._write_file()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def published_progress(label: str, total: int, unit: str, count: Callable[[], int]) -> Iterator[None]:
    """Progress from what the runner has published, polled every 0.5 s with ``count()``: the runner's
    workers may be anywhere, the finished files are the truth."""
    stop = threading.Event()

    def watch(progress: Progress) -> None:
        while True:
            finished = stop.wait(0.5)
            done = count()
            if done > progress.done:
                progress.advance(done - progress.done)
            if finished:
                return

    with Progress(label, total, unit) as progress:
        watcher = threading.Thread(target=watch, args=(progress,), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
