"""Progress of long steps: a bar on a terminal (done / total, rate, ETA, via tqdm), plain log lines
at every 10 % otherwise, so CI logs and files stay readable."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("terrabeam.progress")


class Progress:
    """Counts units of work (patches) towards a known total."""

    def __init__(self, label: str, total: int, unit: str = "patch", stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._next_report = 0.1
        self._bar = (
            tqdm(total=total, desc=label, unit=unit, file=self.stream, leave=True, dynamic_ncols=True)
            if getattr(self.stream, "isatty", lambda: False)() and log.level <= logging.INFO
            else None  # off a terminal: log lines; none either once set above INFO (terrabeam -q)
        )

    def advance(self, count: int = 1) -> None:
        self.done += count
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

    def close(self) -> None:
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
