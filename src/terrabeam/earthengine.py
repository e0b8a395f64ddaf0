"""Earth Engine access shared by the earthengine source and sink: credentials, one initialised
client per process, and the state of a long-running task (an export or an ingestion).

Credentials come from the environment only: Earth Engine's own stored credentials
(``earthengine authenticate``) or Google's Application Default Credentials (``gcloud auth
application-default login``, ``GOOGLE_APPLICATION_CREDENTIALS``, or the service account of the
machine), optionally impersonating ``earthengine.service_account``. terrabeam never writes,
logs or shows a key: errors name where credentials were looked for, never their content.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from terrabeam.config import EarthEngineConfig
from terrabeam.errors import TerrabeamError, TransientError

log = logging.getLogger("terrabeam.earthengine")

SCOPES = [
    "https://www.googleapis.com/auth/earthengine",
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/devstorage.full_control",
]

NO_CREDENTIALS = (
    "Earth Engine: no credentials found. Do one of: `gcloud auth application-default login` "
    "(a person at this machine); set GOOGLE_APPLICATION_CREDENTIALS to a service account key file "
    "kept outside the repository; `earthengine authenticate`; or run on Google Cloud with a service "
    "account attached. Then check that project {project!r} (earthengine.project) has the Earth Engine "
    "API enabled and that the account may use it. Nothing was started."
)


class EarthEngineError(TerrabeamError):
    """Earth Engine refused a request or a task failed (its own message included)."""


class CredentialsError(EarthEngineError):
    """No usable credentials: the message says how to provide them, never what they contain."""


def require_earthengine_api() -> Any:
    try:
        import ee
    except ImportError:
        raise TerrabeamError(
            "the earthengine source/sink needs the Earth Engine client: pip install 'terrabeam[earthengine]'"
        ) from None
    return ee


def find_credentials(config: EarthEngineConfig) -> Any:
    """Credentials from the environment (see the module docstring); CredentialsError if none."""
    ee = require_earthengine_api()
    import google.auth.exceptions

    try:
        credentials = ee.data.get_persistent_credentials()
    except (ee.EEException, google.auth.exceptions.DefaultCredentialsError):
        credentials = None
    if credentials is None:
        raise CredentialsError(NO_CREDENTIALS.format(project=config.project))
    if config.service_account:
        from google.auth import impersonated_credentials

        credentials = impersonated_credentials.Credentials(
            source_credentials=credentials, target_principal=config.service_account, target_scopes=SCOPES
        )
    elif getattr(credentials, "requires_scopes", False):
        credentials = credentials.with_scopes(SCOPES)
    return credentials


_connected: tuple[str, str | None] | None = None
_connecting = threading.Lock()  # a worker's threads may connect at once


def connect(config: EarthEngineConfig) -> Any:
    """Initialise the Earth Engine client for ``config.project`` once per process; returns ``ee``."""
    ee = require_earthengine_api()
    key = (config.project, config.api_url)
    if _connected == key:
        return ee
    with _connecting:
        return _initialize(ee, config, key)


def _initialize(ee: Any, config: EarthEngineConfig, key: tuple[str, str | None]) -> Any:
    global _connected
    if _connected == key:
        return ee
    credentials = find_credentials(config)
    try:
        ee.Initialize(credentials=credentials, project=config.project, url=config.api_url)
    except ee.EEException as exc:
        raise _ee_error(f"Earth Engine: cannot initialise for project {config.project!r}", exc) from None
    except Exception as exc:
        if _looks_transient(exc):
            raise TransientError(f"Earth Engine unreachable ({type(exc).__name__}: {exc})") from None
        raise
    _connected = key
    return ee


class Refusal(Exception):
    """An HTTP error answer of Earth Engine: its status, its Retry-After (seconds) if it sent one,
    and its message."""

    def __init__(self, status: int, retry_after: float | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.retry_after, self.message = status, retry_after, message


def compute_pixels(body: dict[str, Any]) -> bytes:
    """POST ``image:computePixels`` once (``body['expression']`` already serialized, format NPY) and
    return the response's bytes; an error answer raises :class:`Refusal`.

    ``ee.data.computePixels`` lets the HTTP client retry 429 and 5xx answers on its own, out of
    reach of terrabeam's rate limit, and reduces the answer to a message without its status. This
    is the same request through the client's own API resource (so credentials, endpoint, project
    and workload tag are the client's), executed without retries.
    """
    require_earthengine_api()
    import googleapiclient.errors
    from ee import data

    body = dict(body)
    data._maybe_populate_workload_tag(body)
    call = data._get_cloud_projects_raw().image().computePixels(project=data._get_projects_path(), body=body)
    try:
        return call.execute(num_retries=0)
    except googleapiclient.errors.HttpError as exc:
        retry_after = exc.resp.get("retry-after")
        try:
            seconds = float(retry_after) if retry_after is not None else None
        except ValueError:  # an HTTP date: not worth parsing, the backoff applies
            seconds = None
        raise Refusal(int(exc.resp.status), seconds, exc._get_reason().strip()) from None


def request_id(*parts: str) -> str:
    """A request id derived from the run: sending the same request twice starts one task, not two."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "terrabeam:" + ":".join(parts)))


@dataclass(frozen=True)
class TaskState:
    """Where an Earth Engine task is: PENDING, RUNNING, CANCELLING, SUCCEEDED, FAILED or CANCELLED."""

    name: str
    state: str
    error: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"


def task_state(operation_name: str) -> TaskState:
    """The state of a task from its operation (``projects/P/operations/ID``)."""
    ee = require_earthengine_api()
    try:
        operation = ee.data.getOperation(operation_name)
    except ee.EEException as exc:
        raise _ee_error(f"Earth Engine: cannot read task {operation_name}", exc) from None
    metadata = operation.get("metadata") or {}
    state = metadata.get("state") or ("SUCCEEDED" if operation.get("done") else "PENDING")
    error = (operation.get("error") or {}).get("message")
    if operation.get("done") and error and state not in ("FAILED", "CANCELLED"):
        state = "FAILED"
    return TaskState(operation_name, state, error, metadata)


def raise_if_failed(task: TaskState, what: str) -> None:
    if task.state == "FAILED":
        raise EarthEngineError(f"Earth Engine {what} task {task.name} failed: {task.error or 'no message'}")
    if task.state == "CANCELLED":
        raise EarthEngineError(f"Earth Engine {what} task {task.name} was cancelled")


def _looks_transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, ConnectionError | TimeoutError) or any(
        w in text for w in ("timed out", "connection", "unavailable", "429", "503", "502", "500")
    )


def _ee_error(message: str, exc: BaseException) -> Exception:
    text = f"{message}: {exc}".splitlines()[0][:1000]
    return TransientError(text) if _looks_transient(exc) else EarthEngineError(text)
