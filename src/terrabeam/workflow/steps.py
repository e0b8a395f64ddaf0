"""The three steps (export → predict → deliver) and a whole run with its JSON summary.

Each step reads the previous step's published folder in the run workspace and publishes its own
folder whole, so any step can be re-run alone.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rasterio
from rasterio.crs import CRS

from terrabeam.config import PipelineConfig
from terrabeam.errors import ConfigError, GridMismatchError
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, manifest_path, mixer_path
from terrabeam.predict.models import probe_model
from terrabeam.predict.pipeline import RemoteIO, read_export, run_predict
from terrabeam.progress import Progress
from terrabeam.sinks.geotiff import deliver_geotiff
from terrabeam.sources.raster import export_rasters
from terrabeam.workspace import Workspace, disk_full_as_error

GDAL_CACHE_BYTES = 64 * 2**20


@dataclass
class StepReport:
    name: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@contextmanager
def gdal_env() -> Iterator[None]:
    """GDAL settings for a step: a small fixed block cache, emptied when the step ends.

    GDAL's default cache is 5 % of RAM and fills as a large scene streams through, so memory would
    grow with the scene; strip-by-strip reading needs only a strip's blocks. An explicit
    GDAL_CACHEMAX in the environment wins.
    """
    # rasterio hands GDAL_CACHEMAX to GDALSetCacheMax64: the value is in bytes, not megabytes.
    options = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_BYTES}
    with rasterio.Env(**options):
        yield
    with rasterio.Env(GDAL_CACHEMAX=0):  # shrinking the cache to nothing frees its blocks
        pass
    release_free_memory()


def release_free_memory() -> None:
    """Hand memory freed by a step back to the OS (glibc keeps it in its arenas otherwise), so the
    next step in the same process does not start from the last one's peak."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def export_step(config: PipelineConfig, workspace: Workspace) -> StepReport:
    start = time.perf_counter()
    with workspace.staging("export") as staging, gdal_env():
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


def predict_step(
    config: PipelineConfig, workspace: Workspace, beam_args: Sequence[str] = (), probe: bool = True
) -> StepReport:
    start = time.perf_counter()
    export_dir = workspace.require_step("export")
    work = workspace.work_dir("predict")  # kept if interrupted: finished shards are not redone
    with disk_full_as_error(work):
        _match_work_to(work, export_dir, config)
        remote = remote_io(config, workspace)
        with _shard_progress(config, export_dir, work):
            result = run_predict(config, export_dir, work, beam_args, probe=probe, remote=remote)
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
    from terrabeam import storage

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
    )


@contextmanager
def _shard_progress(config: PipelineConfig, export_dir: Path, work: Path) -> Iterator[None]:
    """Report predict progress as prediction shards are published (a shard's count comes from the
    export manifest); the runner may be anywhere, the finished files are the truth."""
    manifest = manifest_path(export_dir, config.export.prefix)
    counts = ExportManifest.read(manifest).shard_records if manifest.exists() else []
    if not counts:
        yield
        return
    pattern = re.compile(rf"^{re.escape(config.predict.prefix)}-(\d+)\.tfrecord(\.gz)?$")
    stop = threading.Event()

    def watch(progress: Progress) -> None:
        while True:
            finished = stop.wait(0.5)
            done = sum(
                counts[int(m.group(1))]
                for p in work.iterdir()
                if (m := pattern.match(p.name)) and int(m.group(1)) < len(counts)
            )
            if done > progress.done:
                progress.advance(done - progress.done)
            if finished:
                return

    with Progress("predict", sum(counts)) as progress:
        watcher = threading.Thread(target=watch, args=(progress,), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _match_work_to(work: Path, export_dir: Path, config: PipelineConfig) -> None:
    """Empty the predict work folder if it was made from another export or config."""
    digest = hashlib.sha256(config.fingerprint().encode())
    for path in sorted(export_dir.glob("*.json")):
        digest.update(path.read_bytes())
    stamp, source = work / ".source", digest.hexdigest()
    if not stamp.exists() or stamp.read_text() != source:
        for path in work.iterdir():
            path.unlink()
        stamp.write_text(source)


def deliver_step(config: PipelineConfig, workspace: Workspace) -> StepReport:
    start = time.perf_counter()
    predict_dir = workspace.require_step("predict")
    with workspace.staging("deliver") as staging, gdal_env():
        outputs = deliver_geotiff(config, predict_dir, staging)
    final = workspace.step_location("deliver")
    return StepReport(
        "deliver", time.perf_counter() - start, {"outputs": [f"{final}/{p.name}" for p in outputs]}
    )


def check_run_grid(config: PipelineConfig, workspace: Workspace, step: str) -> None:
    """Refuse to run ``step`` alone on a run whose grid is not the config's: its patches would be
    decoded or placed wrongly. Compares what the config states (patch size, margin, CRS,
    resolution) with the mixer and manifest of the folder the step reads."""
    if step == "predict":
        grid, manifest, _ = read_export(config, workspace.require_step("export"))
        where, kernel = workspace.step_dir("export"), manifest.kernel_size
    else:
        where = workspace.require_step("predict")
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


def validate_before_run(config: PipelineConfig) -> None:
    """Fail before any work if the model does not fit the configured bands and patch size."""
    kw, kh = config.grid.kernel_size
    pw, ph = config.grid.patch_size
    probe_model(config.model, config.locate(config.model.path), (ph + kh, pw + kw), (kw // 2, kh // 2))


def write_summary(config: PipelineConfig, workspace: Workspace, reports: list[StepReport]) -> Path:
    """``<run>/summary.json``: patches, pixels, seconds per step, Mpx/s and outputs (written atomically)."""
    by_name = {r.name: r for r in reports}
    total = sum(r.seconds for r in reports)
    export = by_name.get("export")
    region = export.details["region_pixels"] if export else None
    predict = by_name.get("predict")
    summary = {
        "pipeline": config.name,
        "run": workspace.run_id,
        "config_hash": config.fingerprint(),
        "patches": predict.details["patches"] if predict else None,
        "region_pixels": region,
        "pixels": region[0] * region[1] if region else None,
        "seconds": {r.name: round(r.seconds, 3) for r in reports} | {"total": round(total, 3)},
        "mpx_per_second": round(region[0] * region[1] / total / 1e6, 4) if region and total else None,
        "steps": {r.name: r.details for r in reports},
        "outputs": by_name["deliver"].details["outputs"] if "deliver" in by_name else [],
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
    "deliver": lambda config, workspace, beam_args: deliver_step(config, workspace),
}


def check_access(config: PipelineConfig) -> None:
    """Fail before a run touches its workspace if a remote service it needs cannot be reached
    (today: Earth Engine credentials for an earthengine source or sink)."""
    if config.source.kind == "earthengine" or config.outputs.earthengine is not None:
        from terrabeam.earthengine import find_credentials

        find_credentials(config.earthengine)
