"""Export step from Earth Engine: a composite exported as TFRecord patches to Cloud Storage.

The image: collection → time window → region → cloud mask per scene → bands × scale + offset →
reducer (median by default) → derived bands → float. The export is placed on terrabeam's own grid
(``grid.crs``, ``grid.resolution``, the region padded to whole patches, given to Earth Engine as
``crsTransform`` + ``dimensions``), so Earth Engine drops no border patch and its mixer equals the
grid terrabeam computed; the download checks that it does. Then terrabeam writes its manifest
beside the mixer (true region, margin, bands, records per shard) so deliver crops the padding.
"""

from __future__ import annotations

import calendar
import posixpath
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from terrabeam import storage
from terrabeam.config import EarthEngineSource, PipelineConfig, TimeWindow
from terrabeam.earthengine import EarthEngineError, connect, request_id
from terrabeam.errors import ConfigError, GridMismatchError, InputError
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, find_export, manifest_path
from terrabeam.region import region_geometry
from terrabeam.region import stated_grid as export_grid
from terrabeam.storage import join, list_files
from terrabeam.tfrecord import count_records

# Bits of Landsat Collection 2 QA_PIXEL: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow.
LANDSAT_C2_BITS = 0b11111
# Sentinel-2 scene classification: 0 no data, 1 saturated/defective, 3 cloud shadow,
# 8 cloud medium probability, 9 cloud high probability, 10 thin cirrus.
S2_SCL_MASKED = [0, 1, 3, 8, 9, 10]
# Sentinel-2 QA60: bit 10 opaque clouds, bit 11 cirrus.
S2_QA60_BITS = (1 << 10) | (1 << 11)


def composite_window(
    source: EarthEngineSource, run_window: tuple[str, str] | None, run_date: date
) -> tuple[date, date]:
    """[start, end) of the images that go into the composite.

    ``source.window`` with dates is used as given; ``months_before``/``days_before`` count back from
    the run date (the end of the run's window, else the day the run was created); without
    ``source.window`` the run's own window is used.
    """
    window = source.window
    if window is None:
        if run_window is None:
            raise ConfigError(
                "source.window: not set and the run has no window; give source.window (dates or "
                "months_before) or run with --window START/END"
            )
        return _as_date(run_window[0]), _as_date(run_window[1])
    return _resolve(window, run_date)


def _resolve(window: TimeWindow, run_date: date) -> tuple[date, date]:
    if window.start is not None and window.end is not None:
        return window.start, window.end
    if window.days_before is not None:
        return run_date - timedelta(days=window.days_before), run_date
    months = window.months_before or 0
    year, month = divmod(run_date.year * 12 + run_date.month - 1 - months, 12)
    day = min(run_date.day, calendar.monthrange(year, month + 1)[1])
    return date(year, month + 1, day), run_date


def _as_date(text: str) -> date:
    return datetime.fromisoformat(text).date() if "T" in text else date.fromisoformat(text[:10])


def run_composite_window(
    source: EarthEngineSource, run_window: tuple[str, str] | None, created: float | None
) -> tuple[date, date]:
    """[start, end) of the images in a run's composite: ``composite_window`` on the run's date."""
    return composite_window(source, run_window, run_date(run_window, created))


def run_date(run_window: tuple[str, str] | None, created: float | None) -> date:
    """The date a run stands for: the end of its window, else the day it was created (UTC)."""
    if run_window is not None:
        return _as_date(run_window[1])
    return datetime.fromtimestamp(created or datetime.now(UTC).timestamp(), UTC).date()


def build_image(ee: Any, config: PipelineConfig, start: date, end: date) -> Any:
    """The ee.Image to export: every configured band as float, masked pixels left masked."""
    source: EarthEngineSource = config.source  # type: ignore[assignment]
    names = list(source.bands)
    originals = [b.band for b in source.bands.values()]
    scales = [b.scale for b in source.bands.values()]
    offsets = [b.offset for b in source.bands.values()]
    mask = _cloud_mask(ee, source.cloud_mask)

    def prepare(image: Any) -> Any:
        image = ee.Image(image)
        if mask is not None:
            image = image.updateMask(mask(image))
        return image.select(originals, names).multiply(scales).add(offsets).toFloat()

    if source.collection is not None:
        collection = ee.ImageCollection(source.collection).filterDate(start.isoformat(), end.isoformat())
        geometry = region_geometry(config)
        if geometry is not None:
            collection = collection.filterBounds(ee.Geometry(geometry))
        else:
            x0, y0, x1, y1 = config.grid.region.bbox
            collection = collection.filterBounds(
                ee.Geometry.Rectangle([x0, y0, x1, y1], proj=config.grid.crs, geodesic=False)
            )
        collection = collection.map(prepare)
        image = getattr(collection, source.reducer)()
    else:
        image = prepare(ee.Image(source.image))
    for name, expression in source.derived.items():
        known = {band: image.select(band) for band in names}
        image = image.addBands(image.expression(expression, known).rename(name).toFloat())
        names.append(name)
    return image.select(names).toFloat()


def _cloud_mask(ee: Any, preset: str):
    """A function image → mask (1 = keep) for the preset, or None."""
    if preset == "landsat_c2":
        return lambda image: image.select("QA_PIXEL").bitwiseAnd(LANDSAT_C2_BITS).eq(0)
    if preset == "s2_scl":
        return lambda image: image.select("SCL").remap(S2_SCL_MASKED, [0] * len(S2_SCL_MASKED), 1)
    if preset == "s2_qa60":
        return lambda image: image.select("QA60").bitwiseAnd(S2_QA60_BITS).eq(0)
    return None


def export_folder(config: PipelineConfig, run_id: str) -> str:
    """``gs://…/<pipeline>/<run>/export``: where Earth Engine writes this run's patches."""
    return join(config.earthengine.staging, config.name, run_id, "export")


def start_export(
    config: PipelineConfig,
    run_id: str,
    run_window: tuple[str, str] | None,
    created: float | None,
    after: str | None = None,
) -> str:
    """Start the Earth Engine export task; returns its operation name (``projects/P/operations/ID``).

    The request id is derived from the run and the configuration, so a repeated start (a retry, a
    resumed run) finds the task already started instead of starting a second one; ``after`` (a failed
    earlier task) makes the id new.
    """
    ee = connect(config.earthengine)
    grid, _ = export_grid(config)
    start, end = composite_window(config.source, run_window, run_date(run_window, created))
    image = build_image(ee, config, start, end)
    bucket, _, path = export_folder(config, run_id).removeprefix("gs://").partition("/")
    t = grid.transform
    task = ee.batch.Export.image.toCloudStorage(
        image=image,
        description=f"terrabeam {config.name} {run_id}"[:100],
        bucket=bucket,
        fileNamePrefix=posixpath.join(path, config.export.prefix),
        fileFormat="TFRecord",
        crs=grid.crs,
        crsTransform=[t.a, t.b, t.c, t.d, t.e, t.f],
        dimensions=f"{grid.width}x{grid.height}",
        maxPixels=int(config.source.max_pixels),
        formatOptions={
            "patchDimensions": [grid.patch_width, grid.patch_height],
            "kernelSize": list(config.grid.kernel_size),
            "maxFileSize": config.export.max_file_size,
            "compressed": config.export.compression_level > 0,
            "defaultValue": config.source.fill_value,
        },
    )
    task._request_id = request_id(config.name, run_id, "export", config.fingerprint(), after or "")
    try:
        task.start()
    except ee.EEException as exc:
        raise EarthEngineError(f"Earth Engine refused the export of run {run_id}: {exc}") from None
    return task.name


def download_export(config: PipelineConfig, run_id: str, out_dir: Path) -> tuple[Grid, ExportManifest]:
    """Copy the finished export from Cloud Storage into ``out_dir``, check its mixer against the grid,
    and write terrabeam's manifest beside it."""
    folder, wanted = _export_files(config, run_id)
    for path in wanted:
        storage.copy_file(path, str(out_dir / posixpath.basename(path)))
    files = find_export(out_dir, config.export.prefix)
    exported = _check_mixer(config, folder, files.mixer)
    manifest = _write_manifest(config, out_dir, files.prefix, [count_records(s) for s in files.shards])
    return exported, manifest


def reference_export(
    config: PipelineConfig, run_id: str, out_dir: Path, count: Callable[[dict[str, int]], list[int]]
) -> tuple[Grid, ExportManifest, dict[str, str]]:
    """The finished export's metadata into ``out_dir`` (its mixer, checked, and terrabeam's
    manifest) while its shards stay on Cloud Storage: returns (grid, manifest, {shard name: URI}).
    ``count`` gives the records of each shard ({URI: size} in export order)."""
    folder, wanted = _export_files(config, run_id)
    for path in wanted:
        if path.endswith(".json"):
            storage.copy_file(path, str(out_dir / posixpath.basename(path)))
    names = [posixpath.basename(path) for path in wanted]
    files = find_export(out_dir, config.export.prefix, names=names)
    exported = _check_mixer(config, folder, files.mixer)
    shards = {shard.name: join(folder, shard.name) for shard in files.shards}
    counts = count({uri: wanted[uri] for uri in shards.values()})
    manifest = _write_manifest(config, out_dir, files.prefix, counts)
    return exported, manifest, shards


def _export_files(config: PipelineConfig, run_id: str) -> tuple[str, dict[str, int]]:
    """(the export folder, its shard and JSON files with their sizes) of a finished export."""
    prefix = config.export.prefix
    folder = export_folder(config, run_id)
    found = list_files(join(folder, f"{prefix}*"))
    wanted = {p: size for p, size in found if p.endswith((".tfrecord", ".tfrecord.gz", ".json"))}
    if not any(p.endswith(".json") for p in wanted):
        raise InputError(f"{folder}: the Earth Engine export has no mixer ({prefix}*.json)")
    return folder, wanted


def _check_mixer(config: PipelineConfig, folder: str, mixer: Path) -> Grid:
    """The exported grid, after checking it is terrabeam's grid for the config."""
    grid, _ = export_grid(config)
    exported = Grid.read_mixer(mixer)
    if (exported.patches_per_row, exported.total_patches, exported.patch_width, exported.patch_height) != (
        grid.patches_per_row,
        grid.total_patches,
        grid.patch_width,
        grid.patch_height,
    ):
        raise GridMismatchError(
            f"{join(folder, mixer.name)}: Earth Engine exported {exported.total_patches} "
            f"patches of {exported.patch_width}×{exported.patch_height}, {exported.patches_per_row} per "
            f"row; terrabeam's grid has {grid.total_patches} of {grid.patch_width}×{grid.patch_height}, "
            f"{grid.patches_per_row} per row"
        )
    return exported


def _write_manifest(config: PipelineConfig, out_dir: Path, prefix: str, counts: list[int]) -> ExportManifest:
    _, region = export_grid(config)
    manifest = ExportManifest(
        kernel_size=list(config.grid.kernel_size),
        region_width=region.width,
        region_height=region.height,
        bands=config.source.band_names,
        shard_records=counts,
    )
    manifest.write(manifest_path(out_dir, prefix))
    return manifest
