"""Beam's own job service and external worker pool, listening on 127.0.0.1 only, for the portable test.

``python beam_services.py job-service|worker-pool PORT_FILE`` binds a free port, writes it to
PORT_FILE and serves until killed. The servicers are Beam's (``LocalJobServicer``, the one
``local_job_service_main`` runs, and ``BeamFnExternalWorkerPoolServicer``, the one
``worker_pool_main`` runs, with SDK workers as subprocesses); only the address differs: those mains
listen on ``localhost`` and on every interface.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.portability.local_job_service import LocalJobServicer
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

HOST = "127.0.0.1"


class LoopbackJobServicer(LocalJobServicer):
    """Beam's local job service; it runs each job on an FnApiRunner inside this process."""

    def get_service_address(self) -> str:
        return HOST


def _publish_port(port_file: Path, port: int) -> None:
    partial = port_file.with_name(port_file.name + ".partial")
    partial.write_text(str(port))
    os.replace(partial, port_file)


def serve(kind: str, port_file: Path) -> None:
    if kind == "job-service":
        servicer = LoopbackJobServicer()
        _publish_port(port_file, servicer.start_grpc_server(0))
    elif kind == "worker-pool":
        server = grpc.server(ThreadPoolExecutor(max_workers=8))
        beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
            BeamFnExternalWorkerPoolServicer(use_process=True), server
        )
        port = server.add_insecure_port(f"{HOST}:0")
        server.start()
        _publish_port(port_file, port)
    else:
        raise SystemExit(f"unknown service {kind!r}: job-service or worker-pool")
    threading.Event().wait()  # serve (on the servers' threads) until killed


if __name__ == "__main__":
    serve(sys.argv[1], Path(sys.argv[2]))
