"""Earth Engine's export file layout: numbered shards, the mixer, and terrabeam's export manifest.

An export directory holds ``<prefix>-00000.tfrecord.gz`` … and ``<prefix>-mixer.json`` exactly as
Earth Engine writes them. terrabeam adds ``<prefix>-manifest.json`` with what the mixer does not
record (kernel margin, true region size, band names); an Earth Engine export without it is read
with those values from the configuration. :func:`find_export` locates the files of an export
however Earth Engine named them (one shard ``<prefix>.tfrecord.gz``, ``<prefix>mixer.json``,
``<prefix>.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from terrabeam.errors import InputError
from terrabeam.tfrecord import RecordWriter


def shard_name(prefix: str, number: int, compressed: bool = True) -> str:
    return f"{prefix}-{number:05d}.tfrecord" + (".gz" if compressed else "")


def mixer_path(directory: str | Path, prefix: str) -> Path:
    return Path(directory) / f"{prefix}-mixer.json"


def manifest_path(directory: str | Path, prefix: str) -> Path:
    return Path(directory) / f"{prefix}-manifest.json"


# ``<stem>-NNNNN.tfrecord[.gz]`` (five digits, as Earth Engine and shard_name write them) or ``<stem>.tfrecord[.gz]``
_SHARD = re.compile(r"^(?P<stem>.+?)(?:-(?P<number>\d{5}))?\.tfrecord(?:\.gz)?$")
MIXER_FIELDS = ("projection", "patchDimensions", "patchesPerRow", "totalPatches")


def parse_shard_name(name: str) -> tuple[str, int | None] | None:
    """(prefix, shard number or None if unnumbered) of a shard's file name; None if it is no shard."""
    match = _SHARD.match(name)
    if match is None:
        return None
    number = match.group("number")
    return match.group("stem"), None if number is None else int(number)


def _shard_files(
    directory: Path, names: Sequence[str] | None = None
) -> dict[str, list[tuple[int | None, Path]]]:
    """The TFRecord files of ``directory`` by stem, each with its shard number (None: unnumbered).
    ``names``: the folder's file names as listed elsewhere (a remote folder whose shards are not
    here; its paths then name files that need not exist locally)."""
    groups: dict[str, list[tuple[int | None, Path]]] = {}
    if names is not None:
        paths = [directory / name for name in sorted(names)]
    else:
        paths = [p for p in sorted(directory.iterdir()) if p.is_file()] if directory.is_dir() else []
    for path in paths:
        parsed = parse_shard_name(path.name)
        if parsed:
            groups.setdefault(parsed[0], []).append((parsed[1], path))
    return groups


def export_prefixes(directory: str | Path) -> list[str]:
    """The prefixes of the TFRecord shard sets in ``directory``, sorted."""
    return sorted(_shard_files(Path(directory)))


def list_shards(directory: str | Path, prefix: str, names: Sequence[str] | None = None) -> list[Path]:
    """The shards of ``prefix`` in patch order: ``<prefix>-NNNNN.tfrecord[.gz]`` or one ``<prefix>.tfrecord[.gz]``."""
    directory = Path(directory)
    found = _shard_files(directory, names).get(prefix)
    if not found:
        raise InputError(
            f"{directory}: no TFRecord shards named {prefix}-NNNNN.tfrecord.gz or {prefix}.tfrecord.gz"
        )
    numbers = [number for number, _ in found]
    if len(set(numbers)) != len(numbers) or (None in numbers and len(numbers) > 1):
        names = ", ".join(path.name for _, path in found)
        raise InputError(f"{directory}: the shards of {prefix} are ambiguous ({names}): one file per shard")
    return [path for _, path in sorted(found, key=lambda item: item[0] or 0)]


@dataclass(frozen=True)
class ExportFiles:
    """Where an export's files are: its prefix, mixer, shards in patch order, terrabeam's manifest."""

    prefix: str
    mixer: Path
    shards: list[Path]
    manifest: Path | None


def find_export(
    directory: str | Path, prefix: str, mixer: Path | None = None, names: Sequence[str] | None = None
) -> ExportFiles:
    """The files of the export in ``directory``: the shards of ``prefix``, else of the only prefix
    that has shards; its mixer ``<prefix>-mixer.json``, ``<prefix>mixer.json``, else the only ``.json``
    with the mixer's fields (``mixer`` given explicitly wins). Anything ambiguous is an error listing
    what was found."""
    directory = Path(directory)
    groups = _shard_files(directory, names)
    if prefix in groups:
        stem = prefix
    elif len(groups) == 1:
        (stem,) = groups
    elif groups:
        found = "; ".join(f"{name}: {len(files)} file(s)" for name, files in sorted(groups.items()))
        raise InputError(
            f"{directory}: the shards of several exports ({found}), none named {prefix}; set export.prefix "
            "to the one to read"
        )
    else:
        raise InputError(
            f"{directory}: no TFRecord shards (<prefix>-NNNNN.tfrecord[.gz] or <prefix>.tfrecord[.gz])"
        )
    manifest = manifest_path(directory, stem)
    return ExportFiles(
        stem,
        mixer or find_mixer(directory, stem),
        list_shards(directory, stem, names),
        manifest if manifest.is_file() else None,
    )


def find_mixer(directory: str | Path, prefix: str) -> Path:
    """The mixer of ``prefix`` in ``directory`` (see :func:`find_export`); InputError if none or several."""
    directory = Path(directory)
    for name in (f"{prefix}-mixer.json", f"{prefix}mixer.json"):
        if (directory / name).is_file():
            return directory / name
    if _has_mixer_fields(directory / f"{prefix}.json"):  # a single-file export's <prefix>.json
        return directory / f"{prefix}.json"
    candidates = [path for path in sorted(directory.glob("*.json")) if _has_mixer_fields(path)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(path.name for path in candidates)
        raise InputError(
            f"{directory}: {len(candidates)} files could be the mixer of {prefix} ({names}); set export.mixer"
        )
    raise InputError(
        f"{directory}: no mixer for {prefix}: neither {prefix}-mixer.json nor {prefix}mixer.json, and no "
        f".json with the mixer's fields ({', '.join(MIXER_FIELDS)}); set export.mixer"
    )


def _has_mixer_fields(path: Path) -> bool:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and all(name in document for name in MIXER_FIELDS)


@dataclass
class ExportManifest:
    """What an export knows beyond the mixer: margin, true region, bands and per-shard counts."""

    kernel_size: list[int]
    region_width: int
    region_height: int
    bands: list[str]
    shard_records: list[int] = field(default_factory=list)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> ExportManifest:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (TypeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a terrabeam export manifest ({exc})") from None


class ShardedWriter:
    """Write records into numbered shards, starting a new shard before one would pass ``max_file_size``.

    The limit is checked against uncompressed bytes, an upper bound of the file size, so no shard
    exceeds it (unless a single record does).
    """

    def __init__(self, directory: Path, prefix: str, max_file_size: int, compression_level: int = 1) -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_file_size = max_file_size
        self.compression_level = compression_level
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self._writer: RecordWriter | None = None

    def write(self, payload: bytes) -> None:
        frame_size = len(payload) + 16
        writer = self._writer
        if writer is None or (writer.records and writer.uncompressed_bytes + frame_size > self.max_file_size):
            writer = self._next_shard()
        writer.write(payload)
        self.counts[-1] += 1

    def _next_shard(self) -> RecordWriter:
        if self._writer is not None:
            self._writer.close()
        name = shard_name(self.prefix, len(self.paths), self.compression_level > 0)
        self._writer = RecordWriter(self.directory / name, self.compression_level)
        self.paths.append(self._writer.path)
        self.counts.append(0)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
