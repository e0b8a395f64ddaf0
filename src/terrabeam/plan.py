"""`terrabeam plan`: what a run will do and cost before any work. Counts (patches, tiles, shards,
pixels) are exact, from the grid; bytes, scratch disk and memory follow from patch, tile, layer and
model sizes; time comes from a calibration that reads, predicts and encodes a few real patches here.

The limits `run` enforces (``limits:``) and the arithmetic behind every number live here.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from terrabeam.config import PipelineConfig
from terrabeam.errors import InputError
from terrabeam.grid import Grid
from terrabeam.tiling import Tiling

# Dataflow batch workers are billed per vCPU-hour and per GB-hour of memory. The built-in prices
# are Google's list prices for us-central1 as of PRICES_AS_OF, written down from
# cloud.google.com/dataflow/pricing and not re-checked since: they go stale, and other regions,
# discounts, disks, Shuffle and GPUs differ. plan.prices in the config overrides them.
PRICES_AS_OF = "2024-06"
VCPU_HOUR_USD = 0.056
GB_HOUR_USD = 0.003557
MACHINES = {  # machine type → (vCPUs, GB of memory), Compute Engine's standard shapes
    **{f"n1-standard-{n}": (n, 3.75 * n) for n in (1, 2, 4, 8, 16, 32)},
    **{f"n2-standard-{n}": (n, 4.0 * n) for n in (2, 4, 8, 16, 32)},
    **{f"e2-standard-{n}": (n, 4.0 * n) for n in (2, 4, 8, 16, 32)},
}
LIST_PRICES = {name: round(cpu * VCPU_HOUR_USD + gb * GB_HOUR_USD, 4) for name, (cpu, gb) in MACHINES.items()}
DATAFLOW_DEFAULT_MACHINE = "n1-standard-1"  # Dataflow's batch default when runner.machine_type is unset
WORKER_START_SECONDS = 180.0  # a Dataflow worker's boot and image pull, billed before any work

# A run's own fixed costs besides loading the model (measured on the demo; BENCHMARKS.md): Beam's
# pipeline start and the mosaic's VRT, Items and quicklook.
PIPELINE_START_SECONDS = 1.0
# A process with Beam, GDAL and a model framework imported, before the model (without calibration).
BASELINE_MEMORY_BYTES = 500 * 2**20
GDAL_CACHE_BYTES = 64 * 2**20  # steps.GDAL_CACHE_BYTES: the block cache a step runs with


@dataclass(frozen=True)
class Shards:
    """TFRecord shards a run writes: how many, records in each (the last may hold fewer) and the
    uncompressed bytes of a full one (an upper bound of its file size)."""

    kind: str  # "export" (patches) or "predictions"
    count: int
    records_per_shard: int
    bytes_per_shard: int
    note: str = ""


@dataclass(frozen=True)
class Calibration:
    """Seconds per patch of each stage on this machine, from ``patches`` real patches."""

    patches: int
    read: float
    model: float
    post: float
    write: float
    model_load: float
    compression_ratio: float  # encoded COG bytes / raw bytes of the sample's layers (+1/3 with overviews)
    peak_memory_bytes: int  # of this process after the calibration (ru_maxrss)
    threads: int
    engine: str
    device: str

    @property
    def per_patch(self) -> float:
        return self.read + self.model + self.post + self.write


@dataclass(frozen=True)
class DataflowCost:
    machine_type: str
    usd_per_worker_hour: float
    price_source: str
    max_workers: int | None
    worker_hours: float | None
    hours: float | None  # wall time with max_workers
    usd: float | None


@dataclass(frozen=True)
class Plan:
    """What a run of ``config`` will do; ``None`` where it cannot be known before the run."""

    config: str
    steps: list[str]
    runner: str
    crs: str
    region_pixels: tuple[int, int]
    pixels: int
    patch_size: tuple[int, int]
    kernel_size: tuple[int, int]
    patches_per_row: int
    patch_rows: int
    patches: int
    tiles: int
    tile_pixels: tuple[int, int]
    shards: list[Shards]
    bytes_read: int | None
    bytes_written: int
    scratch_bytes: int
    peak_memory_bytes: int
    seconds: float | None
    calibration: Calibration | None
    dataflow: DataflowCost | None
    limits: dict[str, int | None]
    over_limits: list[str]
    assumptions: list[str] = field(default_factory=list)
    earthengine_requests: int | None = None  # computePixels requests (source.fetch)

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        if self.calibration is not None:
            document["calibration"]["per_patch"] = round(self.calibration.per_patch, 6)
        return document


def plan_grid(config: PipelineConfig) -> tuple[Grid, tuple[int, int]]:
    """The run's patch grid and its true region (width, height), from metadata only."""
    if config.source.kind == "raster":
        from terrabeam.sources.raster import export_grid

        grid, region = export_grid(config)
    else:
        from terrabeam.region import stated_grid

        grid, region = stated_grid(config)
    return grid, (region.width, region.height)


def _patch_record_bytes(config: PipelineConfig, grid: Grid) -> int:
    """Exact size of one exported patch's tf.train.Example (float32 values have a fixed size)."""
    from terrabeam.tfrecord import encode_example

    kw, kh = config.grid.kernel_size
    zeros = np.zeros((grid.patch_height + kh, grid.patch_width + kw), np.float32)
    return len(encode_example({band: zeros for band in config.source.band_names}))


def plan_shards(config: PipelineConfig, tiling: Tiling, bands: list[str]) -> list[Shards]:
    """The shards a run writes: Earth Engine-layout prediction shards of a one-pipeline run with
    ``outputs.tfrecord`` (records_per_shard of the map sink), or an export's patch shards and one
    prediction shard per export shard (export → predict → deliver)."""
    from terrabeam.sinks.shards import RECORD_OVERHEAD, records_per_shard
    from terrabeam.sources.earthengine_pixels import uses_compute_pixels
    from terrabeam.workflow.steps import one_pipeline

    grid, limit = tiling.grid, config.export.max_file_size
    pixels = grid.patch_width * grid.patch_height
    prediction_bound = 16 + sum(RECORD_OVERHEAD + pixels * (2 if b == "class" else 4) for b in bands)
    if one_pipeline(config):
        if not config.outputs.tfrecord:
            return []
        per = records_per_shard(tiling, bands, limit)
        return [Shards("predictions", -(-grid.total_patches // per), per, per * prediction_bound)]
    frame = _patch_record_bytes(config, grid) + 16  # what ShardedWriter counts per record
    per = max(1, limit // frame)
    count = -(-grid.total_patches // per)
    note = (
        "at most: Earth Engine sizes its own shards (export.max_file_size is its maxFileSize)"
        if config.source.kind == "earthengine" and not uses_compute_pixels(config)
        else ""
    )
    return [
        Shards("export", count, per, per * frame, note),
        Shards("predictions", count, per, per * prediction_bound, "one per export shard"),
    ]


def _bytes_read(config: PipelineConfig, grid: Grid, tiling: Tiling) -> int | None:
    """Decoded source pixels a raster run reads: each band's pixels under the grid (with the margin
    read again on every tile's block edge) times its data type; None for other sources."""
    if config.source.kind != "raster":
        return None
    from rasterio.warp import transform_bounds

    from terrabeam.sources.raster import open_band

    kw, kh = config.grid.kernel_size
    block_width = tiling.patches_x * grid.patch_width
    margin = (1 + kw / block_width) * (1 + kh / grid.patch_height)
    left, top = grid.xy(-kw / 2, -kh / 2)
    right, bottom = grid.xy(grid.width + kw / 2, grid.height + kh / 2)
    total = 0.0
    for name, spec in config.source.bands.items():
        with open_band(config, name) as ds:
            x0, y0, x1, y1 = transform_bounds(grid.crs, ds.crs, left, bottom, right, top)
            b = ds.bounds
            width = max(0.0, min(x1, b.right) - max(x0, b.left))
            height = max(0.0, min(y1, b.top) - max(y0, b.bottom))
            band_pixels = width * height / abs(ds.transform.a * ds.transform.e)
            total += band_pixels * margin * np.dtype(ds.dtypes[spec.band - 1]).itemsize
    return int(total)


def _layer_bytes_per_pixel(config: PipelineConfig, bands: list[str]) -> list[int]:
    from terrabeam.sinks.tiles import map_layers

    return [len(layer.bands) * np.dtype(layer.dtype).itemsize for layer in map_layers(config, bands)]


def calibrate(config: PipelineConfig, grid: Grid, tiling: Tiling, bands: list[str]) -> Calibration:
    """Time the run's stages on ``plan.calibration_patches`` real patches: read them as the run does,
    run the model in batches of model.batch_size (after one warm-up batch), post-process, and encode
    the predictions as COGs with the run's codec (the sample as one tile). Raster sources only."""
    import rasterio
    import rasterio.shutil

    from terrabeam.predict.engines import default_threads, resolve_runtime
    from terrabeam.predict.frameworks import load_predictor
    from terrabeam.predict.io import PostProcess
    from terrabeam.predict.models import run_model
    from terrabeam.predict.precision import prepare_sample, read_sample
    from terrabeam.sinks.tiles import cog_options, map_layers
    from terrabeam.workflow.maps import tile_overviews

    model = config.model
    count = min(config.plan.calibration_patches, grid.total_patches)
    started = time.perf_counter()
    patches = read_sample(config, count)
    read = time.perf_counter() - started
    inputs = prepare_sample(config, patches)
    threads = default_threads(model, config.runner.workers if config.runner.kind == "local" else 1)
    runtime = resolve_runtime(model, threads)
    task = "regression" if model.output == "regression" else "classification"
    started = time.perf_counter()
    predictor = load_predictor(model.framework, str(config.locate(model.path)), task, runtime)
    kw, kh = config.grid.kernel_size
    margin = (kw // 2, kh // 2)
    run_model(predictor, inputs[: model.batch_size], model, margin)  # warm-up, as the probe does
    model_load = time.perf_counter() - started
    started = time.perf_counter()
    outputs = [
        run_model(predictor, inputs[i : i + model.batch_size], model, margin)
        for i in range(0, len(inputs), model.batch_size)
    ]
    model_seconds = time.perf_counter() - started
    post = PostProcess(model.output_names, (grid.patch_height, grid.patch_width), model.output)
    started = time.perf_counter()
    features = [post.features(output) for batch in outputs for output in batch]
    post_seconds = time.perf_counter() - started
    height, width = grid.patch_height, grid.patch_width * len(features)
    overviews = tile_overviews(config, tiling)
    raw = encoded = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="terrabeam-plan-") as folder:
        for layer in map_layers(config, bands):
            values = np.stack([np.concatenate([f[b] for f in features], axis=1) for b in layer.bands])
            values = values.astype(layer.dtype)
            profile = {"width": width, "height": height, "count": len(layer.bands), "dtype": layer.dtype}
            profile |= {"crs": grid.crs, "transform": grid.transform, "nodata": layer.nodata}
            scratch, path = Path(folder) / f"{layer.stem}.raw.tif", Path(folder) / f"{layer.stem}.tif"
            with rasterio.open(scratch, "w", driver="GTiff", **profile) as dataset:  # the raw scratch
                dataset.write(values)
            options = cog_options(
                layer, config.outputs.compression, config.outputs.compression_level, overviews
            )
            rasterio.shutil.copy(scratch, path, driver="COG", **options)
            raw += values.nbytes * (4 / 3 if overviews else 1)  # overviews add a third
            encoded += path.stat().st_size
    write = time.perf_counter() - started
    n = len(features)
    return Calibration(
        patches=n,
        read=read / n,
        model=model_seconds / n,
        post=post_seconds / n,
        write=write / n,
        model_load=model_load,
        compression_ratio=encoded / raw if raw else 1.0,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        threads=runtime.threads or (os.cpu_count() or 1),
        engine=runtime.engine,
        device=runtime.device,
    )


def _price(config: PipelineConfig) -> tuple[str, float | None, str]:
    """(machine type, US$ per worker-hour or None, where the price comes from)."""
    machine = config.runner.machine_type or DATAFLOW_DEFAULT_MACHINE
    if machine in config.plan.prices:
        return machine, config.plan.prices[machine], "plan.prices in the config"
    if machine in LIST_PRICES:
        source = (
            f"list price of {PRICES_AS_OF} (Dataflow batch, us-central1: ${VCPU_HOUR_USD}/vCPU-h, "
            f"${GB_HOUR_USD}/GB-h; may be stale, set plan.prices)"
        )
        return machine, LIST_PRICES[machine], source
    return machine, None, f"no price for {machine}: add it to plan.prices"


def _dataflow_cost(config: PipelineConfig, patches: int, calibration: Calibration | None) -> DataflowCost:
    """Worker-hours: this machine's core-seconds per patch spread over a worker's vCPUs (a vCPU taken
    as one of this machine's cores), plus each worker's start; cost = worker-hours × price."""
    machine, price, source = _price(config)
    workers = config.runner.max_workers
    worker_hours = hours = usd = None
    vcpus = MACHINES.get(machine, (None, None))[0]
    if calibration is not None and vcpus:
        core_seconds = patches * calibration.per_patch * calibration.threads
        starts = (workers or 1) * WORKER_START_SECONDS
        worker_hours = (core_seconds / vcpus + starts) / 3600
        hours = worker_hours / workers if workers else None
        usd = round(worker_hours * price, 2) if price is not None else None
        worker_hours = round(worker_hours, 3)
        hours = round(hours, 3) if hours is not None else None
    return DataflowCost(machine, price or 0.0, source, workers, worker_hours, hours, usd)


def make_plan(config: PipelineConfig, calibrate_here: bool = True) -> Plan:
    """The plan of a run of ``config``: metadata reads only, plus the calibration if asked (raster
    sources; a few seconds)."""
    from terrabeam.predict.pipeline import prediction_bands
    from terrabeam.sinks.tiles import WriteMapTiles
    from terrabeam.workflow.maps import single_file
    from terrabeam.workflow.steps import run_steps

    grid, (region_width, region_height) = plan_grid(config)
    tiling = Tiling.for_grid(grid, region_width, region_height, config.outputs.tile_size)
    bands = prediction_bands(config)
    pixels = region_width * region_height
    tile_w = min(tiling.patches_x * grid.patch_width, region_width)
    tile_h = min(tiling.patches_y * grid.patch_height, region_height)
    per_pixel = _layer_bytes_per_pixel(config, bands)
    shards = plan_shards(config, tiling, bands)
    assumptions = []

    calibration = None
    if calibrate_here and config.source.kind == "raster":
        from terrabeam.workflow.steps import gdal_env

        with gdal_env():
            calibration = calibrate(config, grid, tiling, bands)
    elif calibrate_here:
        assumptions.append(f"no calibration: it reads raster sources, not {config.source.kind}")

    # Outputs: each layer over the region, +1/3 for overviews; tiles and a single COG both when a
    # single COG is assembled from several tiles (the tiles then have no overviews).
    ratio = calibration.compression_ratio if calibration else 1.0
    layers_raw = pixels * sum(per_pixel)
    several = tiling.count > 1 and single_file(config, tiling)
    written = layers_raw * (2 + 1 / 3 if several else 4 / 3) * ratio
    if calibration is None:
        assumptions.append("bytes_written: uncompressed (calibration measures the codec's ratio)")
    written += sum(s.count * s.bytes_per_shard for s in shards if s.kind == "predictions")

    # Scratch: per local worker, the raw files of the tile being filled and of the tiles encoded
    # behind it; with outputs.tfrecord every tile's prediction records until the shards are
    # assembled; without one pipeline, the export and prediction shards kept in the workspace.
    workers = config.runner.workers if config.runner.kind == "local" else 1
    tile_raw = tile_w * tile_h * sum(per_pixel)
    scratch = workers * (1 + WriteMapTiles.WRITE_BEHIND) * tile_raw
    scratch += sum(s.count * s.bytes_per_shard for s in shards)
    if config.runner.kind != "local":
        assumptions.append("scratch_bytes: per worker of the runner (on its disks)")

    # Memory: the process with the model loaded and a batch through it (measured, else a baseline
    # plus three times the model file), each worker's model copy, the GDAL cache, the reader's
    # blocks (a patch row of a tile, two in flight, source + warp + scaled copies) and a strip per
    # layer being filled.
    kw, kh = config.grid.kernel_size
    in_bands = len(config.source.band_names)
    block = (tile_w + kw) * (grid.patch_height + kh) * in_bands * 4
    strip = tile_w * grid.patch_height * sum(per_pixel)
    batch = config.model.batch_size * (grid.patch_width + kw) * (grid.patch_height + kh) * 4
    batch *= in_bands + 2 * len(bands)
    try:
        model_bytes = os.path.getsize(config.locate(config.model.path))
    except OSError:
        model_bytes = 0
    if calibration is not None:
        process = calibration.peak_memory_bytes
    else:
        process = BASELINE_MEMORY_BYTES + 3 * model_bytes + batch
        assumptions.append(
            "peak_memory_bytes: a baseline of 500 MiB plus 3 × the model file (no calibration)"
        )
    extra_copies = max(0, workers - 1) if not config.model.share_across_processes else 0
    memory = process + extra_copies * (3 * model_bytes + batch) + GDAL_CACHE_BYTES
    memory += workers * (3 * 2 * block + strip)

    seconds = None
    if calibration is not None:
        # a single COG from several tiles encodes every pixel again, with overviews
        mosaic = (
            pixels / (grid.patch_width * grid.patch_height) * calibration.write * 4 / 3 if several else 0.0
        )
        seconds = (
            calibration.model_load
            + PIPELINE_START_SECONDS
            + grid.total_patches * calibration.per_patch
            + mosaic
        )
        assumptions.append(
            f"seconds: this machine, {os.cpu_count()} cores, {calibration.threads} model threads "
            f"({calibration.engine} on {calibration.device}), stages one after another (reading and "
            "encoding overlap the model in a run: an upper side)"
        )
        if config.runner.kind != "local":
            assumptions.append("seconds: as if run here; the runner's machines differ")

    dataflow = None
    if config.runner.kind == "dataflow":
        dataflow = _dataflow_cost(config, grid.total_patches, calibration)
        if config.runner.gpu_type:
            assumptions.append("dataflow: worker-hours from CPU timing; GPU workers differ")

    limits = config.limits
    over = []
    if limits.max_patches is not None and grid.total_patches > limits.max_patches:
        over.append(f"{grid.total_patches:,} patches > limits.max_patches {limits.max_patches:,}")
    if limits.max_scratch_bytes is not None and scratch > limits.max_scratch_bytes:
        over.append(
            f"{format_bytes(scratch)} of scratch disk > limits.max_scratch_bytes "
            f"{format_bytes(limits.max_scratch_bytes)}"
        )
    return Plan(
        config=str(config.source_path or "config"),
        steps=run_steps(config),
        runner=config.runner.kind,
        crs=str(grid.crs),
        region_pixels=(region_width, region_height),
        pixels=pixels,
        patch_size=(grid.patch_width, grid.patch_height),
        kernel_size=(kw, kh),
        patches_per_row=grid.patches_per_row,
        patch_rows=grid.patch_rows,
        patches=grid.total_patches,
        tiles=tiling.count,
        tile_pixels=(tile_w, tile_h),
        shards=shards,
        bytes_read=_bytes_read(config, grid, tiling),
        bytes_written=int(written),
        scratch_bytes=int(scratch),
        peak_memory_bytes=int(memory),
        seconds=round(seconds, 2) if seconds is not None else None,
        calibration=calibration,
        dataflow=dataflow,
        limits={"max_patches": limits.max_patches, "max_scratch_bytes": limits.max_scratch_bytes},
        over_limits=over,
        assumptions=assumptions,
        earthengine_requests=_compute_pixels_requests(config, tiling),
    )


def _compute_pixels_requests(config: PipelineConfig, tiling: Tiling) -> int | None:
    """computePixels requests of an Earth Engine source fetched that way (per tile row in one
    pipeline, per export block when the export files are written here); None otherwise."""
    from terrabeam.sources.earthengine_pixels import count_requests, tile_blocks, uses_compute_pixels
    from terrabeam.sources.raster import export_blocks
    from terrabeam.workflow.steps import one_pipeline

    if not uses_compute_pixels(config):
        return None
    blocks = tile_blocks(tiling) if one_pipeline(config) else export_blocks(tiling.grid)
    return count_requests(config, tiling.grid, blocks)


def check_limits(config: PipelineConfig, confirmed: bool) -> None:
    """Before `run` starts: the cheap plan (no calibration); an InputError naming the numbers and
    the limits if it is over ``limits:``, unless ``confirmed`` (--yes)."""
    if confirmed:
        return
    plan = make_plan(config, calibrate_here=False)
    if plan.over_limits:
        raise InputError(
            f"{plan.config}: refusing to start: {'; '.join(plan.over_limits)} (region "
            f"{plan.region_pixels[0]:,} × {plan.region_pixels[1]:,} px, {plan.tiles:,} tiles); see "
            f"`terrabeam plan {plan.config}`, then pass --yes to run it anyway or raise the limit "
            "in the config's limits: section"
        )


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    if value < 2 * 3600:
        return f"{value / 60:.1f} min"
    if value < 2 * 86400:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} days"


def describe_plan(plan: Plan) -> str:
    """The plan for people, a few lines."""
    w, h = plan.region_pixels
    lines = [
        f"plan for {plan.config}: steps {' → '.join(plan.steps)} on the {plan.runner} runner",
        f"  region   {w:,} × {h:,} px = {plan.pixels / 1e6:,.2f} Mpx ({plan.crs})",
        f"  patches  {plan.patches:,} ({plan.patches_per_row:,} per row × {plan.patch_rows:,} rows of "
        f"{plan.patch_size[0]} × {plan.patch_size[1]} px, margin {plan.kernel_size[0]} × {plan.kernel_size[1]})",
        f"  tiles    {plan.tiles:,} of up to {plan.tile_pixels[0]:,} × {plan.tile_pixels[1]:,} px",
    ]
    for s in plan.shards:
        note = f"; {s.note}" if s.note else ""
        lines.append(
            f"  shards   {s.count:,} {s.kind} shards of {s.records_per_shard:,} records, "
            f"≤ {format_bytes(s.bytes_per_shard)} each{note}"
        )
    if plan.earthengine_requests is not None:
        lines.append(f"  fetch    {plan.earthengine_requests:,} Earth Engine computePixels requests")
    read = format_bytes(plan.bytes_read) if plan.bytes_read is not None else "unknown (not a raster source)"
    lines += [
        f"  read     {read} of source pixels (decoded)",
        f"  written  {format_bytes(plan.bytes_written)}",
        f"  scratch  {format_bytes(plan.scratch_bytes)} of temporary disk at most",
        f"  memory   {format_bytes(plan.peak_memory_bytes)} peak (estimate)",
    ]
    if plan.seconds is not None and plan.calibration is not None:
        c = plan.calibration
        lines.append(
            f"  time     {format_seconds(plan.seconds)} on this machine (calibrated on {c.patches} patches: "
            f"{1000 * c.per_patch:.1f} ms per patch = read {1000 * c.read:.1f} + model {1000 * c.model:.1f} "
            f"+ post {1000 * c.post:.1f} + write {1000 * c.write:.1f}; model load {c.model_load:.2f} s)"
        )
    else:
        lines.append("  time     not estimated (no calibration)")
    if plan.dataflow is not None:
        d = plan.dataflow
        cost = f"${d.usd:,.2f}" if d.usd is not None else "unknown"
        hours = f"{d.worker_hours:,.2f}" if d.worker_hours is not None else "unknown"
        lines.append(
            f"  dataflow {hours} worker-hours of {d.machine_type} at ${d.usd_per_worker_hour}/h "
            f"({d.price_source}): {cost}"
        )
    lines += [f"  assuming {a}" for a in plan.assumptions]
    if plan.over_limits:
        lines.append(f"  OVER LIMITS: {'; '.join(plan.over_limits)} — `terrabeam run` needs --yes")
    return "\n".join(lines)


def print_plan(config: PipelineConfig, as_json: bool, calibrate: bool = True) -> None:
    """`terrabeam plan`: the plan as one JSON document, or as text for people."""
    import json

    plan = make_plan(config, calibrate_here=calibrate)
    print(json.dumps(plan.as_dict(), indent=2) if as_json else describe_plan(plan))
