"""Run state in one SQLite file per workspace (``<workspace>/terrabeam.db``): runs and their steps.

Every change is one transaction, so a crash at any point leaves the database as it was before or
after that change, never in between. WAL mode lets `terrabeam runs` read while a run writes.
A reserve file beside the database holds back a little space, given up to record a failure on a
full disk (the database often lives on the disk that filled).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from terrabeam.errors import DiskFullError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config_path TEXT,
    window_start TEXT,
    window_end TEXT,
    status TEXT NOT NULL,            -- running | done | failed | interrupted | no_data
    created REAL NOT NULL,
    finished REAL,
    pixels INTEGER,
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    status TEXT NOT NULL,            -- pending | running | done | failed | interrupted | no_data
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    seconds REAL,
    external_id TEXT,
    outputs TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    PRIMARY KEY (run_id, name)
);
"""


@dataclass
class StepRecord:
    name: str
    status: str
    attempts: int = 0
    seconds: float | None = None
    external_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunRecord:
    id: str
    pipeline: str
    config_hash: str
    config_path: str | None
    window_start: str | None
    window_end: str | None
    status: str
    created: float
    finished: float | None
    pixels: int | None
    outputs: list[str]
    error: str | None
    steps: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As JSON shows it: times in ISO 8601 (UTC)."""
        times = {"created": _iso(self.created), "finished": _iso(self.finished)}
        return self.__dict__ | times | {"steps": [s.__dict__ for s in self.steps]}


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


RESERVE_BYTES = 256 * 2**10  # room for a few dozen WAL frames: enough to record how a run ended


class RunState:
    """The workspace's run database."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """``read_only``: open the database with SQLite's ``mode=ro`` (it must exist; no schema, no
        reserve file): for readers such as ``terrabeam serve`` that must never change a run."""
        self.path = path
        self.reserve = path.with_name(f".{path.name}.reserve")
        if read_only:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=60000")
            self._db.executescript(SCHEMA)
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise (self._disk_full(exc) or exc) from None
        self._hold_reserve()

    def _hold_reserve(self) -> None:
        """Write the reserve file if it is missing (real bytes: a sparse file would hold nothing back);
        on a disk already full there is none until space is freed."""
        if self.reserve.exists():
            return
        partial = self.reserve.with_name(self.reserve.name + ".partial")
        try:
            partial.write_bytes(bytes(RESERVE_BYTES))
            os.replace(partial, self.reserve)
        except OSError:
            partial.unlink(missing_ok=True)

    def release_reserve(self) -> None:
        """Give the reserved space back to the disk, so that the next writes can record a failure."""
        self.reserve.unlink(missing_ok=True)

    def _disk_full(self, exc: sqlite3.OperationalError) -> DiskFullError | None:
        if "database or disk is full" in str(exc):
            return DiskFullError(f"no space left on device writing {self.path}")
        return None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            full = self._disk_full(exc)
            if full is None:
                raise
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise full from exc

    def close(self) -> None:
        self._db.close()

    # --- runs -------------------------------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        pipeline: str,
        config_hash: str,
        window: tuple[str, str] | None,
        steps: list[str],
        config_path: str = "",
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, pipeline, config_hash, config_path, window_start, window_end, status, "
                "created) VALUES (?, ?, ?, ?, ?, ?, 'running', ?)",
                (run_id, pipeline, config_hash, config_path, *(window or (None, None)), time.time()),
            )
            db.executemany(
                "INSERT INTO steps (run_id, name, position, status) VALUES (?, ?, ?, 'pending')",
                [(run_id, name, i) for i, name in enumerate(steps)],
            )

    def find_run(self, pipeline: str, config_hash: str, window: tuple[str, str] | None) -> RunRecord | None:
        """The latest run of this pipeline, config and window (the identity a re-run resumes)."""
        start, end = window or (None, None)
        row = self._db.execute(
            "SELECT id FROM runs WHERE pipeline = ? AND config_hash = ? AND window_start IS ? "
            "AND window_end IS ? ORDER BY created DESC LIMIT 1",
            (pipeline, config_hash, start, end),
        ).fetchone()
        return self.get_run(row["id"]) if row else None

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        steps = [
            StepRecord(
                name=s["name"],
                status=s["status"],
                attempts=s["attempts"],
                seconds=s["seconds"],
                external_id=s["external_id"],
                outputs=json.loads(s["outputs"]),
                error=s["error"],
            )
            for s in self._db.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY position", (run_id,))
        ]
        return RunRecord(
            id=row["id"],
            pipeline=row["pipeline"],
            config_hash=row["config_hash"],
            config_path=row["config_path"],
            window_start=row["window_start"],
            window_end=row["window_end"],
            status=row["status"],
            created=row["created"],
            finished=row["finished"],
            pixels=row["pixels"],
            outputs=json.loads(row["outputs"]),
            error=row["error"],
            steps=steps,
        )

    def list_runs(self, pipeline: str | None = None) -> list[RunRecord]:
        query = "SELECT id FROM runs" + (" WHERE pipeline = ?" if pipeline else "") + " ORDER BY created"
        return [self.get_run(r["id"]) for r in self._db.execute(query, (pipeline,) if pipeline else ())]

    def finish_run(
        self,
        run_id: str,
        status: str,
        pixels: int | None = None,
        outputs: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, pixels = COALESCE(?, pixels), "
                "outputs = COALESCE(?, outputs), error = ? WHERE id = ?",
                (
                    status,
                    time.time(),
                    pixels,
                    json.dumps(outputs) if outputs is not None else None,
                    error,
                    run_id,
                ),
            )

    def reopen_run(self, run_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET status = 'running', error = NULL, finished = NULL WHERE id = ?", (run_id,)
            )

    # --- steps ------------------------------------------------------------------------------
    def start_attempt(self, run_id: str, step: str) -> int:
        """Mark a step running and count the attempt; returns the attempt number."""
        with self._transaction() as db:
            db.execute(
                "UPDATE steps SET status = 'running', attempts = attempts + 1, started = ?, error = NULL "
                "WHERE run_id = ? AND name = ?",
                (time.time(), run_id, step),
            )
            return db.execute(
                "SELECT attempts FROM steps WHERE run_id = ? AND name = ?", (run_id, step)
            ).fetchone()[0]

    def set_external_id(self, run_id: str, step: str, external_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE steps SET external_id = ? WHERE run_id = ? AND name = ?", (external_id, run_id, step)
            )

    def finish_step(self, run_id: str, step: str, seconds: float, outputs: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE steps SET status = 'done', finished = ?, seconds = ?, outputs = ?, error = NULL "
                "WHERE run_id = ? AND name = ?",
                (time.time(), seconds, json.dumps(outputs, default=str), run_id, step),
            )

    def fail_step(self, run_id: str, step: str, error: str, status: str) -> None:
        """End an attempt that did not finish: ``failed``, ``pending`` (to be retried) or ``interrupted``."""
        with self._transaction() as db:
            db.execute(
                "UPDATE steps SET status = ?, finished = ?, error = ? WHERE run_id = ? AND name = ?",
                (status, time.time(), error, run_id, step),
            )
