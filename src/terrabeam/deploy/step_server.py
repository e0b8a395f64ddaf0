"""An HTTP entry point that runs one step (export or deliver) of a run: the Cloud Run service the
deployed workflow calls, runnable locally as well.

    POST /steps/<step>          {"run": "<run id>"}  → runs the step; 200 with its report when done,
                                                       202 if another request is running it
    GET  /steps/<step>?run=<id>                      → the step's status: running, done or failed

A failed step answers 422 (permanent: bad config, input or model), 503 (transient: worth a retry) or
500 (unexpected), with ``{"status": "failed", "error": "<one line>"}``. The status is kept beside the
step's folder (``<run>/.<step>.status.json``) so any instance can answer a poll. Binds 127.0.0.1
unless told otherwise; in the container it binds 0.0.0.0 on $PORT, as Cloud Run requires.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from terrabeam.config import PipelineConfig, load_config
from terrabeam.errors import TerrabeamError
from terrabeam.workflow import steps
from terrabeam.workflow.runner import is_transient
from terrabeam.workspace import Workspace

log = logging.getLogger("terrabeam.deploy")

STEP_FUNCTIONS: dict[str, Callable[[PipelineConfig, Workspace], steps.StepReport]] = {
    "export": steps.export_step,
    "deliver": steps.deliver_step,
}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_STATUS_TEXT = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_STATUS_TEXT |= {422: "Unprocessable Entity", 500: "Internal Server Error", 503: "Service Unavailable"}
# A "running" status older than this is left over by an instance that died (Cloud Run ends a request
# after its timeout, 3600 s as deployed); a new request then runs the step again.
STALE_SECONDS = 3600.0

Response = tuple[int, dict[str, Any]]


class StepService:
    """The WSGI application: one pipeline config, one workspace root."""

    def __init__(
        self, config: PipelineConfig, root: Path, functions: dict[str, Callable[..., Any]] | None = None
    ) -> None:
        self.config = config
        self.root = root
        self.functions = functions or STEP_FUNCTIONS

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        code, body = self.handle(environ)
        payload = (json.dumps(body) + "\n").encode()
        start_response(
            f"{code} {_STATUS_TEXT.get(code, 'Error')}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    def handle(self, environ: dict[str, Any]) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        parts = environ.get("PATH_INFO", "").strip("/").split("/")
        if len(parts) != 2 or parts[0] != "steps" or parts[1] not in self.functions:
            return 404, _failed(f"no such endpoint; use /steps/<{'|'.join(self.functions)}>")
        step = parts[1]
        if method == "GET":
            run = parse_qs(environ.get("QUERY_STRING", "")).get("run", [""])[0]
            return self.status(step, run)
        if method == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                request = json.loads(environ["wsgi.input"].read(length) or b"{}")
                run = request["run"]
            except (ValueError, KeyError, TypeError):
                return 400, _failed('expected a JSON body {"run": "<run id>"}')
            return self.start(step, run)
        return 405, _failed(f"{method} not allowed; POST starts a step, GET reads its status")

    def status(self, step: str, run: str) -> Response:
        if not _RUN_ID.match(run or ""):
            return 400, _failed(f"run id {run!r} must match {_RUN_ID.pattern}")
        path = self._status_path(step, run)
        if not path.exists():
            return 404, {"status": "missing", "run": run, "step": step}
        return 200, json.loads(path.read_text())

    def start(self, step: str, run: str) -> Response:
        if not isinstance(run, str) or not _RUN_ID.match(run):
            return 400, _failed(f"run id {run!r} must match {_RUN_ID.pattern}")
        path = self._status_path(step, run)
        workspace = Workspace(self.root, run)
        if path.exists():
            previous = json.loads(path.read_text())
            if previous["status"] == "done" and workspace.step_dir(step).is_dir():
                return 200, previous
            if previous["status"] == "running" and time.time() - previous["started"] < STALE_SECONDS:
                return 202, previous
        record: dict[str, Any] = {"status": "running", "run": run, "step": step, "started": time.time()}
        try:
            workspace.ensure_writable()
            _write_json(path, record)
            report = self.functions[step](self.config, workspace)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
            log.error("step %s of run %s failed: %s", step, run, error)
            code = 503 if is_transient(exc) else 422 if isinstance(exc, TerrabeamError) else 500
            record |= {"status": "failed", "error": error}
            if path.parent.is_dir():
                _write_json(path, record)
            return code, record
        record |= {"status": "done", "seconds": round(report.seconds, 3), "details": report.details}
        _write_json(path, record)
        return 200, record

    def _status_path(self, step: str, run: str) -> Path:
        return self.root / run / f".{step}.status.json"


def _failed(error: str) -> dict[str, Any]:
    return {"status": "failed", "error": error}


def _write_json(path: Path, document: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    partial.write_text(json.dumps(document, default=str) + "\n")
    os.replace(partial, path)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A poll must be answered while a long step holds another request."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)


def serve(app: StepService, host: str, port: int) -> WSGIServer:
    """A threaded WSGI server for ``app`` (port 0: any free port); call serve_forever() on it."""
    return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m terrabeam.deploy.step_server",
        description="Serve the export and deliver steps of one pipeline over HTTP.",
    )
    parser.add_argument("--config", type=Path, required=True, help="pipeline YAML file")
    parser.add_argument(
        "--workspace",
        type=Path,
        default=os.environ.get("TERRABEAM_WORKSPACE") or None,
        help="workspace root (default: $TERRABEAM_WORKSPACE, else 'workspace:' from the config)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8080")), help="port (default: $PORT or 8080)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except TerrabeamError as exc:
        print(f"terrabeam: error: {exc}", file=sys.stderr)
        return 1
    root = args.workspace.resolve() if args.workspace else config.resolve(config.workspace)
    server = serve(StepService(config, root), args.host, args.port)
    log.info("serving %s steps for workspace %s on http://%s:%d", config.name, root, *server.server_address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
