"""Deliver step into Earth Engine by TFRecord ingestion (``outputs.earthengine.mode: tfrecord``):
prediction shards + mixer ingested as one image of a collection (COG-backed images, the default:
``earthengine_cog``).

Earth Engine ingests TFRecord predictions from Cloud Storage: one tileset whose source lists every
prediction shard, in patch order, then the mixer (the ``earthengine upload image`` layout). The
shards are copied to ``<staging>/<pipeline>/<run>/predict/`` first. Class bands get the MODE
pyramiding policy (a coarser pixel is the most common class), probabilities and regression bands
MEAN. The asset name comes from ``outputs.earthengine.image_name``; an asset that already exists is
never replaced, and the ingestion request id is derived from the run, so a repeated start (a retry,
a resumed run) never creates a second task or asset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from terrabeam.config import PipelineConfig
from terrabeam.earthengine import EarthEngineError, connect, request_id
from terrabeam.layout import ExportManifest, list_shards, manifest_path, mixer_path
from terrabeam.provenance import Provenance
from terrabeam.storage import copy_file, join


@dataclass(frozen=True)
class Ingestion:
    """What deliver asked of Earth Engine: the asset, and the task (None if the asset existed)."""

    asset: str
    operation: str | None


def asset_id(config: PipelineConfig, run_id: str, start: datetime, end: datetime, run_date: datetime) -> str:
    """``<collection>/<image_name>`` with {pipeline}, {run}, {date}, {start}, {end} filled in."""
    sink = config.outputs.earthengine
    name = sink.image_name.format(
        pipeline=config.name,
        run=run_id,
        date=run_date.strftime("%Y%m%d"),
        start=start.strftime("%Y%m%d"),
        end=end.strftime("%Y%m%d"),
    )
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    return f"{sink.collection.rstrip('/')}/{name}"


def predictions_folder(config: PipelineConfig, run_id: str) -> str:
    return join(config.earthengine.staging, config.name, run_id, "predict")


def pyramiding_policy(band: str) -> str:
    return "MODE" if band == "class" else "MEAN"


def image_manifest(
    config: PipelineConfig,
    asset: str,
    uris: list[str],
    bands: list[str],
    run_id: str,
    start: datetime,
    end: datetime,
) -> dict[str, Any]:
    """The ImageManifest of one prediction image (field names of the Earth Engine REST API)."""
    properties = image_properties(config, run_id)
    return {
        "name": asset,
        "tilesets": [{"id": "predictions", "sources": [{"uris": uris}]}],
        "bands": [
            {
                "id": band,
                "tilesetId": "predictions",
                "tilesetBandIndex": i,
                "pyramidingPolicy": pyramiding_policy(band),
            }
            for i, band in enumerate(bands)
        ],
        "startTime": _timestamp(start),
        "endTime": _timestamp(end),
        "properties": properties,
    }


def image_properties(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    """The asset's properties: provenance, then the config's own."""
    made = Provenance.of(config, run_id)
    properties: dict[str, Any] = {
        "pipeline": made.pipeline,
        "model": made.model,
        "model_version": made.model_version,
        "run_id": made.run_id,
        "config_hash": made.config_hash,
    }
    return properties | config.outputs.earthengine.properties


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def asset_exists(ee: Any, asset: str) -> bool:
    try:
        ee.data.getAsset(asset)
    except ee.EEException as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return False
        raise EarthEngineError(f"Earth Engine: cannot look up asset {asset}: {exc}") from None
    return True


def ensure_collection(ee: Any, collection: str) -> None:
    """Create the image collection if it does not exist yet."""
    if asset_exists(ee, collection):
        return
    try:
        ee.data.createAsset({"type": "IMAGE_COLLECTION"}, collection)
    except ee.EEException as exc:
        raise EarthEngineError(
            f"outputs.earthengine.collection: cannot create {collection} ({exc}); "
            "check the project and that the account may write assets there"
        ) from None


def start_ingestion(
    config: PipelineConfig,
    predict_dir: Path,
    run_id: str,
    start: datetime,
    end: datetime,
    run_date: datetime,
    after: str | None = None,
) -> Ingestion:
    """Stage the prediction shards on Cloud Storage and start their ingestion (unless the asset exists)."""
    ee = connect(config.earthengine)
    asset = asset_id(config, run_id, start, end, run_date)
    if asset_exists(ee, asset):
        return Ingestion(asset, None)
    ensure_collection(ee, config.outputs.earthengine.collection)
    prefix = config.predict.prefix
    folder = predictions_folder(config, run_id)
    local = [*list_shards(predict_dir, prefix), mixer_path(predict_dir, prefix)]
    uris = []
    for path in local:  # the mixer last: Earth Engine reads it as the georeferencing of the shards
        uri = join(folder, path.name)
        copy_file(str(path), uri)
        uris.append(uri)
    bands = ExportManifest.read(manifest_path(predict_dir, prefix)).bands
    manifest = image_manifest(config, asset, uris, bands, run_id, start, end)
    try:
        result = ee.data.startIngestion(
            request_id(config.name, run_id, "ingest", config.fingerprint(), after or ""), manifest, False
        )
    except ee.EEException as exc:
        raise EarthEngineError(f"Earth Engine refused the ingestion of {asset}: {exc}") from None
    return Ingestion(asset, result["name"])
