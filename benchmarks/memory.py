"""Run a command and measure its wall time and the peak resident memory of its whole process tree."""

from __future__ import annotations

import subprocess
import time

import psutil


def run_measured(
    command: list[str], interval: float = 0.05, env: dict[str, str] | None = None
) -> tuple[float, int]:
    """(seconds, peak RSS in bytes summed over the process and all its descendants)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(interval)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, peak
