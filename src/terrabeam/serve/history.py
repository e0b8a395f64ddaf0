"""A workspace's run history and run folders as the dashboard shows them, read-only: the SQLite
database opened with ``mode=ro``, summary.json and the live progress file only read."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terrabeam.errors import WorkspaceError
from terrabeam.progress import RUN_FILE
from terrabeam.workflow.state import RunRecord, RunState
from terrabeam.workspace import Workspace

HISTORY = "terrabeam.db"
ENDED_BADLY = ("failed", "interrupted", "no_data")


@dataclass(frozen=True)
class RunMap:
    """A delivered class map of a run: its layer files in the run's deliver folder (the single COG
    of a layer where deliver wrote one, else the VRT mosaic over its tile COGs)."""

    name: str  # the file stem, e.g. sentinel2-cloudmask
    classes: Path
    classes_vrt: Path  # always written; holds the class names (GDAL category names)
    probabilities: Path | None
    quicklook: Path | None


class RunHistory:
    """Reads ``<root>/terrabeam.db`` and the run folders beside it; never writes either."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / HISTORY
        if not self.db.is_file():
            raise WorkspaceError(f"{root}: no run history here ({HISTORY}); give --workspace")

    @contextmanager
    def _state(self) -> Iterator[RunState]:
        """A read-only connection per request: requests run on several threads."""
        state = RunState(self.db, read_only=True)
        try:
            yield state
        finally:
            state.close()

    def records(self) -> list[RunRecord]:
        """All runs, newest first."""
        with self._state() as state:
            return sorted(state.list_runs(), key=lambda r: r.created, reverse=True)

    def record(self, run_id: str) -> RunRecord | None:
        with self._state() as state:
            return state.get_run(run_id)

    def run_dir(self, run_id: str) -> Path:
        return Workspace(self.root, run_id).run_dir

    def summary(self, record: RunRecord) -> dict[str, Any]:
        """One line of the runs page: identity, status, timings, Mpx/s, and where it failed."""
        failing = next((s for s in record.steps if s.status in ENDED_BADLY), None)
        summary_file = _read_json(self.run_dir(record.id) / "summary.json")
        end = record.finished if record.finished is not None else time.time()
        return {
            "id": record.id,
            "pipeline": record.pipeline,
            "config_hash": record.config_hash,
            "window": [record.window_start, record.window_end] if record.window_start else None,
            "status": record.status,
            "created": record.created,
            "finished": record.finished,
            "wall_seconds": round(end - record.created, 3),
            "step_seconds": round(sum(s.seconds or 0.0 for s in record.steps), 3),
            "pixels": record.pixels,
            # from summary.json: the pixels over the pipeline's own seconds (validate + steps)
            "mpx_per_second": summary_file.get("mpx_per_second") if summary_file else None,
            "error": record.error,
            "failed_step": failing.name if failing else None,
        }

    def detail(self, record: RunRecord) -> dict[str, Any]:
        """The run page: the summary, every step with its attempts, the outputs (those still there),
        and the live progress of a running run."""
        deliver = Workspace(self.root, record.id).step_dir("deliver")
        outputs = [
            {"location": o, "name": Path(o).name, "exists": (deliver / Path(o).name).exists()}
            for o in record.outputs
        ]
        steps = [
            {
                "name": s.name,
                "status": s.status,
                "attempts": s.attempts,
                "seconds": s.seconds,
                "external_id": s.external_id,
                "error": s.error,
                "details": {k: v for k, v in s.outputs.items() if k != "outputs"},
            }
            for s in record.steps
        ]
        progress = None
        if record.status == "running":
            progress = _read_json(self.run_dir(record.id) / RUN_FILE)
        return self.summary(record) | {
            "config_path": record.config_path,
            "steps": steps,
            "outputs": outputs,
            "progress": progress,
        }

    def run_map(self, record: RunRecord) -> RunMap | None:
        """The run's class map, if it delivered one that is still in its deliver folder."""
        deliver = Workspace(self.root, record.id).step_dir("deliver")
        names = {Path(o).name for o in record.outputs}
        stems = sorted(n.removesuffix("-classes.vrt") for n in names if n.endswith("-classes.vrt"))
        if not stems or not (deliver / f"{stems[0]}-classes.vrt").is_file():
            return None
        stem = stems[0]

        def layer(name: str) -> Path | None:
            return next(
                (
                    deliver / n
                    for n in (f"{stem}-{name}.tif", f"{stem}-{name}.vrt")
                    if (deliver / n).is_file()
                ),
                None,
            )

        quicklook = deliver / f"{stem}-quicklook.png"
        return RunMap(
            name=stem,
            classes=layer("classes") or deliver / f"{stem}-classes.vrt",
            classes_vrt=deliver / f"{stem}-classes.vrt",
            probabilities=layer("probabilities"),
            quicklook=quicklook if quicklook.is_file() else None,
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
