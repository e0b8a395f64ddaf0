"""Deliver into Earth Engine as COG-backed images: the map's COGs registered in place on Cloud
Storage (``image:importExternal``), no ingestion task, no re-tiling of every pixel.

Earth Engine's rules for a COG-backed asset, checked on every file before anything is uploaded
(``cog_rule_violations``): square tiles of 256–2048 px, every IFD at the start of the file (a valid
COG layout), overviews in powers of two, a codec it reads, and band interleave. GDAL 3.10's COG
driver writes multi-band files pixel-interleaved, so each band is its own single-band COG (Earth
Engine allows one COG per band: one tileset each). One band must not be spread over many COGs, so a
map assembled into one COG per layer is one image per run, and a map left in tiles (above
``outputs.single_file_max_pixels``) is one image per tile, ``<image_name>_r0000c0001`` and so on.

Uploads never replace an object: an object already there is reused only if its MD5 equals the local
file's (a resumed run), else the run fails naming it; the manifest pins each object's generation
(``gs://bucket/object#generation``), so a registered asset never reads other bytes than it was
registered with. Nothing here was run against Google: see README, "Earth Engine".
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil

from terrabeam.config import PipelineConfig
from terrabeam.earthengine import EarthEngineError, connect
from terrabeam.sinks.earthengine import asset_exists, ensure_collection, image_properties, pyramiding_policy
from terrabeam.sinks.mosaic import TILES_FOLDER
from terrabeam.sinks.tiles import MapLayer, cog_options
from terrabeam.sinks.vrt import layer_vrt, write_vrt_file
from terrabeam.storage import join

log = logging.getLogger(__name__)

TILE_SIZES = (256, 2048)  # Earth Engine reads COG tiles of this side, inclusive
CODECS = {"ZSTD", "DEFLATE", "LZW", "NONE"}
BUCKET_LOCATIONS = {"US", "US-CENTRAL1", "NAM4"}  # us multi-region, us-central1, a dual-region with it


@dataclass(frozen=True)
class BandFile:
    """One band of one image: its id in Earth Engine and the single-band COG that backs it."""

    band: str
    path: Path
    pyramiding: str
    nodata: float | None


@dataclass(frozen=True)
class ImagePlan:
    """One Earth Engine image: a suffix to the asset name ('' or '_r0000c0001') and its bands."""

    suffix: str
    bands: list[BandFile]


def cog_rule_violations(path: Path) -> list[str]:
    """What keeps ``path`` from backing an Earth Engine asset (empty: nothing)."""
    from rio_cogeo.cogeo import cog_validate

    problems = []
    valid, errors, _ = cog_validate(str(path), quiet=True)
    if not valid:
        problems.append(f"not a valid COG layout ({'; '.join(errors)})")
    with rasterio.open(path) as ds:
        blocks = {tuple(ds.block_shapes[i]) for i in range(ds.count)}
        codec = (ds.compression.name if ds.compression else "none").upper()
        if not ds.profile.get("tiled"):
            problems.append("not tiled")
        for height, width in blocks:
            if height != width or not TILE_SIZES[0] <= width <= TILE_SIZES[1]:
                problems.append(f"tiles of {width}×{height} px (square, {TILE_SIZES[0]}–{TILE_SIZES[1]})")
        factors = ds.overviews(1)
        if any(f != 2 ** (i + 1) for i, f in enumerate(factors)):
            problems.append(f"overviews {factors} are not successive powers of 2")
        if codec not in CODECS:
            problems.append(f"compression {codec} (Earth Engine reads {', '.join(sorted(CODECS))})")
        if ds.count > 1 and (ds.interleaving is None or ds.interleaving.name != "BAND"):
            problems.append(f"{ds.count} bands pixel-interleaved (band interleave needed)")
    return [f"{path.name}: {p}" for p in problems]


def _single_band_cog(source: Path, band: int, target: Path, layer: MapLayer, compression: tuple) -> Path:
    """Band ``band`` of ``source`` as its own COG, with the source's tags (through a one-band VRT,
    the layer's georeferencing, description and nodata: no pixels held in memory)."""
    with rasterio.open(source) as ds:
        width, height, crs, transform, tags = ds.width, ds.height, ds.crs, ds.transform, ds.tags()
    one_band = replace(layer, bands=[layer.bands[band - 1]], descriptions=[layer.descriptions[band - 1]])

    def add_source(element: ET.Element, _: int) -> None:
        simple = ET.SubElement(element, "SimpleSource")
        ET.SubElement(simple, "SourceFilename", relativeToVRT="0").text = str(source.resolve())
        ET.SubElement(simple, "SourceBand").text = str(band)

    vrt = write_vrt_file(
        layer_vrt(width, height, crs, transform, one_band, add_source, tags=tags), target.with_suffix(".vrt")
    )
    rasterio.shutil.copy(vrt, target, driver="COG", **cog_options(one_band, *compression))
    vrt.unlink()
    return target


def image_files(
    stem: str, deliver: Path, layers: list[MapLayer], tile_names: list[str]
) -> list[tuple[str, dict[str, Path]]]:
    """(asset name suffix, layer stem → file) of each image to register: one from the
    one-COG-per-layer files, else one per tile."""
    if all((deliver / f"{stem}-{layer.stem}.tif").exists() for layer in layers):
        return [("", {layer.stem: deliver / f"{stem}-{layer.stem}.tif" for layer in layers})]
    tiles = deliver / TILES_FOLDER
    return [
        (f"_{n}", {layer.stem: tiles / f"{stem}-{layer.stem}-{n}.tif" for layer in layers})
        for n in tile_names
    ]


def image_bands(
    config: PipelineConfig, layers: list[MapLayer], suffix: str, files: dict[str, Path], scratch: Path
) -> ImagePlan:
    """The image with one single-band COG per band: a one-band layer's own file, else made in
    ``scratch`` from its layer's file."""
    compression = (config.outputs.compression, config.outputs.compression_level)
    bands = []
    for layer in layers:
        for index, band in enumerate(layer.bands, start=1):
            backing = files[layer.stem]
            if len(layer.bands) > 1:
                target = scratch / f"{config.name}-{band}{suffix}.tif"
                backing = _single_band_cog(backing, index, target, layer, compression)
            nodata = None if math.isnan(layer.nodata) else layer.nodata  # NaN: no value to name
            bands.append(BandFile(band, backing, pyramiding_policy(band), nodata))
    return ImagePlan(suffix, bands)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def upload_pinned(path: Path, uri: str) -> str:
    """Upload ``path`` to ``uri`` (gs://) unless the same bytes are there; ``uri#generation``."""
    from google.cloud import storage

    bucket_name, _, name = uri.removeprefix("gs://").partition("/")
    bucket = storage.Client().bucket(bucket_name)
    existing = bucket.get_blob(name)
    if existing is not None:
        if existing.md5_hash != _md5(path):
            raise EarthEngineError(
                f"{uri} exists with other bytes; terrabeam never replaces a COG that may back an asset "
                "(delete it, or run with another run id)"
            )
        return f"{uri}#{existing.generation}"
    blob = bucket.blob(name)
    blob.upload_from_filename(str(path), if_generation_match=0)  # fails if another writer got there first
    return f"{uri}#{blob.generation}"


def check_bucket_location(staging: str) -> str | None:
    """Earth Engine reads COG-backed assets from us / us-central1 buckets only: a warning otherwise."""
    from google.cloud import storage

    bucket_name = staging.removeprefix("gs://").split("/", 1)[0]
    try:
        location = (storage.Client().get_bucket(bucket_name).location or "").upper()
    except Exception as exc:  # a missing permission to read bucket metadata need not stop the run
        log.warning("cannot read the location of bucket %s (%s); Earth Engine needs US or us-central1",
                    bucket_name, type(exc).__name__)  # fmt: skip
        return None
    if location not in BUCKET_LOCATIONS:
        log.warning(
            "bucket %s is in %s: Earth Engine registers COG-backed assets only from the US multi-region, "
            "us-central1 or a US dual-region with it", bucket_name, location,
        )  # fmt: skip
    return location


def external_manifest(
    config: PipelineConfig, asset: str, uris: dict[str, str], image: ImagePlan, run_id: str,
    start: datetime, end: datetime,
) -> dict[str, Any]:  # fmt: skip
    """The ImageManifest of one COG-backed image: one tileset per band, its object pinned."""
    bands = []
    for band in image.bands:
        entry: dict[str, Any] = {
            "id": band.band,
            "tilesetId": band.band,
            "tilesetBandIndex": 0,
            "pyramidingPolicy": band.pyramiding,
        }
        if band.nodata is not None:
            entry["missingData"] = {"values": [band.nodata]}
        bands.append(entry)
    return {
        "name": asset,
        "tilesets": [{"id": b.band, "sources": [{"uris": [uris[b.band]]}]} for b in image.bands],
        "bands": bands,
        "startTime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endTime": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "properties": image_properties(config, run_id),
    }


def register_cogs(
    config: PipelineConfig,
    deliver: Path,
    layers: list[MapLayer],
    tile_names: list[str],
    base_asset: str,
    run_id: str,
    start: datetime,
    end: datetime,
) -> list[str]:
    """Check, upload and register the map's COGs; returns the asset names (existing ones are kept)."""
    ee = connect(config.earthengine)
    folder = join(config.earthengine.staging, config.name, run_id, "cog")
    check_bucket_location(config.earthengine.staging)
    scratch = Path(tempfile.mkdtemp(prefix=".earthengine-", dir=deliver.parent))
    try:
        ensure_collection(ee, config.outputs.earthengine.collection)
        assets = []
        for suffix, files in image_files(config.name, deliver, layers, tile_names):
            asset = base_asset + suffix
            assets.append(asset)
            if asset_exists(ee, asset):  # registered by an earlier attempt: nothing to make or upload
                continue
            image = image_bands(config, layers, suffix, files, scratch)
            problems = [p for b in image.bands for p in cog_rule_violations(b.path)]
            if problems:  # checked before any of its files is uploaded
                raise EarthEngineError("not fit to back an Earth Engine asset: " + "; ".join(problems[:5]))
            uris = {b.band: upload_pinned(b.path, join(folder, f"{config.name}-{b.band}{image.suffix}.tif"))
                    for b in image.bands}  # fmt: skip
            manifest = external_manifest(config, asset, uris, image, run_id, start, end)
            try:
                ee.data.startExternalImageIngestion(manifest, False)
            except ee.EEException as exc:
                raise EarthEngineError(f"Earth Engine refused to register {asset}: {exc}") from None
        return assets
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
