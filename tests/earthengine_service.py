"""Local stand-ins for Google's services, bound to 127.0.0.1, so the real clients can be tested here:

- ``EarthEnginePlayback``: the Earth Engine REST API as the real ``earthengine-api`` client sees it.
  It serves the discovery document and algorithm list that earthengine-api ships for its own tests
  (the document's v1alpha paths served as v1, the version the client asks for), an OAuth token
  endpoint for Application Default Credentials, and plays back what the service answers: image
  export and import requests give operations whose states advance on each poll along a script
  (PENDING → RUNNING → SUCCEEDED, or FAILED with a message); external images (COG-backed,
  ``image:importExternal``) are registered at once; ``image:computePixels`` answers
  ``synthetic_pixels`` on the grid asked for (NPY), after any refusals queued (429 / 503, with
  Retry-After), refusing requests over 48 MiB; assets are created and looked up
  (404 with Earth Engine's error body when missing). Every request is recorded for assertions.
- ``gcs_emulator``: Cloud Storage's JSON API from the ``gcp-storage-emulator`` package, reached by
  the real google-cloud-storage client (through Beam's FileSystems) via STORAGE_EMULATOR_HOST.

Nothing here was checked against the live services; see the README ("Earth Engine").
"""

from __future__ import annotations

import io
import json
import os
import secrets
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ee
import numpy as np

EE_TEST_FILES = os.path.join(os.path.dirname(ee.__file__), "tests")
# made per test process: the playback hands it out and checks it; nothing real is ever stored
ACCESS_TOKEN = secrets.token_urlsafe(24)
COMPUTE_PIXELS_LIMIT = 48 * 2**20  # bytes of one computePixels answer


def synthetic_pixels(bands: list[str], transform: tuple[float, ...], width: int, height: int):
    """What the playback's "Earth Engine" computes, for exports and computePixels alike: a smooth
    field of each pixel centre's map coordinates, different per band ({band: (h, w) float32}).
    ``transform`` is (a, b, c, d, e, f) of the pixel grid asked for. Synthetic data: it makes the
    two fetch paths comparable pixel for pixel, not a real image."""
    a, b, c, d, e, f = transform
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = a * cols + b * rows + c, d * cols + e * rows + f
    fields = {}
    for band in bands:  # a band's values depend on its name, never on its place in the request
        k = zlib.crc32(band.encode()) % 100 / 100
        fields[band] = (np.sin(x / 97.0 + 7 * k) + np.cos(y / 53.0 - 5 * k) * 0.5 + k - 0.5).astype(
            np.float32
        )
    return fields


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: Any
    received: float = field(default_factory=time.monotonic)
    answered: float | None = None


@dataclass
class Operation:
    name: str
    kind: str  # EXPORT_IMAGE or INGEST_IMAGE
    script: list[str]
    error: str | None = None
    asset: str | None = None  # an ingestion's asset, created when the task succeeds
    polls: int = 0

    def state(self) -> str:
        """PENDING when started, then the script's states, one per poll, the last one repeating."""
        return self.script[min(self.polls, len(self.script)) - 1] if self.polls else "PENDING"

    def document(self) -> dict[str, Any]:
        state = self.state()
        body: dict[str, Any] = {"name": self.name, "metadata": {"type": self.kind, "state": state}}
        if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            body["done"] = True
        if state == "FAILED":
            body["error"] = {"code": 3, "message": self.error or "failed"}
        return body


@dataclass
class EarthEnginePlayback:
    """Record requests, play back responses. ``export_script`` / ``import_script``: the states each
    new export / import operation reports on successive polls; ``on_export`` runs when an export
    request arrives (e.g. to put the files Earth Engine would write into the storage emulator)."""

    project: str
    export_script: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    import_script: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    failure_message: str = "Export too large: specified 1e9 pixels (max: 1e8)."
    on_export: Callable[[dict[str, Any]], None] | None = None
    compute_seconds: float = 0.0  # how long each computePixels answer takes
    compute_pixels_limit: int = COMPUTE_PIXELS_LIMIT  # bytes of values an answer may hold
    compute_refusals: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Retry-After)
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[Request] = field(default_factory=list)
    operations: dict[str, Operation] = field(default_factory=dict)
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_request_id: dict[str, str] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> EarthEnginePlayback:
        playback = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                playback._handle(self, "GET")

            def do_POST(self):
                playback._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def calls(self, method: str, path_part: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    # --- the service ---------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        content_type = handler.headers.get("Content-Type", "")
        if "json" in content_type and raw:
            body: Any = json.loads(raw)
        elif "form" in content_type:
            body = urllib.parse.parse_qs(raw.decode())
        else:
            body = raw.decode(errors="replace")
        request = Request(
            method, parsed.path, urllib.parse.parse_qs(parsed.query), dict(handler.headers), body
        )
        self.requests.append(request)
        status, answer, headers = (*self._answer(request), {})[:3]
        binary = isinstance(answer, bytes)
        data = answer if binary else json.dumps(answer).encode()
        request.answered = time.monotonic()
        handler.send_response(status)
        content_type = "application/octet-stream" if binary else "application/json; charset=UTF-8"
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(self, request: Request) -> tuple[int, Any]:
        path, prefix = request.path, f"/v1/projects/{self.project}"
        if path == "/token":
            return 200, {"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}
        if path == "/$discovery/rest":
            with open(os.path.join(EE_TEST_FILES, "cloud_api_discovery_document.json")) as f:
                document = json.loads(f.read().replace("v1alpha", "v1"))
            document["rootUrl"] = self.url + "/"
            # COG-backed images: image:importExternal, as the live document has it (the shipped
            # test document predates it), shaped like image:import
            methods = document["resources"]["projects"]["resources"]["image"]["methods"]
            external = json.loads(
                json.dumps(methods["import"]).replace("image:import", "image:importExternal")
            )
            methods["importExternal"] = external | {"id": "earthengine.projects.image.importExternal"}
            return 200, document
        if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
            return 401, _error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
        if path.endswith("/algorithms"):
            with open(os.path.join(EE_TEST_FILES, "algorithms.json")) as f:
                return 200, json.load(f)
        if request.method == "POST" and path == f"{prefix}/image:export":
            return 200, self._start(request, "EXPORT_IMAGE", self.export_script)
        if request.method == "POST" and path == f"{prefix}/image:importExternal":
            name = request.body["imageManifest"]["name"]  # registered at once: no task
            if name in self.assets and not request.body.get("overwrite"):
                return 400, _error(400, f"Cannot overwrite asset '{name}'.", "ALREADY_EXISTS")
            self.assets[name] = {"name": name, "type": "IMAGE"}
            return 200, {}
        if request.method == "POST" and path == f"{prefix}/image:computePixels":
            return self._compute_pixels(request)
        if request.method == "POST" and path == f"{prefix}/image:import":
            return 200, self._start(request, "INGEST_IMAGE", self.import_script)
        if request.method == "GET" and path.startswith(f"{prefix}/operations/"):
            operation = self.operations.get(path.removeprefix("/v1/"))
            if operation is None:
                return 404, _error(404, f"Operation {path} not found.", "NOT_FOUND")
            operation.polls += 1
            if operation.asset and operation.state() == "SUCCEEDED":
                self.assets[operation.asset] = {"name": operation.asset, "type": "IMAGE"}
            return 200, operation.document()
        if request.method == "GET" and path.startswith(f"{prefix}/assets/"):
            name = path.removeprefix("/v1/")
            if name not in self.assets:
                return 404, _error(404, f"Asset '{name}' not found.", "NOT_FOUND")
            return 200, self.assets[name]
        if request.method == "POST" and path == f"{prefix}/assets":
            name = f"projects/{self.project}/assets/{request.query['assetId'][0]}"
            self.assets[name] = {"name": name, "type": request.body.get("type")}
            return 200, self.assets[name]
        return 404, _error(404, f"playback has no answer for {request.method} {path}", "NOT_FOUND")

    def _compute_pixels(self, request: Request) -> tuple[Any, ...]:
        """The pixels of ``synthetic_pixels`` on the request's grid, as Earth Engine's NPY answer (a
        structured array, a field per band); first the queued refusals (429 / 503 …); a request
        over the 48 MiB limit refused as Earth Engine does."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            refusal = self.compute_refusals.pop(0) if self.compute_refusals else None
        try:
            time.sleep(self.compute_seconds)
            if refusal is not None:
                status, retry_after = refusal
                headers = {"Retry-After": retry_after} if retry_after is not None else {}
                return (
                    status,
                    _error(status, "Too many concurrent aggregations.", "RESOURCE_EXHAUSTED"),
                    headers,
                )
            body = request.body
            grid, bands = body["grid"], body["bandIds"]
            width, height = grid["dimensions"]["width"], grid["dimensions"]["height"]
            size = width * height * len(bands) * 4
            if size > self.compute_pixels_limit:
                limit = self.compute_pixels_limit
                message = f"Total request size ({size} bytes) must be less than or equal to {limit} bytes."
                return 400, _error(400, message, "INVALID_ARGUMENT")
            t = grid["affineTransform"]
            transform = tuple(
                t.get(k, 0.0) for k in ("scaleX", "shearX", "translateX", "shearY", "scaleY", "translateY")
            )
            values = synthetic_pixels(bands, transform, width, height)
            answer = np.empty((height, width), dtype=[(band, "<f4") for band in bands])
            for band in bands:
                answer[band] = values[band]
            buffer = io.BytesIO()
            np.save(buffer, answer)
            return 200, buffer.getvalue()
        finally:
            with self._lock:
                self.in_flight -= 1

    def _start(self, request: Request, kind: str, script: list[str]) -> dict[str, Any]:
        request_id = request.body.get("requestId")
        if request_id in self.by_request_id:  # the service's idempotency: same request, same task
            return self.operations[self.by_request_id[request_id]].document() | {"done": False}
        name = f"projects/{self.project}/operations/{kind}_{len(self.operations) + 1:04d}"
        operation = Operation(name, kind, list(script), self.failure_message)
        self.operations[name] = operation
        if request_id:
            self.by_request_id[request_id] = name
        if kind == "EXPORT_IMAGE" and self.on_export is not None:
            self.on_export(request.body)
        if kind == "INGEST_IMAGE":
            operation.asset = request.body["imageManifest"]["name"]
        return {"name": name, "metadata": {"type": kind, "state": "PENDING"}}


def _error(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def write_adc_file(path, token_uri: str) -> str:
    """A service-account Application Default Credentials file (a throwaway RSA key made here, never a
    real one) whose token endpoint is ``token_uri``: the real google-auth signs a JWT with it and
    trades it for an access token at the playback. Returns a string of the key that tests check
    never appears in logs, errors or files terrabeam writes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "playback-project",
                "private_key_id": "playback-key-id",
                "private_key": pem,
                "client_email": "terrabeam@playback-project.iam.gserviceaccount.com",
                "client_id": "1234567890",
                "token_uri": token_uri,
            }
        )
    )
    return pem.splitlines()[5]  # a line from the middle of the key
