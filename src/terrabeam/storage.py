"""Files wherever they live: local paths, ``gs://`` and ``s3://`` URIs, through Apache Beam's FileSystems.

One file-system layer for the whole tool: the predict pipeline's workers already read through Beam's
FileSystems, so the steps around it use the same (the same credentials, the same URI schemes and the
same bugs) instead of a second library. Beam cannot copy between two different file systems, so
transfers stream bytes through this process; compression is always off, so ``.gz`` files are moved
byte for byte and never re-compressed.
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from collections.abc import Iterable
from pathlib import Path

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems as _BeamFileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from terrabeam.errors import InputError, TransientError

CHUNK = 8 * 2**20
log = logging.getLogger("terrabeam.storage")


def cache_dir() -> Path:
    """Where local copies live: remote models, the mirror of a remote workspace (``$TERRABEAM_CACHE``)."""
    return Path(os.environ.get("TERRABEAM_CACHE", "~/.cache/terrabeam")).expanduser()


RAW = CompressionTypes.UNCOMPRESSED


class _FileSystems:
    """Beam's FileSystems, given default options first: outside a pipeline Beam has none, and its S3
    file system refuses to start without them (credentials and endpoint then come from boto3's
    environment, e.g. AWS_ENDPOINT_URL)."""

    def __getattr__(self, name: str):
        if _BeamFileSystems._pipeline_options is None:
            _BeamFileSystems.set_options(PipelineOptions([]))
        return getattr(_BeamFileSystems, name)


FileSystems = _FileSystems()


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def join(folder: str, *names: str) -> str:
    """Join a folder URI (or path) and names with '/', whatever the scheme."""
    if is_remote(folder):
        return posixpath.join(folder.rstrip("/"), *names)
    return str(Path(folder, *names))


def list_files(pattern: str) -> list[tuple[str, int]]:
    """(path, size) of every file matching a glob such as ``gs://bucket/run/export/patches*``, sorted."""
    try:
        result = FileSystems.match([pattern])[0]
    except Exception as exc:  # Beam wraps every scheme's error in BeamIOError
        raise _storage_error(f"cannot list {pattern}", exc) from None
    return sorted((m.path, m.size_in_bytes) for m in result.metadata_list)


def copy_file(source: str, destination: str) -> int:
    """Stream one file from ``source`` to ``destination`` (any schemes); returns the bytes copied.

    The destination appears whole or not at all: local files are written under a temporary name and
    renamed; object stores publish an object only when its upload completes.
    """
    local_target = None if is_remote(destination) else Path(destination)
    target = str(local_target.with_name(f".{local_target.name}.partial")) if local_target else destination
    copied = 0
    try:
        with FileSystems.open(source, compression_type=RAW) as reader:
            if local_target:
                local_target.parent.mkdir(parents=True, exist_ok=True)
            with FileSystems.create(target, compression_type=RAW) as writer:
                while chunk := reader.read(CHUNK):
                    writer.write(chunk)
                    copied += len(chunk)
    except Exception as exc:
        if local_target:
            Path(target).unlink(missing_ok=True)
        raise _storage_error(f"cannot copy {source} to {destination}", exc) from None
    if local_target:
        Path(target).replace(local_target)
    return copied


def copy_object(source: str, destination: str) -> int:
    """Copy one object within an object store without its bytes passing through this machine (GCS
    rewrite, S3 CopyObject, through Beam's FileSystems); another pair of schemes streams through
    ``copy_file``. Returns the size of the copy."""
    if not (is_remote(source) and source.split("://", 1)[0] == destination.split("://", 1)[0]):
        return copy_file(source, destination)
    try:
        FileSystems.copy([source], [destination])
        (size,) = (size for _, size in list_files(destination))
    except Exception as exc:
        raise _storage_error(f"cannot copy {source} to {destination}", exc) from None
    return size


def copy_files(sources: Iterable[str], folder: str) -> list[str]:
    """Copy files into ``folder`` keeping their names; returns the new locations."""
    copied = []
    for source in sources:
        destination = join(folder, posixpath.basename(source.rstrip("/")))
        copy_file(source, destination)
        copied.append(destination)
    return copied


def _storage_error(message: str, exc: BaseException) -> Exception:
    """Network and server trouble is worth a retry; a missing file or bad URI is not."""
    text = f"{message}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
    transient_words = ("timed out", "timeout", "connection", "503", "502", "500", "429", "unavailable")
    if any(word in text.lower() for word in transient_words):
        return TransientError(text)
    return InputError(text)


def exists(location: str) -> bool:
    try:
        return FileSystems.exists(location)
    except Exception as exc:
        raise _storage_error(f"cannot check {location}", exc) from None


def read_bytes(location: str) -> bytes:
    try:
        with FileSystems.open(location, compression_type=RAW) as reader:
            return reader.read()
    except Exception as exc:
        raise _storage_error(f"cannot read {location}", exc) from None


def write_bytes(location: str, data: bytes) -> None:
    try:
        with FileSystems.create(location, compression_type=RAW) as writer:
            writer.write(data)
    except Exception as exc:
        raise _storage_error(f"cannot write {location}", exc) from None


def create_exclusive(location: str, data: bytes) -> bool:
    """Create the file ``location`` holding ``data`` unless it exists: True if this call created it.

    Atomic among any number of callers, on any machine: a hard link of a complete temporary file
    locally (so a reader never sees it half-written), an object-store precondition remotely (Cloud
    Storage ``ifGenerationMatch=0``, S3 ``If-None-Match: *``). Beam's FileSystems offer no such create.
    """
    scheme = location.partition("://")[0] if is_remote(location) else "file"
    create = {"file": _create_exclusive_local, "gs": _create_exclusive_gcs, "s3": _create_exclusive_s3}.get(
        scheme
    )
    if create is None:
        raise InputError(f"{location}: exclusive create works on local paths, gs:// and s3:// only")
    try:
        return create(location, data)
    except Exception as exc:
        raise _storage_error(f"cannot create {location}", exc) from None


def _create_exclusive_local(location: str, data: bytes) -> bool:
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    partial.write_bytes(data)
    try:
        os.link(partial, path)
    except FileExistsError:
        return False
    finally:
        partial.unlink()
    return True


def _create_exclusive_gcs(location: str, data: bytes) -> bool:
    from apache_beam.io.gcp.gcsio import GcsIO
    from google.api_core.exceptions import PreconditionFailed

    bucket, _, name = location.removeprefix("gs://").partition("/")
    blob = GcsIO().client.bucket(bucket).blob(name)  # Beam's client: the same credentials
    try:
        blob.upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        return False
    return True


def _create_exclusive_s3(location: str, data: bytes) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = location.removeprefix("s3://").partition("/")
    try:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        # 412: the object exists; 409: a concurrent conditional write to the same key is under way
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def local_copy(location: str | Path, cache: Path | None = None) -> Path:
    """A local path for ``location``: itself if local, else a copy in ``cache`` (reused while its size
    matches). GDAL reads gs:// and s3:// itself; models and shards are read from local copies."""
    if not is_remote(location):
        return Path(location)
    size = dict(list_files(str(location))).get(str(location))
    if size is None:
        raise InputError(f"{location}: not found")
    target = (cache or cache_dir() / "files") / str(location).replace("://", "/")
    if not (target.exists() and target.stat().st_size == size):
        copy_file(str(location), str(target))
    return target


def delete(locations: list[str]) -> None:
    try:
        FileSystems.delete(locations)
    except Exception as exc:
        raise _storage_error(f"cannot delete {locations}", exc) from None


def discard_work_folder(folder: str) -> None:
    """Delete every object under a published step's work ``folder`` (a URI; its subfolders too).
    Best effort: the step is published already, so a failure is a warning naming the folder, not
    a failed run."""
    try:
        found = [path for path, _ in list_files(f"{folder.rstrip('/')}/**")]  # Beam's * stops at /
        if found:
            delete(found)
    except (InputError, TransientError) as exc:
        log.warning("could not delete the work folder %s (the step is published): %s", folder, exc)
