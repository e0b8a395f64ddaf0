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

import errno
import json
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from terrabeam.errors import DiskFullError, TerrabeamError, WorkspaceError, chain

STEPS = ("export", "predict", "deliver")
FOLDERS = {"map": "deliver"}  # the one-pipeline step publishes the map where deliver does
COMPLETE = "_COMPLETE.json"
RUN_MARKER = "run.json"  # {"pipeline", "config_hash"} of the config that made the run folder

# GDAL reports a full disk without an errno ("Write failed", "TIFFAppendToStrip:Seek error"): a
# write error on a device with less than this left is taken for a full disk.
NEARLY_FULL_BYTES = 16 * 2**20


def disk_full_error(exc: BaseException, folder: Path) -> DiskFullError | None:
    """``exc`` as a DiskFullError naming the file, if a write into ``folder`` failed for want of
    space: ENOSPC or EDQUOT in its chain, or an I/O error (OSError, GDAL's CPLE_*) while the device
    is nearly full; else None (also for terrabeam's own errors, a DiskFullError among them).

    The file is the one the error names, else the newest file in ``folder`` (the one being
    written), else ``folder`` itself."""
    if isinstance(exc, TerrabeamError):
        return None
    causes = list(chain(exc))
    full = next(
        (e for e in causes if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None
    )
    if full is None:
        io_error = any(isinstance(e, OSError) or type(e).__name__.startswith("CPLE_") for e in causes)
        if not io_error or _free_bytes(folder) >= NEARLY_FULL_BYTES:
            return None
    return DiskFullError(
        f"no space left on device writing {(full and full.filename) or _newest_file(folder)}"
    )


def _free_bytes(folder: Path) -> int:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _newest_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else folder


@contextmanager
def disk_full_as_error(folder: Path) -> Iterator[None]:
    """Turn a write failure for want of space inside ``folder`` into one DiskFullError."""
    try:
        yield
    except Exception as exc:
        full = disk_full_error(exc, folder)
        if full is None:
            raise
        raise full from exc


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

    def __init__(
        self,
        root: Path,
        run_id: str,
        remote: str | None = None,
        window: tuple[str, str] | None = None,
        created: float | None = None,
    ) -> None:
        self.root = root
        self.run_id = run_id
        self.window = window  # the run's [start, end) as ISO dates, if it has one (recorded in maps)
        self.created = created  # when the run was made (its date without a window)
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
        """The step's folder in the remote workspace (map publishes where deliver does, as locally)."""
        return f"{self.remote}/{self.run_id}/{FOLDERS.get(step, step)}"

    @classmethod
    def latest(
        cls,
        root: Path,
        pipeline: str,
        config_hash: str,
        remote: str | None = None,
        recorded: Collection[str] = (),
    ) -> Workspace:
        """The run of this pipeline and config in ``root`` changed most recently (a step publishes by
        renaming into its folder): by its run marker, or for a folder without one (made before
        markers existed) by ``recorded``, the ids the run history gives this pipeline and config.
        Runs of other pipelines or configs never qualify: a step run alone must not touch them."""
        runs = (
            [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
        )
        if not runs:
            raise WorkspaceError(f"{root}: no runs yet; start one with 'terrabeam run CONFIG'")
        wanted = {"pipeline": pipeline, "config_hash": config_hash}
        mine = [p for p in runs if (m := read_run_marker(p)) == wanted or (m is None and p.name in recorded)]
        if not mine:
            raise WorkspaceError(
                f"{root}: no run of pipeline {pipeline!r} with this configuration (hash {config_hash}); "
                "start one with 'terrabeam run CONFIG' or 'terrabeam export CONFIG', or name one with --run"
            )
        return cls(root, max(mine, key=lambda p: p.stat().st_mtime_ns).name, remote)

    def ensure_writable(self) -> None:
        """Create the run folder and prove it is writable, before any work starts."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise disk_full_error(exc, self.run_dir) or WorkspaceError(
                f"workspace {self.run_dir} is not writable ({exc.strerror or exc}); "
                "set 'workspace:' in the config or --workspace to a writable folder"
            ) from None

    def claim(self, pipeline: str, config_hash: str, same_config: bool) -> None:
        """Write the run marker of a new run folder; refuse a run made by another pipeline (or, with
        ``same_config``, by another configuration of it)."""
        self.ensure_writable()
        path = self.run_dir / RUN_MARKER
        if not path.exists() and self.remote is not None:  # a fresh mirror: the run may exist remotely
            from terrabeam import storage

            uri = f"{self.remote}/{self.run_id}/{RUN_MARKER}"
            if storage.exists(uri):
                storage.copy_file(uri, str(path))
        marker = read_run_marker(self.run_dir)
        if marker is None:
            if path.exists():
                raise WorkspaceError(f"{path}: not a terrabeam run marker; is {self.run_dir} a run folder?")
            if any(self.run_dir.iterdir()):
                return  # a run folder made before run markers existed: nothing to compare with
            with disk_full_as_error(self.run_dir):
                path.write_text(json.dumps({"pipeline": pipeline, "config_hash": config_hash}) + "\n")
            self.upload_file(path)
            return
        if marker["pipeline"] != pipeline:
            raise WorkspaceError(
                f"run {self.run_id} belongs to pipeline {marker['pipeline']!r}, not {pipeline!r} ({path}); "
                "give another --run"
            )
        if same_config and marker["config_hash"] != config_hash:
            raise WorkspaceError(
                f"run {self.run_id} was made with another configuration of {pipeline!r} (hash "
                f"{marker['config_hash']}, now {config_hash}; {path}); start a new run instead"
            )

    def step_dir(self, step: str) -> Path:
        return self.run_dir / FOLDERS.get(step, step)

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

    def step_metadata(self, step: str) -> tuple[Path, list[str] | None]:
        """(a local folder with the step's ``.json`` files, the names of all its files) for a caller
        that needs only its metadata (a mixer, a manifest) while remote workers read the rest: the
        published folder itself when it is here (names None: look in it), else just the JSON files
        of the complete remote folder, downloaded into a hidden folder, so no shard crosses."""
        path = self.step_dir(step)
        if path.is_dir() or self.remote is None or not self.has_step(step):
            return self.require_step(step), None
        names = self._fetch(step, self.run_dir / f".{step}.metadata", lambda name: name.endswith(".json"))
        return self.run_dir / f".{step}.metadata", names

    def publish_remote(self, step: str, objects: dict[str, str], folder: Path) -> None:
        """Publish the step in the remote workspace from ``objects`` (name → URI in the same store,
        copied there without their bytes passing through this machine) and ``folder``'s files (small
        ones made here); then its completion marker. The mirror keeps no copy of the step: a later
        step that needs it here downloads it (``require_step``)."""
        self._upload(step, folder, objects)
        shutil.rmtree(self.step_dir(step), ignore_errors=True)  # an older local copy is not this one

    @contextmanager
    def staging(self, step: str) -> Iterator[Path]:
        """Yield an empty staging folder; on success it replaces the step's folder in one rename."""
        self.ensure_writable()
        staging = self.run_dir / f".{step}.staging-{uuid.uuid4().hex[:8]}"
        try:
            with disk_full_as_error(staging):
                staging.mkdir()
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

    def _upload(self, step: str, folder: Path | None = None, objects: dict[str, str] | None = None) -> None:
        """The remote step folder from ``folder``'s files (default: the published one) and
        ``objects`` (name → URI in the same store, copied there server-side); the marker last."""
        from terrabeam import storage

        folder = folder or self.step_dir(step)
        target = self.remote_step(step)
        marker = f"{target}/{COMPLETE}"
        if storage.exists(marker):  # replacing an older folder: unfinished until the new marker
            storage.delete([marker])
        listing = {
            name: storage.copy_object(uri, f"{target}/{name}")
            for name, uri in sorted((objects or {}).items())
        }
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            listing[name] = storage.copy_file(str(path), f"{target}/{name}")
        storage.write_bytes(marker, json.dumps({"run": self.run_id, "step": step, "files": listing}).encode())

    def _fetch(self, step: str, target: Path, wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
        """Download the ``wanted`` files of the complete remote step folder into ``target`` (replaced
        whole, sizes checked against the marker); returns the names of all its files."""
        from terrabeam import storage

        source = self.remote_step(step)
        listing = json.loads(storage.read_bytes(f"{source}/{COMPLETE}"))["files"]
        self.ensure_writable()
        staging = self.run_dir / f".{step}.staging-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            for name, size in listing.items():
                if wanted(name) and storage.copy_file(f"{source}/{name}", str(staging / name)) != size:
                    raise WorkspaceError(f"{source}/{name}: size differs from {COMPLETE}; the folder changed")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_folder(staging, target)
        return sorted(listing)

    def _download(self, step: str) -> None:
        self._fetch(step, self.step_dir(step))

    def _publish_locally(self, folder: Path, step: str) -> None:
        replace_folder(folder, self.step_dir(step))


def read_run_marker(run_dir: Path) -> dict[str, str] | None:
    """The run marker's pipeline and config hash, or None if the folder has none (or not a valid one)."""
    try:
        data = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not {"pipeline", "config_hash"} <= data.keys():
        return None
    return {"pipeline": str(data["pipeline"]), "config_hash": str(data["config_hash"])}
