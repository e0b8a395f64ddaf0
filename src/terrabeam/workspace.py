"""The run workspace: ``<workspace>/<run>/{export,predict,deliver}``, each step's folder published whole.

A step writes into a hidden staging folder beside its final one and renames it into place only
when complete, so a failed or killed step never leaves a folder that looks finished.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from terrabeam.errors import WorkspaceError

STEPS = ("export", "predict", "deliver")


def new_run_id(root: Path) -> str:
    """A readable run id, the UTC time the run started, made unique in ``root`` with a -N suffix."""
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, number = base, 1
    while (root / candidate).exists():
        number += 1
        candidate = f"{base}-{number}"
    return candidate


class Workspace:
    """One run's folder inside a workspace root."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.root = root
        self.run_id = run_id
        self.run_dir = root / run_id

    @classmethod
    def latest(cls, root: Path) -> Workspace:
        """The run in ``root`` changed most recently (a step publishes by renaming into its folder)."""
        runs = (
            [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
        )
        if not runs:
            raise WorkspaceError(f"{root}: no runs yet; start one with 'terrabeam run CONFIG'")
        return cls(root, max(runs, key=lambda p: p.stat().st_mtime_ns).name)

    def ensure_writable(self) -> None:
        """Create the run folder and prove it is writable, before any work starts."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise WorkspaceError(
                f"workspace {self.run_dir} is not writable ({exc.strerror or exc}); "
                "set 'workspace:' in the config or --workspace to a writable folder"
            ) from None

    def step_dir(self, step: str) -> Path:
        return self.run_dir / step

    def require_step(self, step: str) -> Path:
        path = self.step_dir(step)
        if not path.is_dir():
            raise WorkspaceError(
                f"{path}: step '{step}' has no finished output in run {self.run_id}; run it first"
            )
        return path

    @contextmanager
    def staging(self, step: str) -> Iterator[Path]:
        """Yield an empty staging folder; on success it replaces the step's folder in one rename."""
        self.ensure_writable()
        staging = self.run_dir / f".{step}.staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.publish(staging, step)

    def remove_leftovers(self) -> list[Path]:
        """Delete staging and retired folders a killed step left behind (call under the run's lock;
        the predict work folder is kept: it is what a resumed predict builds on)."""
        removed = []
        if self.run_dir.is_dir():
            for path in self.run_dir.iterdir():
                if path.name.startswith(".") and (".staging-" in path.name or ".old-" in path.name):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def work_dir(self, step: str) -> Path:
        """A hidden folder that survives an interrupted step, so a resumed step keeps finished parts."""
        self.ensure_writable()
        path = self.run_dir / f".{step}.work"
        path.mkdir(exist_ok=True)
        return path

    def publish(self, folder: Path, step: str) -> None:
        """Make ``folder`` the step's output in one rename, replacing an older one."""
        final = self.step_dir(step)
        if final.exists():
            retired = self.run_dir / f".{step}.old-{uuid.uuid4().hex[:8]}"
            final.rename(retired)
            folder.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            folder.rename(final)
