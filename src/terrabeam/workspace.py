"""The run workspace: ``<workspace>/<run>/{export,predict,deliver}``, each step's folder published whole.

A step writes into a hidden staging folder beside its final one and renames it into place only
when complete, so a failed or killed step never leaves a folder that looks finished.

A workspace on object storage (``gs://…``, ``s3://…``) is mirrored by a local folder (under
``$TERRABEAM_CACHE``, default ``~/.cache/terrabeam``) where steps work, the run history and the locks
live. A published step folder is uploaded file by file, then a ``_COMPLETE.json`` object listing its
files is written last: object stores cannot rename a folder, so a step folder without that marker
is unfinished. A step whose input is not in the mirror downloads it from a complete remote folder.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from terrabeam.errors import WorkspaceError

STEPS = ("export", "predict", "deliver")
COMPLETE = "_COMPLETE.json"


def resolve_root(location: str, base: Path | None = None) -> tuple[Path, str | None]:
    """(local root, remote URI or None) of a workspace given as a path or a gs:// / s3:// URI."""
    if "://" in location:
        uri = location.rstrip("/")
        from terrabeam.storage import cache_dir

        return cache_dir() / "workspaces" / uri.replace("://", "/"), uri
    path = Path(location).expanduser()
    return (path if path.is_absolute() or base is None else base / path).resolve(), None


def new_run_id(root: Path) -> str:
    """A readable run id, the UTC time the run started, made unique in ``root`` with a -N suffix."""
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, number = base, 1
    while (root / candidate).exists():
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def replace_folder(folder: Path, final: Path) -> None:
    """Make ``folder`` the folder ``final`` by rename; an older ``final`` is moved aside first and
    removed after, so ``final`` is never half-written (a killed process leaves a hidden .old- folder)."""
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(retired)
        folder.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        folder.rename(final)


class Workspace:
    """One run's folder inside a workspace root."""

    def __init__(self, root: Path, run_id: str, remote: str | None = None) -> None:
        self.root = root
        self.run_id = run_id
        self.run_dir = root / run_id
        self.remote = remote

    @property
    def location(self) -> str:
        """Where the run lives for the user: the remote URI, or the local folder."""
        return f"{self.remote}/{self.run_id}" if self.remote else str(self.run_dir)

    def step_location(self, step: str) -> str:
        """Where the step's published files are for the user: the remote URI, or the local folder."""
        return self.remote_step(step) if self.remote else str(self.step_dir(step))

    def remote_step(self, step: str) -> str:
        return f"{self.remote}/{self.run_id}/{step}"

    @classmethod
    def latest(cls, root: Path, remote: str | None = None) -> Workspace:
        """The run in ``root`` changed most recently (a step publishes by renaming into its folder)."""
        runs = (
            [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
        )
        if not runs:
            raise WorkspaceError(f"{root}: no runs yet; start one with 'terrabeam run CONFIG'")
        return cls(root, max(runs, key=lambda p: p.stat().st_mtime_ns).name, remote)

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

    def has_step(self, step: str) -> bool:
        """The step's folder is published here, or complete in the remote workspace."""
        if self.step_dir(step).is_dir():
            return True
        from terrabeam import storage

        return self.remote is not None and storage.exists(f"{self.remote_step(step)}/{COMPLETE}")

    def require_step(self, step: str) -> Path:
        """The step's published folder, downloaded from the remote workspace if needed."""
        path = self.step_dir(step)
        if not path.is_dir() and self.has_step(step):
            self._download(step)
        if not path.is_dir():
            where = self.remote_step(step) if self.remote else path
            raise WorkspaceError(
                f"{where}: step '{step}' has no finished output in run {self.run_id}; run it first"
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
        """Make ``folder`` the step's output in one rename, replacing an older one (then upload it)."""
        self._publish_locally(folder, step)
        if self.remote is not None:
            self._upload(step)

    def upload_file(self, path: Path) -> None:
        """Copy a file of the run folder (e.g. summary.json) to the remote workspace."""
        if self.remote is not None:
            from terrabeam import storage

            storage.copy_file(str(path), f"{self.remote}/{self.run_id}/{path.relative_to(self.run_dir)}")

    def _upload(self, step: str) -> None:
        from terrabeam import storage

        target = self.remote_step(step)
        marker = f"{target}/{COMPLETE}"
        if storage.exists(marker):  # replacing an older folder: unfinished until the new marker
            storage.delete([marker])
        files = sorted(p for p in self.step_dir(step).rglob("*") if p.is_file())
        listing = {}
        for path in files:
            name = path.relative_to(self.step_dir(step)).as_posix()
            listing[name] = storage.copy_file(str(path), f"{target}/{name}")
        storage.write_bytes(marker, json.dumps({"run": self.run_id, "step": step, "files": listing}).encode())

    def _download(self, step: str) -> None:
        from terrabeam import storage

        source = self.remote_step(step)
        listing = json.loads(storage.read_bytes(f"{source}/{COMPLETE}"))["files"]
        self.ensure_writable()
        staging = self.run_dir / f".{step}.staging-{uuid.uuid4().hex[:8]}"
        try:
            for name, size in listing.items():
                if storage.copy_file(f"{source}/{name}", str(staging / name)) != size:
                    raise WorkspaceError(f"{source}/{name}: size differs from {COMPLETE}; the folder changed")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._publish_locally(staging, step)

    def _publish_locally(self, folder: Path, step: str) -> None:
        replace_folder(folder, self.step_dir(step))
