"""Beam's own job service and external worker pool, listening on loopback only, for the portable test.

``python beam_services.py job-service|worker-pool PORT_FILE`` binds a free port, writes it to
PORT_FILE and serves until killed. The servicers are Beam's (``LocalJobServicer``, the one
``local_job_service_main`` runs, and ``BeamFnExternalWorkerPoolServicer``, the one
``worker_pool_main`` runs, with SDK workers as subprocesses), started as those mains start them,
with terrabeam's ``bind_loopback`` first: the ports they and each job open for the SDK workers
would otherwise listen on every interface.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from apache_beam.runners.portability.local_job_service import LocalJobServicer
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

from terrabeam.beam_local import bind_loopback


def _publish_port(port_file: Path, port: int) -> None:
    partial = port_file.with_name(port_file.name + ".partial")
    partial.write_text(str(port))
    os.replace(partial, port_file)


def serve(kind: str, port_file: Path) -> None:
    bind_loopback()
    if kind == "job-service":  # runs each job on an FnApiRunner inside this process
        _publish_port(port_file, LocalJobServicer().start_grpc_server(0))
    elif kind == "worker-pool":
        address, _ = BeamFnExternalWorkerPoolServicer.start(use_process=True)
        _publish_port(port_file, int(address.rpartition(":")[2]))
    else:
        raise SystemExit(f"unknown service {kind!r}: job-service or worker-pool")
    threading.Event().wait()  # serve (on the servers' threads) until killed


if __name__ == "__main__":
    serve(sys.argv[1], Path(sys.argv[2]))
