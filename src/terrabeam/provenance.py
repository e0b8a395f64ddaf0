"""How a map was made, said the same way everywhere it is recorded: the map COGs' ``TERRABEAM_*``
tags, the STAC Items and the Earth Engine assets' properties."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from terrabeam import __version__
from terrabeam.config import PipelineConfig


def model_fingerprint(config: PipelineConfig) -> str:
    """A short hash of the model file (of every file, for a model folder)."""
    return _file_digest(config.locate(config.model.path))[:12]


def _file_digest(location: str) -> str:
    from terrabeam.storage import local_copy

    path = local_copy(location)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.exists():
            with file.open("rb") as stream:
                for chunk in iter(lambda: stream.read(2**20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def window_range(window: tuple[str, str] | None) -> tuple[datetime, datetime] | None:
    """A run's window [start, end) as aware datetimes (a date is its midnight, UTC)."""
    if window is None:
        return None
    start, end = (datetime.fromisoformat(w) for w in window)
    return tuple(d if d.tzinfo else d.replace(tzinfo=UTC) for d in (start, end))  # type: ignore[return-value]


@dataclass(frozen=True)
class Provenance:
    """Pipeline, run and window of a map, and the model and config that made it."""

    pipeline: str
    run_id: str
    config_hash: str
    model: str
    model_version: str
    framework: str
    window: tuple[str, str] | None = None

    @classmethod
    def of(cls, config: PipelineConfig, run_id: str, window: tuple[str, str] | None = None) -> Provenance:
        model = config.model
        return cls(
            pipeline=config.name,
            run_id=run_id,
            config_hash=config.fingerprint(),
            model=model.name or Path(model.path).name,
            model_version=model.version or model_fingerprint(config),
            framework=model.framework,
            window=window,
        )

    def tags(self) -> dict[str, str]:
        """GDAL metadata items of the map files (QGIS shows them under Information)."""
        tags = {
            "TERRABEAM_VERSION": __version__,
            "TERRABEAM_PIPELINE": self.pipeline,
            "TERRABEAM_RUN": self.run_id,
            "TERRABEAM_CONFIG_HASH": self.config_hash,
            "TERRABEAM_MODEL": self.model,
            "TERRABEAM_MODEL_VERSION": self.model_version,
            "TERRABEAM_MODEL_FRAMEWORK": self.framework,
        }
        if self.window:
            tags["TERRABEAM_WINDOW"] = "/".join(self.window)
        return tags
