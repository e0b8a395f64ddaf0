"""Bytes the launching machine moves for a remote run: `terrabeam predict` of a run whose workspace is
on S3 (a moto server on 127.0.0.1), on Beam's PortableRunner (job service + external worker pool on
127.0.0.1, as tests/test_portable_runner.py starts them), from a fresh launcher (an empty mirror:
the export exists only in the bucket, as on a Cloud step). Every transfer of the launcher goes
through ``terrabeam.storage`` (``copy_file``, ``read_bytes``, ``write_bytes``), which this counts;
copies inside the bucket (``copy_object``) move no byte through the launcher.

    python -m benchmarks.remote_transfer [--scale 4] [--work DIR]

Run it against another checkout's code with PYTHONPATH=<that checkout>/src (its services too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from benchmarks.scenes import scene_config, tiled_scene

SERVICES = Path(__file__).resolve().parents[1] / "tests" / "beam_services.py"
BUCKET = "terrabeam-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service(kind: str, work: Path) -> tuple[subprocess.Popen, int]:
    port_file = work / f"{kind}.port"
    process = subprocess.Popen(
        [sys.executable, str(SERVICES), kind, str(port_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{kind} did not start")
        time.sleep(0.1)
    return process, int(port_file.read_text())


@contextmanager
def portable_runner(work: Path) -> Iterator[dict[str, str]]:
    """Beam's job service and an external worker pool on 127.0.0.1 for the time inside; yields
    the config's ``runner:`` section that uses them."""
    jobs, job_port = _service("job-service", work)
    pool, pool_port = _service("worker-pool", work)
    try:
        yield {
            "kind": "portable",
            "job_endpoint": f"127.0.0.1:{job_port}",
            "environment_type": "EXTERNAL",
            "environment_config": f"127.0.0.1:{pool_port}",
        }
    finally:
        for process in (jobs, pool):
            os.killpg(process.pid, signal.SIGKILL)


def worker_environment(work: Path) -> dict[str, str]:
    """Variables for this process and the pool's SDK workers (started as `python -c …`): this
    interpreter, this code, a cache of their own under ``work``."""
    return {
        "TERRABEAM_CACHE": str(work / "cache"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": os.pathsep.join([str(storage_module_root()), os.environ.get("PYTHONPATH", "")]),
    }


def storage_module_root() -> Path:
    """The folder terrabeam is imported from (this checkout's src/, or PYTHONPATH's)."""
    import terrabeam

    return Path(terrabeam.__file__).resolve().parents[1]


def _counting(storage) -> Counter:
    """Wrap the launcher's storage functions: bytes down (remote → here) and up (here → remote)."""
    moved: Counter = Counter()
    copy_file, read_bytes, write_bytes = storage.copy_file, storage.read_bytes, storage.write_bytes

    def counted_copy(source: str, destination: str) -> int:
        size = copy_file(source, destination)
        if storage.is_remote(source):
            moved["down"] += size
        if storage.is_remote(destination):
            moved["up"] += size
        return size

    def counted_read(location: str) -> bytes:
        data = read_bytes(location)
        moved["down"] += len(data) if storage.is_remote(location) else 0
        return data

    def counted_write(location: str, data: bytes) -> None:
        write_bytes(location, data)
        moved["up"] += len(data) if storage.is_remote(location) else 0

    storage.copy_file, storage.read_bytes, storage.write_bytes = counted_copy, counted_read, counted_write
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote_transfer")
    parser.add_argument("--scale", type=int, default=4, help="the demo scene tiled N times (a square)")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="terrabeam-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    from moto.server import ThreadedMotoServer

    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ |= {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    } | worker_environment(work)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    from terrabeam import storage
    from terrabeam.cli import main as terrabeam

    config = scene_config(work / "remote.yaml", tiled_scene(work / "scene", args.scale), work / "unused")
    document = yaml.safe_load(config.read_text())
    document["workspace"] = f"s3://{BUCKET}/ws"
    (work / "export.yaml").write_text(yaml.safe_dump(document))
    if terrabeam(["-q", "export", str(work / "export.yaml"), "--run", "r"]) != 0:
        raise SystemExit("export failed")
    shutil.rmtree(work / "cache" / "workspaces")  # a fresh launcher: the run is only in the bucket
    try:
        with portable_runner(work) as runner:
            document["runner"] = runner
            (work / "portable.yaml").write_text(yaml.safe_dump(document))
            moved = _counting(storage)
            start = time.perf_counter()
            if terrabeam(["-q", "predict", str(work / "portable.yaml"), "--run", "r"]) != 0:
                raise SystemExit("predict failed")
            seconds = time.perf_counter() - start
        shards = {
            step: sum(size for path, size in storage.list_files(f"s3://{BUCKET}/ws/r/{step}/*.tfrecord*"))
            for step in ("export", "predict")
        }
    finally:
        moto.stop()
    print(
        "| scene | export shards (bytes) | prediction shards (bytes) | launcher down | launcher up | predict s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {args.scale}× demo | {shards['export']:,} | {shards['predict']:,} | {moved['down']:,} | "
        f"{moved['up']:,} | {seconds:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
