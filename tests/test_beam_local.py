"""Beam's local runner stays on this machine: with two workers (threads, the default, or processes)
nothing listens on a non-loopback address, and worker processes die with a SIGKILLed terrabeam.
Its bundles end promptly (a short state-sampling period).
Synthetic scene and 1×1-conv model (tiny_pipeline).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
import psutil
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

import terrabeam
from terrabeam import beam_local
from terrabeam.beam_local import loopback_address
from terrabeam.cli import main

PROCESSES = {"direct_running_mode": "multi_processing"}
RUN_TIMEOUT = 300  # seconds for one predict of the tiny pipeline
DEATH_TIMEOUT = 10  # seconds for the workers of a killed terrabeam to be gone


def terrabeam_env() -> dict[str, str]:
    """This checkout's terrabeam for a child process and the workers it starts."""
    src = str(Path(terrabeam.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@dataclass
class Listening:
    """What a process tree listened on (pid, address, port) and which processes it had (pid → command)."""

    sockets: set[tuple[int, str, int]] = field(default_factory=set)
    processes: dict[int, str] = field(default_factory=dict)


@contextmanager
def listening_sockets(root: int) -> Iterator[Listening]:
    """Sample the listening TCP sockets of ``root`` and its descendants every 50 ms until the block
    ends (this test process itself left out when it is ``root``: its sockets belong to other tests)."""
    seen = Listening()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                top = psutil.Process(root)
                tree = top.children(recursive=True) + ([top] if root != os.getpid() else [])
            except psutil.NoSuchProcess:
                return
            for process in tree:
                try:
                    seen.processes[process.pid] = " ".join(process.cmdline())
                    for c in process.net_connections(kind="tcp"):
                        if c.status == psutil.CONN_LISTEN:
                            seen.sockets.add((process.pid, c.laddr.ip, c.laddr.port))
                except psutil.Error:
                    continue
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def _two_worker_config(tiny_pipeline, options: dict) -> Path:
    """The tiny scene exported into run r, and a config predicting it with two local workers."""
    document, write = tiny_pipeline
    assert main(["export", str(write()), "--run", "r"]) == 0
    document["runner"] = {"kind": "local", "workers": 2, "options": options}
    return write(document, "workers.yaml")


def _start_predict(config: Path) -> subprocess.Popen:
    """`terrabeam predict` of run r as a child process; its output (and its workers') go to a file, not
    a pipe, whose reader would wait for the workers too."""
    with config.with_suffix(".log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "terrabeam", "predict", str(config), "--run", "r"],
            env=terrabeam_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_wildcard_bind_addresses_become_loopback():
    assert loopback_address("[::]:0") == "localhost:0"
    assert loopback_address("0.0.0.0:8099") == "localhost:8099"
    assert loopback_address("127.0.0.1:5000") == "127.0.0.1:5000"
    assert loopback_address("10.1.2.3:5000") == "10.1.2.3:5000"


@pytest.mark.parametrize("options", [{}, PROCESSES], ids=["threads", "processes"])
def test_two_workers_listen_on_loopback_only(tmp_path, tiny_pipeline, options):
    """Two threads (the default) open no port and start no process; two processes get their Fn API
    servers (control, data, state, logging; one logging server per worker) on loopback only."""
    config = _two_worker_config(tiny_pipeline, options)
    process = _start_predict(config)
    with listening_sockets(process.pid) as seen:
        assert process.wait(timeout=RUN_TIMEOUT) == 0, config.with_suffix(".log").read_text()[-3000:]
    exposed = {s for s in seen.sockets if not is_loopback(s[1])}
    assert not exposed, f"listening on every interface: {exposed}"
    if options:
        workers = {pid for pid, command in seen.processes.items() if "terrabeam.beam_local" in command}
        assert len(workers) == 2, seen.processes
        assert seen.sockets, "the runner's Fn API servers were seen"
    else:
        assert seen.processes.keys() == {process.pid} and not seen.sockets


def _wait_for_workers(root: psutil.Process, count: int) -> list[psutil.Process]:
    """The descendants of ``root`` once ``count`` of them are Python worker processes."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        descendants = root.children(recursive=True)
        if sum(p.name().startswith("python") for p in descendants) >= count:
            return descendants
        time.sleep(0.05)
    pytest.fail(f"{count} worker processes did not start")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_processes_die_with_a_killed_terrabeam(tmp_path, tiny_pipeline):
    """SIGKILL right after the two worker processes started (the moment that left them, and the
    shells Beam starts them through, waiting for minutes): they are gone within seconds."""
    process = _start_predict(_two_worker_config(tiny_pipeline, PROCESSES))
    try:
        workers = _wait_for_workers(psutil.Process(process.pid), 2)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + DEATH_TIMEOUT
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in workers if _alive(p)]
    for worker in alive:
        worker.kill()
    assert not alive, f"left running after SIGKILL: {alive}"


def test_a_run_does_not_import_torch_for_beams_model_manager():
    """Beam's RunInference module would import torch (~1.2 s, ~200 MB) for a ModelManager terrabeam
    never uses (terrabeam.beam_ml); a fresh process that loads the run's steps has no torch, and
    Beam still measures a model load's memory (its ``resource`` module is there)."""
    code = (
        "import sys, terrabeam.workflow.steps\n"
        "from apache_beam.ml.inference import base\n"
        "print('torch' in sys.modules, base.ModelManager, base.resource.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "None", "resource"]
    import importlib.util

    assert importlib.util.find_spec("torch") is not None  # torch is installed: the saving is real


class _RecordSamplingPeriod(beam.DoFn):
    """Writes the sampling period of the state sampler its bundle runs under (and its pid)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def process(self, element: int) -> Iterator[int]:
        from apache_beam.runners.worker import statesampler

        period = statesampler.get_current_tracker().sampling_period_ms
        Path(self.folder, f"{os.getpid()}-{element}").write_text(str(period))
        yield element


@pytest.mark.parametrize("options", [{}, PROCESSES], ids=["in process", "worker process"])
def test_bundles_run_under_a_prompt_state_sampler(tmp_path, monkeypatch, options):
    """Beam's state sampler sleeps up to 200 ms between samples, and a bundle ends only when that
    sleep does; terrabeam's pipelines cap it at STATE_SAMPLING_PERIOD_MS, in this process and in the
    worker processes of multi_processing mode."""
    here = str(Path(__file__).parent)  # the worker processes unpickle the DoFn from this module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, terrabeam_env()["PYTHONPATH"]]))
    flags = ["--runner=FnApiRunner"] + [f"--{k}={v}" for k, v in options.items()]
    pipeline = beam_local.pipeline(PipelineOptions(flags))
    _ = pipeline | beam.Create([1, 2]) | beam.ParDo(_RecordSamplingPeriod(str(tmp_path)))
    pipeline.run().wait_until_finish()
    seen = {path.name.split("-")[0]: int(path.read_text()) for path in tmp_path.iterdir()}
    assert seen and set(seen.values()) == {beam_local.STATE_SAMPLING_PERIOD_MS}, seen
    assert beam_local.STATE_SAMPLING_PERIOD_MS < 200  # Beam's own period
    in_this_process = str(os.getpid()) in seen
    assert in_this_process == (not options), seen
