"""The scheduler with an injected clock: windows in order, delivered ones skipped, catch-up policies,
fresh windows as they close, a clean exit on SIGTERM. Synthetic scene and model (tiny_pipeline)."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest

from terrabeam.cli import main
from terrabeam.config import load_config
from terrabeam.errors import WorkspaceError
from terrabeam.workflow.schedule import Scheduler, closed_windows
from terrabeam.workflow.state import RunState

MONTHLY = {"cron": "0 0 1 * *", "start": "2026-01-01T00:00:00Z"}
JAN = ("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
FEB = ("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
MAR = ("2026-03-01T00:00:00+00:00", "2026-04-01T00:00:00+00:00")
APR = ("2026-04-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00")


def _config(tiny_pipeline, **schedule):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["schedule"] = MONTHLY | schedule
    return write(doc)


def _deliver(root, window, pipeline="tiny"):
    state = RunState(root / "terrabeam.db")
    state.create_run(f"done-{window[0][:7]}", pipeline, "hash", window, ["export"])
    state.finish_run(f"done-{window[0][:7]}", "done")
    state.close()


def _scheduler(config_path, root, clock):
    """A scheduler whose runs only record the window as delivered (no pipeline work)."""
    ran = []

    def run(window):
        ran.append(window)
        _deliver(root, window)

    return Scheduler(load_config(config_path), root, run, clock=lambda: clock[0]), ran


def test_windows_are_the_closed_cron_intervals(tiny_pipeline):
    schedule = load_config(_config(tiny_pipeline)).schedule
    assert closed_windows(schedule, datetime(2026, 4, 15, tzinfo=UTC)) == [JAN, FEB, MAR]
    assert closed_windows(schedule, datetime(2026, 1, 20, tzinfo=UTC)) == []


@pytest.mark.parametrize(("policy", "expected"), [("all", [JAN, MAR]), ("latest", [MAR]), ("none", [])])
def test_catch_up_policy_and_delivered_windows(tmp_path, tiny_pipeline, policy, expected):
    root = tmp_path / "ws"
    _deliver(root, FEB)
    clock = [datetime(2026, 4, 15, tzinfo=UTC)]
    scheduler, ran = _scheduler(_config(tiny_pipeline, catch_up=policy), root, clock)
    assert scheduler.run_due() == expected and ran == expected
    clock[0] = datetime(2026, 5, 2, tzinfo=UTC)  # April closes while the scheduler runs: always run
    assert scheduler.run_due() == [APR]
    assert scheduler.run_due() == []


def test_serve_runs_each_window_as_it_closes_and_stops(tmp_path, tiny_pipeline):
    root = tmp_path / "ws"
    clock = [datetime(2026, 1, 10, tzinfo=UTC)]
    scheduler, ran = _scheduler(_config(tiny_pipeline, catch_up="none"), root, clock)
    stop = threading.Event()
    waits = []

    def wait(seconds):
        waits.append(seconds)
        clock[0] = datetime(2026, 1 + len(waits), 1, 0, 0, 1, tzinfo=UTC)  # jump past the next fire
        if len(waits) == 3:
            stop.set()

    scheduler.serve(stop, wait)
    assert ran == [JAN, FEB]  # Feb 1 closed January, Mar 1 closed February; then stopped
    assert 21 * 86400 < waits[0] < 23 * 86400  # from Jan 10 to Feb 1


def test_schedule_once_runs_real_windows_and_never_twice(tmp_path, tiny_pipeline, capsys):
    config = _config(tiny_pipeline, start="2020-01-01T00:00:00Z", cron="0 0 1 1 *", catch_up="all")
    assert main(["schedule", str(config), "--once", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["windows_run"]
    assert len(first) >= 6 and first[0] == ["2020-01-01T00:00:00+00:00", "2021-01-01T00:00:00+00:00"]
    assert main(["schedule", str(config), "--once", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows_run"] == []
    state = RunState(tmp_path / "ws" / "terrabeam.db")
    runs = state.list_runs()
    state.close()
    assert [(r.window_start, r.window_end) for r in runs] == [tuple(w) for w in first]
    assert all(r.status == "done" for r in runs)


def test_second_scheduler_refuses_and_sigterm_stops_cleanly(tmp_path, tiny_pipeline):
    config = _config(tiny_pipeline, start="2099-01-01T00:00:00Z")  # nothing due for a long time
    process = subprocess.Popen(
        [sys.executable, "-m", "terrabeam", "schedule", str(config)], stderr=subprocess.PIPE, text=True
    )
    lock = tmp_path / "ws" / ".locks" / "tiny.scheduler.lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    scheduler = Scheduler(load_config(config), tmp_path / "ws", lambda w: None)
    with pytest.raises(WorkspaceError, match="already runs"):
        scheduler.serve(threading.Event(), lambda s: None)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "scheduler stopped" in process.stderr.read()
