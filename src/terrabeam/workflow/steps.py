"""The steps of a run and its JSON summary: a raster-sourced run is one step (map: rasters → model
→ map tiles in one Beam pipeline); otherwise export → predict → deliver with Earth Engine-layout
files between them.

Each step reads the previous step's published folder in the run workspace and publishes its own
folder whole, so any step can be re-run alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import apache_beam as beam
import rasterio
from rasterio.crs import CRS

from terrabeam import storage
from terrabeam.config import PipelineConfig, derived_needed
from terrabeam.errors import ConfigError, GridMismatchError, NoDataError, TerrabeamError
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, list_shards, manifest_path, mixer_path
from terrabeam.predict.io import DecodeRecord, ReadKeyedRecords
from terrabeam.predict.models import probe_model
from terrabeam.predict.pipeline import (
    PredictPatches,
    RemoteIO,
    model_placement,
    pipeline_flags,
    prediction_bands,
    read_export,
    run_predict,
)
from terrabeam.process_memory import empty_gdal_cache, release_free_memory
from terrabeam.progress import published_progress
from terrabeam.region import stated_grid
from terrabeam.sources.earthengine_pixels import (
    pixels_reader,
    request_spans,
    uses_compute_pixels,
    worker_processes,
)
from terrabeam.sources.raster import (
    ReadRasterPatches,
    check_overlap,
    export_grid,
    export_patches,
    export_rasters,
    open_band,
)
from terrabeam.tiling import Tiling
from terrabeam.workflow.maps import write_map
from terrabeam.workspace import Workspace, disk_full_as_error

GDAL_CACHE_BYTES = 64 * 2**20


@dataclass
class StepReport:
    name: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@contextmanager
def gdal_env() -> Iterator[None]:
    """GDAL settings for a step: a small fixed block cache, emptied when the step ends (and the
    memory glibc kept handed back; Python's cycles are collected by whoever runs a next step: the
    runner between steps, the step server after each request).

    GDAL's default cache is 5 % of RAM and fills as a large scene streams through, so memory would
    grow with the scene; strip-by-strip reading needs only a strip's blocks. An explicit
    GDAL_CACHEMAX in the environment wins.
    """
    # rasterio hands GDAL_CACHEMAX to GDALSetCacheMax64: the value is in bytes, not megabytes.
    options = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_BYTES}
    with rasterio.Env(**options):
        yield
    empty_gdal_cache()
    release_free_memory(collect=False)


def export_step(config: PipelineConfig, workspace: Workspace) -> StepReport:
    """The export's Earth Engine-layout files written here: from the rasters, or from an Earth
    Engine source's computePixels answers (an export task is EarthEngineExportTask)."""
    start = time.perf_counter()
    with workspace.staging("export") as staging, gdal_env():
        if config.source.kind == "earthengine":
            grid, region = stated_grid(config)  # read here: this process's share is all of it
            reader = pixels_reader(config, grid, composite_dates(config, workspace), ())()
            result = export_patches(config, staging, grid, region, reader)
        else:
            result = export_rasters(config, staging)
    return StepReport(
        "export",
        time.perf_counter() - start,
        {
            "patches": result.grid.total_patches,
            "shards": len(result.shards),
            "bands": result.manifest.bands,
            "region_pixels": [result.manifest.region_width, result.manifest.region_height],
        },
    )


def composite_dates(config: PipelineConfig, workspace: Workspace) -> tuple[date, date]:
    """[start, end) of the images in an Earth Engine source's composite for this run."""
    from terrabeam.sources.earthengine import run_composite_window

    return run_composite_window(config.source, workspace.window, workspace.created)  # type: ignore[arg-type]


def predict_step(
    config: PipelineConfig, workspace: Workspace, beam_args: Sequence[str] = (), probe: bool = True
) -> StepReport:
    start = time.perf_counter()
    remote = remote_io(config, workspace)
    # remote workers read the export where it is: only its metadata comes here
    export_dir, export_names = (
        workspace.step_metadata("export") if remote else (workspace.require_step("export"), None)
    )
    work = workspace.work_dir("predict")  # kept if interrupted: finished shards are not redone
    with disk_full_as_error(work):
        if not _match_work_to(work, export_dir, config) and remote is not None:
            stale = [path for path, _ in storage.list_files(f"{remote.work}/*")]
            if stale:  # made from another export or config: not this run's finished shards
                storage.delete(stale)
        with _shard_progress(config, export_dir, work, remote.work if remote else None):
            result = run_predict(
                config, export_dir, work, beam_args, probe=probe, remote=remote, export_names=export_names
            )
        if result.remote_shards:  # published by copies inside the object store: no bytes through here
            workspace.publish_remote("predict", result.remote_shards, work)
            shutil.rmtree(work, ignore_errors=True)
            storage.discard_work_folder(remote.work)  # the workers' shards, copied into the step
        else:
            workspace.publish(work, "predict")
    seconds = time.perf_counter() - start
    grid = result.grid
    pixels = result.records * grid.patch_width * grid.patch_height
    return StepReport(
        "predict",
        seconds,
        {
            "patches": result.records,
            "shards": len(result.shards),
            "shards_reused": result.reused_shards,
            "patches_skipped": result.patches_skipped,
            "core_pixels": pixels,
            "patches_per_second": round(result.records / seconds, 3),
            "mpx_per_second": round(pixels / seconds / 1e6, 4),
        },
    )


def remote_io(config: PipelineConfig, workspace: Workspace) -> RemoteIO | None:
    """With a remote workspace and a runner whose workers are elsewhere (dataflow, portable), the
    workers read the export and the model from the workspace URI and write shards there. A local
    model file is copied into ``<workspace>/<run>/model/`` first."""
    if config.runner.kind == "dataflow" and workspace.remote is None:
        raise ConfigError(
            "runner kind 'dataflow': Dataflow workers cannot read this machine's files; set "
            "'workspace:' (or --workspace) to a gs:// folder"
        )
    if workspace.remote is None or config.runner.kind == "local":
        return None
    model = config.locate(config.model.path)
    if not storage.is_remote(model):
        local = Path(model)
        if not local.is_file():
            raise ConfigError(
                f"model.path: {local} is a folder or missing; remote workers need one model file "
                "(.onnx, .keras, .pt2, …) or a gs:// / s3:// URI"
            )
        uri = f"{workspace.remote}/{workspace.run_id}/model/{local.name}"
        if dict(storage.list_files(uri)).get(uri) != local.stat().st_size:
            storage.copy_file(str(local), uri)
        model = uri
    return RemoteIO(
        export=workspace.remote_step("export"),
        work=f"{workspace.remote}/{workspace.run_id}/.predict.work",
        model=model,
        tiles=f"{workspace.remote}/{workspace.run_id}/.deliver.work/tiles",
    )


@contextmanager
def _shard_progress(
    config: PipelineConfig, export_dir: Path, work: Path, remote_work: str | None = None
) -> Iterator[None]:
    """Report predict progress as prediction shards are published (a shard's count comes from the
    export manifest); the runner may be anywhere, the finished files (or objects) are the truth."""
    manifest = manifest_path(export_dir, config.export.prefix)
    counts = ExportManifest.read(manifest).shard_records if manifest.exists() else []
    if not counts:
        yield
        return
    pattern = re.compile(rf"^{re.escape(config.predict.prefix)}-(\d+)\.tfrecord(\.gz)?$")

    def published() -> int:
        if remote_work is not None:
            names = [posixpath.basename(path) for path, _ in storage.list_files(f"{remote_work}/*")]
        else:
            names = [p.name for p in work.iterdir()]
        return sum(
            counts[int(m.group(1))]
            for n in names
            if (m := pattern.match(n)) and int(m.group(1)) < len(counts)
        )

    with published_progress("predict", sum(counts), "patch", published):
        yield


def _match_work_to(work: Path, export_dir: Path, config: PipelineConfig) -> bool:
    """Empty the predict work folder if it was made from another export or config; whether it was
    made from this one (its finished shards, here or remote, may be kept)."""
    digest = hashlib.sha256(config.fingerprint().encode())
    for path in sorted(export_dir.glob("*.json")):
        digest.update(path.read_bytes())
    stamp, source = work / ".source", digest.hexdigest()
    if stamp.exists() and stamp.read_text() == source:
        return True
    for path in work.iterdir():
        path.unlink()
    stamp.write_text(source)
    return False


def map_step(config: PipelineConfig, workspace: Workspace, beam_args: Sequence[str] = ()) -> StepReport:
    """A raster- or STAC-sourced run in one Beam pipeline: the workers read the rasters' (or the
    window's STAC Items') windows, run the model and write map tiles; nothing is materialised
    between (the model was probed before). A STAC window without Items raises NoDataError."""
    kw, kh = config.grid.kernel_size
    open_reader, items = None, None
    reading = config  # what the workers read: derived bands only where the model needs them
    if config.source.kind != "earthengine":
        needed = derived_needed(config.source.derived, config.model.input_bands)
        reading = config.model_copy(update={"source": config.source.model_copy(update={"derived": needed})})
    if config.source.kind == "earthengine":  # fetched by computePixels (one_pipeline)
        grid, region = stated_grid(config)
        dates = composite_dates(config, workspace)
        open_reader = pixels_reader(config, grid, dates, pipeline_flags(config, beam_args))
        inputs = f"computePixels of the composite {dates[0]}/{dates[1]}"
    elif config.source.kind == "stac":
        from terrabeam.sources.stac import StacPatchReader, search_items

        grid, region = stated_grid(config)
        items = search_items(config, workspace.window)
        if not items:
            window = "/".join(workspace.window) if workspace.window else "any time"
            raise NoDataError(f"no STAC Items for the region in window {window}; nothing to predict")
        open_reader = partial(StacPatchReader, reading, grid, (kw, kh), items)
        inputs = "\n".join(f"{item.id} {item.datetime}" for item in items)
    else:
        grid, region = export_grid(config)
        inputs = "\n".join(config.locate(band.path) for band in config.source.bands.values())
    tiling = Tiling.for_grid(grid, region.width, region.height, config.outputs.tile_size)
    remote = remote_io(config, workspace)
    model_path = remote.model if remote else config.locate(config.model.path)
    threads, _ = model_placement(config, beam_args)

    def source(pipeline: beam.Pipeline, tiles: list[int], spread: bool) -> beam.PCollection:
        return (
            pipeline
            | "ReadRasterPatches" >> ReadRasterPatches(reading, grid, tiling, tiles, spread, open_reader)
            | "Predict"
            >> PredictPatches(
                config, model_path, grid, (kw // 2, kh // 2), (region.width, region.height), threads
            )
        )

    with gdal_env(), disk_full_as_error(workspace.run_dir):
        result = write_map(
            config,
            workspace,
            tiling,
            prediction_bands(config),
            source,
            inputs,
            beam_args,
            remote_tiles=remote.tiles if remote else None,
            with_records=config.outputs.tfrecord,
            source_items=items or (),
        )
    details = result.details(workspace.step_location("deliver"))
    if items is not None:
        details["source_items"] = [item.id for item in items]
    return StepReport("map", result.seconds, details)


def deliver_step(config: PipelineConfig, workspace: Workspace, beam_args: Sequence[str] = ()) -> StepReport:
    """Prediction shards → map tiles and mosaic, through the same sink as a one-pipeline run."""
    predict_dir = workspace.require_step("predict")
    prefix = config.predict.prefix
    grid = Grid.read_mixer(mixer_path(predict_dir, prefix))
    manifest = ExportManifest.read(manifest_path(predict_dir, prefix))
    shards = list_shards(predict_dir, prefix)
    tiling = Tiling.for_grid(grid, manifest.region_width, manifest.region_height, config.outputs.tile_size)
    offsets = [sum(manifest.shard_records[:i]) for i in range(len(shards))]
    digest = hashlib.sha256()
    for path in sorted(predict_dir.glob("*.json")):
        digest.update(path.read_bytes())

    def source(pipeline: beam.Pipeline, tiles: list[int], spread: bool) -> beam.PCollection:
        wanted = set(tiles)
        return (
            pipeline
            | "Shards" >> beam.Create(list(enumerate(map(str, shards))), reshuffle=spread)
            | "ReadKeyedRecords" >> beam.ParDo(ReadKeyedRecords(offsets))
            | "OnlyTilesToDo" >> beam.Filter(lambda kv: tiling.tile_of(kv[0].index) in wanted)
            | "DecodeRecord"
            >> beam.ParDo(
                DecodeRecord(list(map(str, shards)), manifest.bands, (grid.patch_height, grid.patch_width))
            )
        )

    with gdal_env(), disk_full_as_error(workspace.run_dir):
        result = write_map(
            config,
            workspace,
            tiling,
            manifest.bands,
            source,
            digest.hexdigest(),
            beam_args,
            group_by_tile=True,
        )
    return StepReport("deliver", result.seconds, result.details(workspace.step_location("deliver")))


def one_pipeline(config: PipelineConfig) -> bool:
    """A raster, STAC or computePixels source with file outputs runs as one pipeline (the map
    step); an Earth Engine export task or sink keeps export → predict → deliver with the
    interchange files between."""
    fetched = config.source.kind in ("raster", "stac") or uses_compute_pixels(config)
    return fetched and config.outputs.earthengine is None


def run_steps(config: PipelineConfig) -> list[str]:
    """The steps a run of ``config`` executes, in order."""
    return ["map"] if one_pipeline(config) else ["export", "predict", "deliver"]


def check_run_grid(config: PipelineConfig, workspace: Workspace, step: str) -> None:
    """Refuse to run ``step`` alone on a run whose grid is not the config's: its patches would be
    decoded or placed wrongly. Compares what the config states (patch size, margin, CRS,
    resolution) with the mixer and manifest of the folder the step reads."""
    if step == "predict":  # the metadata is enough (a remote export's shards stay where they are)
        folder, names = workspace.step_metadata("export")
        grid, manifest, _ = read_export(config, folder, names)
        where, kernel = workspace.step_dir("export"), manifest.kernel_size
    else:
        where, _ = workspace.step_metadata("predict")
        grid, kernel = Grid.read_mixer(mixer_path(where, config.predict.prefix)), None
    wanted = config.grid
    differences = []
    patch = [grid.patch_width, grid.patch_height]
    if patch != list(wanted.patch_size):
        differences.append(f"patch size {patch}, grid.patch_size {list(wanted.patch_size)}")
    if kernel is not None and list(kernel) != list(wanted.kernel_size):
        differences.append(f"kernel size {list(kernel)}, grid.kernel_size {list(wanted.kernel_size)}")
    if wanted.crs is not None and CRS.from_user_input(wanted.crs) != CRS.from_user_input(grid.crs):
        differences.append(f"CRS {grid.crs}, grid.crs {wanted.crs}")
    if wanted.resolution is not None:
        x, y = wanted.resolution if isinstance(wanted.resolution, tuple) else (wanted.resolution,) * 2
        if (abs(grid.transform.a), abs(grid.transform.e)) != (x, y):
            differences.append(
                f"resolution {[abs(grid.transform.a), abs(grid.transform.e)]}, grid.resolution {[x, y]}"
            )
    if differences:
        raise GridMismatchError(
            f"{where}: run {workspace.run_id} is not on this config's grid ({'; '.join(differences)}); "
            "give the run of this config with --run, or export again"
        )


def validate_before_run(config: PipelineConfig, beam_args: Sequence[str] = ()) -> None:
    """Fail before any work if the model does not fit the configured bands and patch size, or its
    engine, device or precision is not available where it will run (this machine's checks only
    when it runs here), or a computePixels source cannot fit a patch in a request or share out its
    request limits."""
    kw, kh = config.grid.kernel_size
    pw, ph = config.grid.patch_size
    threads, here = model_placement(config, beam_args)
    shape, margin = (ph + kh, pw + kw), (kw // 2, kh // 2)
    probe_model(config.model, config.locate(config.model.path), shape, margin, threads, here)
    if uses_compute_pixels(config):  # a patch fits a request; the limits can be shared out
        request_spans(config, stated_grid(config)[0], 0, 1)
        worker_processes(pipeline_flags(config, beam_args))


def find_problems(config: PipelineConfig) -> list[str]:
    """Everything ``run`` would reject, found without doing any work: every source band opened
    (metadata only), the grid resolved, the model probed, Earth Engine credentials found if needed.
    One line per problem, naming its field or file."""
    # a raster source's grid comes from its files; STAC and Earth Engine sources state theirs
    problems = _raster_problems(config) if config.source.kind == "raster" else _problems(stated_grid, config)
    return problems + _problems(validate_before_run, config) + _problems(check_access, config)


def _problems(check: Callable[..., object], *args: object) -> list[str]:
    """``check(*args)``'s error as a one-item list; empty if it passes."""
    try:
        check(*args)
    except TerrabeamError as exc:
        return [str(exc)]
    return []


def _raster_problems(config: PipelineConfig) -> list[str]:
    problems: list[str] = []
    with ExitStack() as stack:
        opened = {}
        for name in config.source.bands:
            try:
                opened[name] = stack.enter_context(open_band(config, name))
            except TerrabeamError as exc:
                problems.append(str(exc))
        if next(iter(config.source.bands)) not in opened:
            return problems  # the grid's defaults come from the first band
        try:
            grid, _ = export_grid(config)
        except TerrabeamError as exc:
            return [*problems, str(exc)]
        for name, dataset in opened.items():
            problems += _problems(check_overlap, dataset, name, grid)
    return problems


def validate(config: PipelineConfig) -> None:
    """``terrabeam validate``: every problem of :func:`find_problems` at once, one line each under a
    heading."""
    problems = find_problems(config)
    if problems:
        lines = "\n".join(f"  {problem}" for problem in problems)
        heading = f"{config.source_path or 'config'}: {len(problems)} problem(s) run would reject"
        raise ConfigError(f"{heading}\n{lines}")


def write_summary(
    config: PipelineConfig, workspace: Workspace, reports: list[StepReport], validate_seconds: float = 0.0
) -> Path:
    """``<run>/summary.json``: patches (and those that skipped the model: no core pixel to predict),
    pixels, seconds per step (and of the checks before them: the model probe loads the model the
    in-process pipeline then uses), Mpx/s and outputs (written atomically)."""
    by_name = {r.name: r for r in reports}
    total = validate_seconds + sum(r.seconds for r in reports)
    planned = by_name.get("map") or by_name.get("export")  # the steps that know the region
    region = planned.details["region_pixels"] if planned else None
    counted = by_name.get("map") or by_name.get("predict")
    delivered = by_name.get("map") or by_name.get("deliver")
    summary = {
        "pipeline": config.name,
        "run": workspace.run_id,
        "config_hash": config.fingerprint(),
        "patches": counted.details["patches"] if counted else None,
        "patches_skipped": counted.details.get("patches_skipped") if counted else None,
        "region_pixels": region,
        "pixels": region[0] * region[1] if region else None,
        "seconds": {"validate": round(validate_seconds, 3)}
        | {r.name: round(r.seconds, 3) for r in reports}
        | {"total": round(total, 3)},
        "mpx_per_second": round(region[0] * region[1] / total / 1e6, 4) if region and total else None,
        "steps": {r.name: r.details for r in reports},
        "outputs": delivered.details["outputs"] if delivered else [],
    }
    path = workspace.run_dir / "summary.json"
    partial = path.with_name(".summary.json.partial")
    with disk_full_as_error(workspace.run_dir):
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(partial, path)
    workspace.upload_file(path)
    return path


# The steps that run in this process, as function(config, workspace, beam_args) → StepReport. The
# predict step's model probe is skipped: a run validates the model before its first step.
LOCAL_STEPS = {
    "export": lambda config, workspace, beam_args: export_step(config, workspace),
    "predict": lambda config, workspace, beam_args: predict_step(config, workspace, beam_args, probe=False),
    "deliver": lambda config, workspace, beam_args: deliver_step(config, workspace, beam_args),
    "map": lambda config, workspace, beam_args: map_step(config, workspace, beam_args),
}


def check_access(config: PipelineConfig) -> None:
    """Fail before a run touches its workspace if a remote service it needs cannot be reached
    (today: Earth Engine credentials for an earthengine source or sink)."""
    if config.source.kind == "earthengine" or config.outputs.earthengine is not None:
        from terrabeam.earthengine import find_credentials

        find_credentials(config.earthengine)
