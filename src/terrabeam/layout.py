"""Earth Engine's export file layout: numbered shards, the mixer, and terrabeam's export manifest.

An export directory holds ``<prefix>-00000.tfrecord.gz`` … and ``<prefix>-mixer.json`` exactly as
Earth Engine writes them. terrabeam adds ``<prefix>-manifest.json`` with what the mixer does not
record (kernel margin, true region size, band names); an Earth Engine export without it is read
with those values from the configuration.
"""

from __future__ import annotations

import json
import re
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


def list_shards(directory: str | Path, prefix: str) -> list[Path]:
    """The shards of ``prefix`` in patch order: ``<prefix>-NNNNN.tfrecord[.gz]`` or one ``<prefix>.tfrecord[.gz]``."""
    directory = Path(directory)
    pattern = re.compile(rf"^{re.escape(prefix)}(-(\d+))?\.tfrecord(\.gz)?$")
    found = []
    for path in directory.iterdir() if directory.is_dir() else []:
        match = pattern.match(path.name)
        if match:
            found.append((int(match.group(2) or 0), path))
    if not found:
        raise InputError(f"{directory}: no TFRecord shards named {prefix}-NNNNN.tfrecord.gz")
    return [path for _, path in sorted(found)]


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
