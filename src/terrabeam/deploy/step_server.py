"""An HTTP entry point that runs one step (export or deliver) of a run: the Cloud Run service the
deployed workflow calls, runnable locally as well.

    POST /steps/<step>          {"run": "<run id>"}  → runs the step; 200 with its report when done,
                                                       202 if another request is running it
    GET  /steps/<step>?run=<id>                      → the step's status: running, done or failed

A failed step answers 422 (permanent: bad config, input or model), 503 (transient: worth a retry) or
500 (unexpected), with ``{"status": "failed", "error": "<one line>"}``; a request the server will not
read answers 400, 411 (no Content-Length) or 413 (a body over MAX_BODY bytes, left unread). The
workspace is a local folder or a gs:// / s3:// URI (mirrored locally, see terrabeam.workspace). The
status is kept in the workspace, ``<run>/.status/<step>.json`` (an object when the workspace is
remote), so any instance can answer a poll; "done" counts only while the step's folder is published
(its ``_COMPLETE.json`` when remote). One request runs a step: each attempt first creates its claim,
``<run>/.status/<step>.claim-<attempt>``, atomically (storage.create_exclusive); a request that
cannot runs nothing and answers 202. The next attempt may start once the latest one is recorded done
or failed, or after STALE_SECONDS. Binds 127.0.0.1 unless told otherwise; in the container it binds
0.0.0.0 on $PORT, as Cloud Run requires. The Flex Template launcher (flex_main) claims and records
its own step (map or predict) through the same StepService.start, without HTTP.
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

from terrabeam import storage
from terrabeam.config import PipelineConfig, load_config
from terrabeam.errors import TerrabeamError
from terrabeam.process_memory import limit_malloc_arenas
from terrabeam.workflow import steps
from terrabeam.workflow.runner import is_transient
from terrabeam.workspace import COMPLETE, Workspace, resolve_root

log = logging.getLogger("terrabeam.deploy")

STEP_FUNCTIONS: dict[str, Callable[[PipelineConfig, Workspace], steps.StepReport]] = {
    "export": steps.export_step,
    "deliver": steps.deliver_step,
}
# Run ids as the workflow gives them (an execution id, or {"run": ID}); the Flex Template checks the same.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_RUN_ID = re.compile(RUN_ID_PATTERN)
_STATUS_TEXT = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_STATUS_TEXT |= {411: "Length Required", 413: "Content Too Large", 422: "Unprocessable Entity"}
_STATUS_TEXT |= {500: "Internal Server Error", 503: "Service Unavailable"}
# A claim older than this, its attempt unrecorded, is left over by an instance that died (Cloud Run
# ends a request after its timeout, 3600 s as deployed); a new request then runs the step again.
STALE_SECONDS = 3600.0
MAX_BODY = 2**20  # bytes; a request body is {"run": "<run id>"}
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")

Response = tuple[int, dict[str, Any]]


class StepService:
    """The WSGI application: one pipeline config, one workspace (the local folder ``root``, or the
    gs:// / s3:// URI ``remote`` mirrored in ``root``)."""

    def __init__(
        self,
        config: PipelineConfig,
        root: Path,
        remote: str | None = None,
        functions: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.config = config
        self.root = root
        self.remote = remote
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
                run = _requested_run(environ)
            except _Refused as refused:
                return refused.code, _failed(str(refused))
            return self.start(step, run)
        return 405, _failed(f"{method} not allowed; POST starts a step, GET reads its status")

    def status(self, step: str, run: str) -> Response:
        if not _is_run_id(run):
            return 400, _failed(f"run id {run!r} must match {_RUN_ID.pattern}")
        try:
            record = self._read_status(step, run)
            latest, claim = self._latest_claim(step, run)
            if claim is not None and (record is None or record.get("attempt", 0) < latest):
                record = claim  # claimed, its status not written yet: running
            workspace = Workspace(self.root, run, self.remote)
            if record is not None and record["status"] == "done" and not workspace.has_step(step):
                where = workspace.step_location(step)
                error = f"{where} is not published (no {COMPLETE}); POST to run step '{step}' again"
                return 404, {"status": "missing", "run": run, "step": step, "error": error}
        except Exception as exc:
            return _error_code(exc), _failed(_one_line(exc))
        if record is None:
            return 404, {"status": "missing", "run": run, "step": step}
        return 200, record

    def start(self, step: str, run: str) -> Response:
        if not _is_run_id(run):
            return 400, _failed(f"run id {run!r} must match {_RUN_ID.pattern}")
        workspace = Workspace(self.root, run, self.remote)
        try:
            previous = self._read_status(step, run)
            if previous is not None and previous["status"] == "done" and workspace.has_step(step):
                return 200, previous
            latest, claim = self._latest_claim(step, run)
            ended = (
                previous is not None and previous.get("attempt") == latest and previous["status"] != "running"
            )
            if claim is not None and not ended and time.time() - claim["started"] < STALE_SECONDS:
                return 202, claim  # the attempt's "running" record
            workspace.ensure_writable()
            record = {"status": "running", "run": run, "step": step, "attempt": latest + 1}
            record["started"] = time.time()
            if not storage.create_exclusive(self._claim_location(step, run, latest + 1), _encode(record)):
                return 202, self._latest_claim(step, run)[1]
        except Exception as exc:  # nothing started, nothing recorded
            return _error_code(exc), _failed(_one_line(exc))
        return self._run_claimed(record, workspace)

    def _run_claimed(self, record: dict[str, Any], workspace: Workspace) -> Response:
        """Run the step of the attempt this request claimed; record how it ended."""
        code = 200
        try:
            self._record(record)
            report = self.functions[record["step"]](self.config, workspace)
            record |= {"status": "done", "seconds": round(report.seconds, 3), "details": report.details}
        except Exception as exc:
            code = _error_code(exc)
            record |= {"status": "failed", "error": _one_line(exc)}
            log.error("step %s of run %s failed: %s", record["step"], record["run"], record["error"])
        steps.release_free_memory()  # a warm instance holds no step's memory between requests
        try:
            self._record(record)
        except Exception as exc:  # the step's own outcome is the one to answer with
            log.error(
                "step %s of run %s: status not recorded: %s", record["step"], record["run"], _one_line(exc)
            )
        return code, record

    def _record(self, record: dict[str, Any]) -> None:
        """Write the status of the record's attempt while it is the latest: one whose stale claim
        was taken over leaves the newer attempt's status alone."""
        step, run = record["step"], record["run"]
        if self._latest_claim(step, run)[0] == record["attempt"]:
            self._write_status(record)
        else:
            log.error("step %s of run %s: attempt %d superseded by a newer one", step, run, record["attempt"])

    def _claim_location(self, step: str, run: str, attempt: int) -> str:
        return self._status_location(step, run).removesuffix(".json") + f".claim-{attempt}"

    def _latest_claim(self, step: str, run: str) -> tuple[int, dict[str, Any] | None]:
        """(number, record) of the step's latest claimed attempt; (0, None) before the first."""
        prefix = self._claim_location(step, run, 0).removesuffix("0")
        if self.remote is None:
            found = [str(p) for p in Path(prefix).parent.glob(Path(prefix).name + "*")]
        else:
            found = [path for path, _ in storage.list_files(prefix + "*")]
        numbers = [int(n) for path in found if (n := path.removeprefix(prefix)).isdigit()]
        if not numbers:
            return 0, None
        latest = max(numbers)
        location = self._claim_location(step, run, latest)
        data = Path(location).read_bytes() if self.remote is None else storage.read_bytes(location)
        return latest, json.loads(data)

    def _status_location(self, step: str, run: str) -> str:
        name = f"{run}/.status/{step}.json"
        return f"{self.remote}/{name}" if self.remote else str(self.root / name)

    def _read_status(self, step: str, run: str) -> dict[str, Any] | None:
        location = self._status_location(step, run)
        if self.remote is None:
            path = Path(location)
            return json.loads(path.read_text()) if path.exists() else None
        return json.loads(storage.read_bytes(location)) if storage.exists(location) else None

    def _write_status(self, record: dict[str, Any]) -> None:
        """Replace the step's status whole: an object upload, or a local file renamed into place."""
        location = self._status_location(record["step"], record["run"])
        data = _encode(record)
        if self.remote is not None:
            storage.write_bytes(location, data)
            return
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)


class _Refused(Exception):
    """A request answered with ``code`` before the server reads it further."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _requested_run(environ: dict[str, Any]) -> Any:
    """The "run" of a POST body, read only when its declared length is sane and at most MAX_BODY."""
    declared = environ.get("CONTENT_LENGTH") or ""
    if not declared:
        raise _Refused(411, 'a POST needs a Content-Length and a JSON body {"run": "<run id>"}')
    if not _CONTENT_LENGTH.fullmatch(declared):
        raise _Refused(400, f"Content-Length {declared!r} is not a number of bytes")
    if int(declared) > MAX_BODY:
        raise _Refused(413, f"a body of {declared} bytes is over the limit of {MAX_BODY}")
    try:
        return json.loads(environ["wsgi.input"].read(int(declared)))["run"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
        raise _Refused(400, 'expected a JSON body {"run": "<run id>"}') from None


def _is_run_id(run: Any) -> bool:
    return isinstance(run, str) and _RUN_ID.fullmatch(run) is not None


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, default=str) + "\n").encode()


def _failed(error: str) -> dict[str, Any]:
    return {"status": "failed", "error": error}


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]


def _error_code(exc: BaseException) -> int:
    return 503 if is_transient(exc) else 422 if isinstance(exc, TerrabeamError) else 500


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
        default=os.environ.get("TERRABEAM_WORKSPACE") or None,
        help="workspace root, a folder or a gs:// / s3:// URI "
        "(default: $TERRABEAM_WORKSPACE, else 'workspace:' from the config)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8080")), help="port (default: $PORT or 8080)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()  # as the CLI does: before any step's thread starts
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except TerrabeamError as exc:
        print(f"terrabeam: error: {exc}", file=sys.stderr)
        return 1
    root, remote = (
        resolve_root(args.workspace) if args.workspace else resolve_root(config.workspace, config.base_dir)
    )
    server = serve(StepService(config, root, remote), args.host, args.port)
    log.info(
        "serving %s steps for workspace %s on http://%s:%d",
        config.name,
        remote or root,
        *server.server_address,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
