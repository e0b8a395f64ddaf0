"""The step server under concurrent and hostile requests: identical POSTs start a step once (an
atomic claim, locally and on an s3:// workspace served by moto on 127.0.0.1), a finished step's
status is never overwritten, and requests it will not read get 400, 411 or 413 at once. Real servers
on 127.0.0.1; the tiny synthetic pipeline, or a step function that counts its calls.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_deploy_gcp import _call, serving
from test_object_storage import BUCKET as S3_BUCKET
from test_object_storage import s3  # noqa: F401 - the moto S3 server fixture, used by name

from terrabeam import storage
from terrabeam.config import load_config
from terrabeam.deploy import flex_main, step_server
from terrabeam.workflow.steps import StepReport
from terrabeam.workspace import Workspace

REQUESTS = 6  # identical POSTs at once
ROUNDS = 5


class CountingStep:
    """A step that takes ``seconds``, publishes an empty step folder and counts its calls per run;
    its first ``failures`` calls raise."""

    def __init__(self, seconds: float = 0.3, failures: int = 0) -> None:
        self.seconds, self.failures = seconds, failures
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, config, workspace: Workspace) -> StepReport:
        with self._lock:
            self.calls[workspace.run_id] += 1
            fail = sum(self.calls.values()) <= self.failures
        time.sleep(self.seconds)
        if fail:
            raise RuntimeError("the step broke")
        with workspace.staging("export") as staging:
            (staging / "done.txt").write_text(workspace.run_id)
        return StepReport("export", self.seconds, {"run": workspace.run_id})


def _at_once(count: int, request) -> list:
    """``request(i)`` from ``count`` threads (i = 0 … count − 1) released together."""
    barrier = threading.Barrier(count)

    def go(number: int):
        barrier.wait()
        return request(number)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(go, range(count)))


def _check_one_start(answers: list[tuple[int, dict]]) -> None:
    codes = Counter(code for code, _ in answers)
    assert set(codes) <= {200, 202} and codes[200] >= 1, answers
    assert [a["status"] for c, a in answers if c == 200] == ["done"] * codes[200]
    assert {a["status"] for c, a in answers if c == 202} <= {"running"}


def _leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if ".staging-" in p.name or ".old-" in p.name]


@pytest.fixture
def config(tiny_pipeline):
    document, write = tiny_pipeline
    return load_config(write())


def test_identical_concurrent_posts_start_the_step_once_per_run(config, tmp_path):
    counting = CountingStep()
    ws = tmp_path / "ws"
    with serving(step_server.StepService(config, ws, functions={"export": counting})) as url:
        for round_ in range(ROUNDS):
            run = f"r{round_}"
            _check_one_start(
                _at_once(REQUESTS, lambda _, run=run: _call(f"{url}/steps/export", {"run": run}))
            )
            assert counting.calls[run] == 1
            status = json.loads((ws / run / ".status" / "export.json").read_text())
            assert status["status"] == "done" and status["attempt"] == 1
            assert _call(f"{url}/steps/export", {"run": run}) == (200, status)  # done: not redone
            assert _leftovers(ws / run) == []
    assert counting.calls == {f"r{n}": 1 for n in range(ROUNDS)}


def test_identical_concurrent_posts_run_the_real_export_once(config, tmp_path):
    """The export of the tiny pipeline: one export per run, no staging leftovers, status stays done."""
    ws = tmp_path / "ws"
    with serving(step_server.StepService(config, ws)) as url:
        for round_ in range(3):
            run = f"e{round_}"
            _check_one_start(
                _at_once(REQUESTS, lambda _, run=run: _call(f"{url}/steps/export", {"run": run}))
            )
            assert sorted(p.name for p in (ws / run / ".status").iterdir()) == [
                "export.claim-1",
                "export.json",
            ]
            assert json.loads((ws / run / ".status" / "export.json").read_text())["status"] == "done"
            assert (ws / run / "export" / "tiny-mixer.json").exists()
            assert _leftovers(ws / run) == []


def test_identical_concurrent_posts_on_an_s3_workspace_start_the_step_once(config, tmp_path, s3):  # noqa: F811
    """Six instances, each with its own mirror, meeting only in the bucket (as Cloud Run instances)."""
    counting = CountingStep()
    workspace = f"s3://{S3_BUCKET}/ws"
    for round_ in range(3):
        run = f"r{round_}"
        services = [
            step_server.StepService(config, tmp_path / f"i{n}-{run}", workspace, {"export": counting})
            for n in range(REQUESTS)
        ]
        _check_one_start(
            _at_once(REQUESTS, lambda n, run=run, services=services: services[n].start("export", run))
        )
        assert counting.calls[run] == 1
        status = json.loads(
            s3.get_object(Bucket=S3_BUCKET, Key=f"ws/{run}/.status/export.json")["Body"].read()
        )
        assert status["status"] == "done"


def test_a_failed_attempt_is_retried_and_a_stale_claim_taken_over(config, tmp_path):
    counting = CountingStep(seconds=0, failures=1)
    service = step_server.StepService(config, tmp_path / "ws", functions={"export": counting})
    code, failed = service.start("export", "r1")
    assert code == 500 and failed["status"] == "failed" and failed["attempt"] == 1
    code, done = service.start("export", "r1")  # a failed attempt does not hold the step
    assert code == 200 and done["attempt"] == 2 and counting.calls["r1"] == 2

    status = tmp_path / "ws" / "r2" / ".status"
    status.mkdir(parents=True)
    old = {"status": "running", "run": "r2", "step": "export", "attempt": 1}
    (status / "export.claim-1").write_text(json.dumps(old | {"started": time.time()}))
    assert service.start("export", "r2") == (202, json.loads((status / "export.claim-1").read_text()))
    assert service.status("export", "r2")[1]["status"] == "running"  # claimed, no status yet
    (status / "export.claim-1").write_text(
        json.dumps(old | {"started": time.time() - 2 * step_server.STALE_SECONDS})
    )
    code, done = service.start("export", "r2")  # its instance died: taken over
    assert code == 200 and done["attempt"] == 2 and counting.calls["r2"] == 1


def test_a_superseded_attempt_does_not_overwrite_the_newer_status(config, tmp_path):
    """An attempt that ends after a newer one took over its stale claim leaves the status alone."""
    service = step_server.StepService(config, tmp_path / "ws", functions={"export": CountingStep(0)})
    record = {"status": "running", "run": "r1", "step": "export", "attempt": 1, "started": 0.0}
    newer = record | {"attempt": 2, "status": "done"}
    status = tmp_path / "ws" / "r1" / ".status"
    status.mkdir(parents=True)
    for attempt in (1, 2):
        (status / f"export.claim-{attempt}").write_text(json.dumps(record | {"attempt": attempt}))
    (status / "export.json").write_text(json.dumps(newer))
    assert service._run_claimed(record, Workspace(tmp_path / "ws", "r1"))[0] == 200
    assert json.loads((status / "export.json").read_text()) == newer


def test_create_exclusive_has_one_winner_locally_and_on_s3(tmp_path, s3):  # noqa: F811
    for location in (str(tmp_path / "claims" / "a.claim"), f"s3://{S3_BUCKET}/claims/a.claim"):
        wins = _at_once(8, lambda _, location=location: storage.create_exclusive(location, b"x"))
        assert wins.count(True) == 1, location
        assert storage.read_bytes(location) == b"x"
        assert storage.create_exclusive(location, b"y") is False
    assert [p.name for p in (tmp_path / "claims").iterdir()] == ["a.claim"]  # no temporary files


# --- requests the server refuses -------------------------------------------------------------------


def _raw_post(url: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """POST /steps/export with exactly these headers; the body (if any) is sent after them."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest("POST", "/steps/export", skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_bodies_and_lengths_the_server_will_not_read(config, tmp_path):
    ws = tmp_path / "ws"
    with serving(step_server.StepService(config, ws, functions={"export": CountingStep(0)})) as url:
        # A huge declared body is refused before a byte of it is sent (reading would block).
        code, answer = _raw_post(url, {"Content-Length": str(2**30)})
        assert code == 413 and str(step_server.MAX_BODY) in answer["error"]
        assert _raw_post(url, {"Content-Length": str(step_server.MAX_BODY + 1)})[0] == 413
        assert _raw_post(url, {})[0] == 411
        for bad in ("-1", "abc", "1e3", "0x10", "+5"):
            code, answer = _raw_post(url, {"Content-Length": bad})
            assert code == 400 and "Content-Length" in answer["error"], bad
        nested = b"[" * 100_000
        code, answer = _raw_post(url, {"Content-Length": str(len(nested))}, nested)
        assert code == 400 and answer["status"] == "failed" and "\n" not in answer["error"]
        body = json.dumps({"run": "ok"}).encode()
        assert _raw_post(url, {"Content-Length": str(len(body))}, body)[0] == 200
    assert [p.name for p in ws.iterdir()] == ["ok"]


def test_run_ids_must_match_their_whole_pattern(config, tmp_path):
    ws = tmp_path / "ws"
    with serving(step_server.StepService(config, ws, functions={"export": CountingStep(0)})) as url:
        for run in ("nl\n", "a\nb", "ok\n\n", "", " ok", 7):
            assert _call(f"{url}/steps/export", {"run": run})[0] == 400, run
        assert _call(f"{url}/steps/export?run=nl%0A")[0] == 400
    assert not ws.exists() or list(ws.iterdir()) == []
    args = ["--workspace", str(ws), "--run", "nl\n", "--config", str(config.base_dir / "tiny.yaml")]
    assert flex_main.main(args) == 1
