"""Predict and whole runs on Beam's PortableRunner against Beam's own job service and an external
worker pool, and on the local runner with worker processes: the same prediction shards and maps,
byte for byte, as the in-process FnApiRunner. Synthetic scene and 1×1-conv model (tiny_pipeline).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import assert_same_map
from test_beam_local import PROCESSES, is_loopback, listening_sockets

import terrabeam
from terrabeam.cli import main
from terrabeam.layout import list_shards
from terrabeam.tfrecord import read_records

pytestmark = pytest.mark.integration

SERVICES = Path(__file__).with_name("beam_services.py")
START_TIMEOUT = 60  # seconds for a service to listen
RUN_TIMEOUT = 300  # seconds for one predict on the portable runner

# Imported by every Python process started with its folder on PYTHONPATH: records, per process, the
# files under TRACE_ROOT it opens or renames into place (into TRACE_DIR/<pid>), so the test can see
# which process read and wrote the shards and tiles; GDAL's debug log of each process goes to
# TRACE_DIR/gdal-<pid> (GDAL opens files in C, unseen by Python's audit hooks). Only the WARP
# category, the one the tests look for: with every category on, the launcher of a portable run on
# S3 hung now and then after its tiles were fetched (CI and here, ~1 run in 3 in the full suite;
# not seen alone). Suspected: GDAL's threads logging debug lines through rasterio's GIL-taking error
# handler while the GIL holder waits on a GDAL lock (cf. rasterio#3611). Not proven: no stack caught.
TRACE_HOOK = """
import os, sys

os.environ["CPL_DEBUG"] = "WARP"
os.environ["CPL_LOG"] = os.path.join(os.environ["TRACE_DIR"], f"gdal-{os.getpid()}")

def _trace(event, args, root=os.environ["TRACE_ROOT"], log=os.environ["TRACE_DIR"]):
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and str(args[0]).startswith(root):
        line = f"{os.getppid()} {args[1]} {args[0]}"
    elif event == "os.rename" and str(args[1]).startswith(root):
        line = f"{os.getppid()} rename {args[1]}"
    else:
        return
    with open(os.path.join(log, str(os.getpid())), "a") as out:
        out.write(line + "\\n")

sys.addaudithook(_trace)
"""


def _shards(predict_dir: Path) -> dict[str, list[bytes]]:
    return {p.name: list(read_records(p)) for p in list_shards(predict_dir, "predictions")}


def _traced_env(tmp_path: Path) -> dict[str, str]:
    """Environment of the services and their SDK workers: this checkout's terrabeam, this venv's
    `python` (the worker pool starts workers as `python -c …`), and the open() trace."""
    hook = tmp_path / "trace-hook"
    hook.mkdir()
    (tmp_path / "trace").mkdir()
    (hook / "sitecustomize.py").write_text(TRACE_HOOK)
    src = Path(terrabeam.__file__).resolve().parents[1]
    path = os.pathsep.join([str(hook), str(src), os.environ.get("PYTHONPATH", "")])
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "TRACE_ROOT": str(tmp_path / "ws"),
        "TRACE_DIR": str(tmp_path / "trace"),
    }


@contextmanager
def beam_service(kind: str, tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """(pid, port) of a service from beam_services.py; it and its workers are killed on exit."""
    port_file = tmp_path / f"{kind}.port"
    log = (tmp_path / f"{kind}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(SERVICES), kind, str(port_file)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, SDK workers included
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{kind} did not start: {(tmp_path / f'{kind}.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield process.pid, int(port_file.read_text())
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()


class FileAccess(NamedTuple):
    pid: int
    parent: int
    mode: str
    path: Path


def _traced_opens(tmp_path: Path) -> list[FileAccess]:
    opens = []
    for log in (tmp_path / "trace").iterdir():
        if log.name.startswith("gdal-"):
            continue
        pid = int(log.name)
        for line in log.read_text().splitlines():
            parent, mode, path = line.split(" ", 2)
            opens.append(FileAccess(pid, int(parent), mode, Path(path)))
    return opens


def _predict_in_subprocess(config: Path, env: dict[str, str]) -> None:
    """`terrabeam predict` as a child of this process (so its own opens are traced too)."""
    done = subprocess.run(
        [sys.executable, "-m", "terrabeam", "predict", str(config), "--run", "r"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _who_did_the_work(tmp_path: Path, shard_names: list[str]) -> tuple[set[int], set[int]]:
    """(processes that read the export shards, processes that wrote the prediction shards); every
    shard must have been read and written."""
    opens = _traced_opens(tmp_path)
    export = {p.name for p in list_shards(tmp_path / "ws" / "r" / "export", "tiny")}
    read = [o for o in opens if o.path.name in export and "r" in o.mode]
    written = [o for o in opens if o.path.name.removesuffix(".partial") in shard_names and "w" in o.mode]
    assert {o.path.name for o in read} == export
    assert {o.path.name.removesuffix(".partial") for o in written} == set(shard_names)
    return {o.pid for o in read}, {o.pid for o in written}


def _export_and_predict_in_process(tmp_path: Path, write: Callable[..., Path]) -> dict[str, list[bytes]]:
    """Export the tiny scene into run r and predict it on the in-process FnApiRunner (workers: 1)."""
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    assert main(["predict", str(config), "--run", "r"]) == 0
    shards = _shards(tmp_path / "ws" / "r" / "predict")
    assert len(shards) > 2, "the test needs several shards"
    return shards


def test_portable_runner_on_beam_job_service_and_external_worker_pool(tmp_path, tiny_pipeline):
    """Beam's job service runs the job and asks the external worker pool for SDK workers, processes
    of their own: they, and only they, read the export and write the shards, which are the
    FnApiRunner's byte for byte, in order."""
    document, write = tiny_pipeline
    local = _export_and_predict_in_process(tmp_path, write)
    env = _traced_env(tmp_path)
    with (
        beam_service("job-service", tmp_path, env) as (job_service, job_port),
        beam_service("worker-pool", tmp_path, env) as (worker_pool, pool_port),
    ):
        document["runner"] = {
            "kind": "portable",
            "job_endpoint": f"127.0.0.1:{job_port}",
            "environment_type": "EXTERNAL",
            "environment_config": f"127.0.0.1:{pool_port}",
        }
        with listening_sockets(os.getpid()) as seen:  # the services, their workers, terrabeam
            _predict_in_subprocess(write(document, "portable.yaml"), env)
    assert _shards(tmp_path / "ws" / "r" / "predict") == local
    ports = {(pid, port) for pid, _, port in seen.sockets}
    assert {(job_service, job_port), (worker_pool, pool_port)} <= ports, "the services were seen"
    exposed = {s for s in seen.sockets if not is_loopback(s[1])}
    assert not exposed, f"listening on every interface: {exposed}"

    readers, writers = _who_did_the_work(tmp_path, list(local))
    parents = {o.pid: o.parent for o in _traced_opens(tmp_path)}
    assert {parents[pid] for pid in readers | writers} == {worker_pool}, "not done by the pool's workers"
    assert not {os.getpid(), job_service, worker_pool} & (readers | writers)


def test_local_worker_processes_write_the_same_shards(tmp_path, tiny_pipeline):
    """runner: {kind: local, workers: 2, options: {direct_running_mode: multi_processing}}: two
    worker processes, which both read shards and whose records are reshuffled across them; the
    prediction shards are those of one in-process worker, byte for byte, in order."""
    document, write = tiny_pipeline
    local = _export_and_predict_in_process(tmp_path, write)
    document["runner"] = {"kind": "local", "workers": 2, "options": PROCESSES}
    _predict_in_subprocess(write(document, "workers.yaml"), _traced_env(tmp_path))
    assert _shards(tmp_path / "ws" / "r" / "predict") == local

    readers, writers = _who_did_the_work(tmp_path, list(local))
    client = {o.pid for o in _traced_opens(tmp_path) if o.parent == os.getpid()}
    assert len(client) == 1, "the terrabeam process is traced"
    assert not (client | {os.getpid()}) & (readers | writers), "not done by worker processes"
    assert len(readers) == 2, "both worker processes read export shards"


def test_whole_run_on_portable_runner_reads_rasters_and_writes_tiles_in_the_workers(tmp_path, tiny_pipeline):
    """`terrabeam run` of a raster config is one pipeline: the pool's SDK workers warp the rasters'
    windows and publish the map tiles; the launcher only plans the grid and makes the mosaic. The
    maps are the in-process run's (pixels, profile and tags but the run's own)."""
    document, write = tiny_pipeline
    document["outputs"]["tile_size"] = 32  # 70 × 50 px in tiles of 2 × 2 patches of 32 × 16: 3 × 2 tiles
    assert main(["run", str(write()), "--run", "local"]) == 0
    local = tmp_path / "ws" / "local" / "deliver"
    env = _traced_env(tmp_path)
    with (
        beam_service("job-service", tmp_path, env) as (job_service, job_port),
        beam_service("worker-pool", tmp_path, env) as (worker_pool, pool_port),
    ):
        document["runner"] = {
            "kind": "portable",
            "job_endpoint": f"127.0.0.1:{job_port}",
            "environment_type": "EXTERNAL",
            "environment_config": f"127.0.0.1:{pool_port}",
        }
        done = subprocess.run(
            [sys.executable, "-m", "terrabeam", "run", str(write(document, "portable.yaml")), "--run", "r"],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    deliver = tmp_path / "ws" / "r" / "deliver"
    names = sorted(p.relative_to(local) for p in local.rglob("*.tif"))
    assert len(names) == 2 + 2 * 6
    assert sorted(p.relative_to(deliver) for p in deliver.rglob("*.tif")) == names
    for name in names:
        assert_same_map(deliver / name, local / name)

    opens = _traced_opens(tmp_path)
    parents = {o.pid: o.parent for o in opens}
    published = [o for o in opens if o.mode == "rename" and o.path.parent.name == "tiles"]
    tiles = [o for o in published if o.path.suffix == ".tif"]
    sidecars = [o for o in published if o.path.name.endswith(".tif.aux.xml")]  # the class tiles' names
    assert len(sidecars) == 6 and {parents[o.pid] for o in sidecars} == {worker_pool}
    assert len(tiles) == 2 * 6 and {parents[o.pid] for o in tiles} == {worker_pool}, (
        "tiles not by the workers"
    )
    launcher = {o.pid for o in opens if o.parent == os.getpid()}
    assert len(launcher) == 1, "the terrabeam process is traced"
    warped = {
        int(log.name.removeprefix("gdal-"))
        for log in (tmp_path / "trace").glob("gdal-*")
        if "WARP:" in log.read_text(errors="replace")
    }
    assert warped and {parents.get(pid) for pid in warped} == {worker_pool}, "rasters not read by the workers"
    assert not warped & (launcher | {os.getpid(), job_service, worker_pool}), (
        "rasters read outside the workers"
    )
