"""Writing a map: a Beam pipeline from any patch source to map tiles, then the mosaic, published as
the run's ``deliver/`` folder.

Tiles land in the run's hidden work folder (``.deliver.work/tiles/``) as they are finished, so an
interrupted run keeps them; the pipeline of a resumed run covers only the tiles still missing. Once
every tile is there, the mosaic (VRT, single COG, quicklook) is made here, where the run was
launched, and the folder is published whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from terrabeam import beam_local
from terrabeam.config import PipelineConfig
from terrabeam.errors import ConfigError, RecordCountError
from terrabeam.gdal_threads import GDAL_IO
from terrabeam.layout import ExportManifest, manifest_path, mixer_path, shard_name
from terrabeam.predict.pipeline import pipeline_flags, run_counted
from terrabeam.process_memory import collected_after, release_free_memory
from terrabeam.progress import published_progress
from terrabeam.provenance import Provenance
from terrabeam.region import projected_geometry
from terrabeam.sinks import tiles as tile_writer
from terrabeam.sinks.mosaic import TILES_FOLDER, write_single_cog, write_vrt
from terrabeam.sinks.quicklook import Backdrop, QuicklookStyle, quicklook_shape, write_quicklook
from terrabeam.sinks.shards import AssembleShard, records_per_shard, shard_ranges
from terrabeam.sinks.stac_items import item_file_name, post_item, write_items
from terrabeam.sinks.tiles import (
    MapLayer,
    WriteMap,
    class_colors,
    finished_tiles,
    map_layers,
    records_file_name,
    tile_file_name,
)
from terrabeam.sources.stac import SourceItem
from terrabeam.tiling import Tiling
from terrabeam.workspace import Workspace

# (pipeline, tiles to do, spread over workers?) → PCollection of (PatchKey, prediction bands)
PatchSource = Callable[[beam.Pipeline, list[int], bool], beam.PCollection]


@dataclass(frozen=True)
class MapResult:
    tiling: Tiling
    layers: list[MapLayer]
    tiles_reused: int
    outputs: list[Path]
    seconds: float
    patches_skipped: int = 0  # by this run's pipeline: cores wholly masked or outside the region
    stac_item: str | None = None  # where outputs.stac put the map's Item

    def details(self, location: str) -> dict[str, Any]:
        grid = self.tiling.grid
        return {
            "patches": grid.total_patches,
            "patches_skipped": self.patches_skipped,
            "tiles": self.tiling.count,
            "tiles_reused": self.tiles_reused,
            "region_pixels": [self.tiling.region_width, self.tiling.region_height],
            "outputs": [f"{location}/{p.name}" for p in self.outputs],
        } | ({"stac_item": self.stac_item} if self.stac_item else {})


def work_identity(config: PipelineConfig, inputs: str) -> str:
    """The stamp of a map's work folder: the config, what the tiles are made from, and how this
    terrabeam writes tiles (``TILE_FORMAT``, so a resume by another version keeps no tile of a
    different shape)."""
    text = f"{config.fingerprint()}\n{inputs}\ntile format {tile_writer.TILE_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()


def _match_work(work: Path, identity: str) -> None:
    """Empty the work folder if it was made for another config or input (its ``.source`` stamp)."""
    stamp = work / ".source"
    if stamp.exists() and stamp.read_text() == identity:
        return
    for path in sorted(work.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    stamp.write_text(identity)


def _match_remote_tiles(folder: str, identity: str) -> list[str]:
    """The names of the tiles the workers wrote to ``folder`` (a URI) for this stamp; tiles there
    without it (another config, input or tile format; or written before stamps) are deleted."""
    from terrabeam import storage

    listed = [path for path, _ in storage.list_files(f"{folder}/")]
    stamp = f"{folder}/.source"
    if stamp in listed and storage.read_bytes(stamp).decode() == identity:
        return [Path(path).name for path in listed if path != stamp]
    if listed:
        storage.delete(listed)
    storage.write_bytes(stamp, identity.encode())
    return []


def write_map(
    config: PipelineConfig,
    workspace: Workspace,
    tiling: Tiling,
    bands: Sequence[str],
    source: PatchSource,
    identity: str,
    beam_args: Sequence[str] = (),
    remote_tiles: str | None = None,
    group_by_tile: bool = False,
    with_records: bool = False,
    source_items: Sequence[SourceItem] = (),
) -> MapResult:
    """Run ``source`` → map tiles for the tiles not yet written, then the mosaic; publish ``deliver/``.

    ``identity`` names what the tiles are made from (config, inputs): a work folder made from
    anything else is emptied first. With ``remote_tiles`` (a URI) the workers write tiles there and
    they are fetched for the mosaic. ``group_by_tile``: the source spreads a tile's patches over
    bundles when its records are spread over workers. ``with_records``: also Earth Engine-layout
    prediction shards + mixer + manifest, assembled from the tiles' records by a second pipeline.
    ``source_items``: the STAC Items read (linked from the map's Item, under its quicklook).
    """
    start = time.perf_counter()
    stem = config.name
    layers = map_layers(config, bands)
    made = Provenance.of(config, workspace.run_id, imagery_window(config, workspace))
    tags = made.tags()
    flags = pipeline_flags(config, beam_args)
    spread = config.predict.should_reshuffle(flags)
    work = workspace.work_dir("deliver")
    stamp = work_identity(config, identity)
    _match_work(work, stamp)
    tiles_dir = work / TILES_FOLDER
    tiles_dir.mkdir(exist_ok=True)
    for partial in tiles_dir.glob("*.partial"):
        partial.unlink()
    names = _match_remote_tiles(remote_tiles, stamp) if remote_tiles else []
    names += [p.name for p in tiles_dir.iterdir()]
    done = finished_tiles(names, stem, layers, tiling, with_records)
    todo = [tile for tile in range(tiling.count) if tile not in done]
    skipped = 0
    # the quicklook's imagery is read from now on, beside the pipeline
    with _quicklook_ahead(config, tiling, layers, made, source_items) as quicklook:
        if todo:
            pipeline = beam_local.pipeline(PipelineOptions(flags))
            predictions = source(pipeline, todo, spread)
            target = remote_tiles or str(tiles_dir)
            polygon = projected_geometry(config, tiling.grid.crs)
            compression = (config.outputs.compression, config.outputs.compression_level)
            _ = predictions | "WriteMap" >> WriteMap(
                target,
                stem,
                layers,
                tiling,
                polygon,
                compression,
                group_by_tile and spread,
                with_records,
                overviews=tile_overviews(config, tiling),
                tags=tags,
                overview_count=vrt_overview_levels(config, tiling) or None,
            )
            pattern = re.compile(rf"^{re.escape(stem)}-{re.escape(layers[-1].stem)}-r\d+c\d+\.tif$")

            def published() -> int:
                return len(done) + sum(
                    1 for p in tiles_dir.iterdir() if pattern.match(p.name) and p.name not in names
                )

            # the model goes with the pipeline's cycles: at 64× the mosaic's COG buffers came on top
            # of it, the run's peak (BENCHMARKS.md)
            with published_progress("map", tiling.count, "tile", published), collected_after():
                totals = run_counted(pipeline)
            written, skipped = totals.get("tiles_written", 0), totals.get("patches_skipped", 0)
            if written != len(todo):
                raise RecordCountError(f"map: {len(todo)} tiles to write, but the pipeline wrote {written}")
            # the arrays the pipeline freed (glibc keeps them) are not needed by the mosaic: without
            # this its COGs start from the pipeline's peak (16× demo scene: 868 MiB peak in the mosaic
            # before, 748 after; BENCHMARKS.md). GDAL's cache is already empty: the workers' teardown
            # closed the source datasets.
            release_free_memory(collect=False)
        if remote_tiles:
            _fetch_tiles(remote_tiles, tiles_dir, stem, layers, tiling)
        outputs = _mosaic(config, work, tiling, layers, tags, quicklook)
    derived_from = [item.href for item in source_items if item.href]
    outputs += write_items(config, work, made, tiling, layers, outputs, derived_from)
    if with_records:
        outputs += _assemble_shards(config, work, tiling, bands, flags, remote_tiles)
    (work / ".source").unlink()
    workspace.publish(work, "deliver")
    if remote_tiles:  # the workers' tiles (and records) were for a resume; the map is published
        from terrabeam.storage import discard_work_folder

        discard_work_folder(remote_tiles.rsplit("/", 1)[0])
    posted = None
    if config.outputs.stac is not None:  # once the assets it links are published
        target, deliver = config.outputs.stac, workspace.step_dir("deliver")
        location = workspace.step_location("deliver")
        posted = post_item(target.api, target.collection, deliver / item_file_name(stem), location)
    return MapResult(tiling, layers, len(done), outputs, time.perf_counter() - start, skipped, posted)


def imagery_window(config: PipelineConfig, workspace: Workspace) -> tuple[str, str] | None:
    """The time the map's imagery covers, recorded in its tags, STAC Item and quicklook title: an
    Earth Engine source's composite window (as its ingested image says too), else the run's window.
    A deployed or scheduled run without a window of its own still says what its composite covers."""
    if config.source.kind != "earthengine":
        return workspace.window
    from terrabeam.sources.earthengine import run_composite_window

    try:
        start, end = run_composite_window(config.source, workspace.window, workspace.created)  # type: ignore[arg-type]
    except ConfigError:  # no source.window and no run window (e.g. `deliver` alone): none to say
        return None
    return start.isoformat(), end.isoformat()


def _assemble_shards(
    config: PipelineConfig,
    work: Path,
    tiling: Tiling,
    bands: Sequence[str],
    flags: Sequence[str],
    remote_tiles: str | None,
) -> list[Path]:
    """Prediction shards in grid order from the tiles' records (shards already there are kept), the
    mixer and manifest beside them; then the records files go."""
    stem, prefix = config.name, config.predict.prefix
    level = config.predict.compression_level
    per_shard = records_per_shard(tiling, bands, config.export.max_file_size)
    ranges = shard_ranges(tiling.grid.total_patches, per_shard)
    names = [shard_name(prefix, i, level > 0) for i in range(len(ranges))]
    todo = [i for i, name in enumerate(names) if not (work / name).exists()]
    remote_out = remote_tiles.rsplit("/", 1)[0] if remote_tiles else None
    if todo:
        pipeline = beam_local.pipeline(PipelineOptions(flags))
        tiles_dir = remote_tiles or str(work / TILES_FOLDER)
        _ = (
            pipeline
            | "Shards" >> beam.Create([(i, ranges[i]) for i in todo])
            | "AssembleShard"
            >> beam.ParDo(AssembleShard(tiles_dir, stem, tiling, names, remote_out or str(work), level))
        )
        pipeline.run().wait_until_finish()
        if remote_out:
            from terrabeam.storage import copy_file

            for i in todo:
                copy_file(f"{remote_out}/{names[i]}", str(work / names[i]))
    tiling.grid.write_mixer(mixer_path(work, prefix))
    ExportManifest(
        kernel_size=[0, 0],
        region_width=tiling.region_width,
        region_height=tiling.region_height,
        bands=list(bands),
        shard_records=[stop - first for first, stop in ranges],
    ).write(manifest_path(work, prefix))
    for tile in range(tiling.count):
        (work / TILES_FOLDER / records_file_name(stem, tiling, tile)).unlink(missing_ok=True)
    return [work / name for name in names] + [mixer_path(work, prefix), manifest_path(work, prefix)]


def _fetch_tiles(remote: str, tiles_dir: Path, stem: str, layers: list[MapLayer], tiling: Tiling) -> None:
    from terrabeam.storage import copy_file

    for tile in range(tiling.count):
        for layer in layers:
            name = tile_file_name(stem, layer, tiling, tile)
            if not (tiles_dir / name).exists():
                if layer.categories:  # GDAL's sidecar with the class names
                    copy_file(f"{remote}/{name}.aux.xml", str(tiles_dir / f"{name}.aux.xml"))
                copy_file(f"{remote}/{name}", str(tiles_dir / name))


def single_file(config: PipelineConfig, tiling: Tiling) -> bool:
    """Whether the mosaic includes one COG per layer (outputs.single_file_max_pixels)."""
    return tiling.region_width * tiling.region_height <= config.outputs.single_file_max_pixels


def vrt_overview_levels(config: PipelineConfig, tiling: Tiling) -> int:
    """Overview levels the VRT of a VRT-only map of several tiles exposes, made of the tiles' own
    (0 for any other map): halvings until the region fits one 512 px block, as GDAL's COG driver
    counts, but only while tile edges stay on whole pixels of the level (a tile's sides divisible
    by its factor). Without them a zoomed-out read of the VRT decodes every tile in full. 0 too
    where that would leave a tile fewer levels than GDAL gives it alone."""
    if tiling.count == 1 or single_file(config, tiling):
        return 0
    grid = tiling.grid
    sides = (tiling.patches_x * grid.patch_width, tiling.patches_y * grid.patch_height)
    whole = min((side & -side).bit_length() - 1 for side in sides)  # factors of 2 in each side
    levels = min(_halvings_to_a_block(tiling.region_width, tiling.region_height), whole)
    return levels if levels >= _halvings_to_a_block(*sides) else 0


def _halvings_to_a_block(width: int, height: int) -> int:
    """Overview levels GDAL's COG driver makes for ``width`` × ``height``: until 512 px fit both."""
    levels = 0
    while max(width, height) > 512:
        width, height, levels = -(-width // 2), -(-height // 2), levels + 1
    return levels


def tile_overviews(config: PipelineConfig, tiling: Tiling) -> bool:
    """Tiles carry overviews unless a single COG assembled from several of them carries them (a
    single tile is that COG itself)."""
    return tiling.count == 1 or not single_file(config, tiling)


def _mosaic(
    config: PipelineConfig,
    work: Path,
    tiling: Tiling,
    layers: list[MapLayer],
    tags: dict[str, str],
    quicklook: tuple[QuicklookStyle, Backdrop | None] | None,
) -> list[Path]:
    """VRT per layer, one COG per layer if the region is small enough, the quicklook (``quicklook``:
    its look and imagery, or None); the COGs and the quicklook are made side by side in threads
    (GDAL releases the GIL; on 2 cores ~1.4× faster than one after another, BENCHMARKS.md)."""
    outputs = config.outputs
    stem = config.name
    single = single_file(config, tiling)
    compression = (outputs.compression, outputs.compression_level)
    written: list[Path] = []
    jobs = []
    class_map = None
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        levels = vrt_overview_levels(config, tiling)
        for layer in layers:
            vrt = write_vrt(work / f"{stem}-{layer.stem}.vrt", stem, layer, tiling, tags, levels)
            if layer.stem == "classes":
                class_map = vrt
                if not outputs.class_map:
                    continue
            written.append(vrt)
            if single:
                target = work / f"{stem}-{layer.stem}.tif"
                jobs.append(pool.submit(write_single_cog, vrt, target, stem, layer, tiling, compression))
        if quicklook is not None and class_map is not None:
            path = work / f"{stem}-quicklook.png"
            jobs.append(pool.submit(write_quicklook, class_map, path, *quicklook))
    written.extend(job.result() for job in jobs)  # all have ended; the first error is raised
    return written


@contextmanager
def _quicklook_ahead(
    config: PipelineConfig,
    tiling: Tiling,
    layers: Sequence[MapLayer],
    made: Provenance,
    source_items: Sequence[SourceItem],
) -> Iterator[tuple[QuicklookStyle, Backdrop | None] | None]:
    """The quicklook's look and imagery (None without a quicklook), the imagery read in a thread
    from now on: while the pipeline starts and runs (GDAL releases the GIL) instead of in the
    mosaic after the last tile (light model, 16× demo scene: 0.2 s of the run's tail,
    BENCHMARKS.md). The read waits while a tile is written through GDAL's cache (gdal_threads)."""
    if not config.outputs.quicklook or not any(layer.stem == "classes" for layer in layers):
        yield None
        return
    style, backdrop = _quicklook(config, tiling, made, source_items)
    if backdrop is None:
        yield style, None
        return
    shape = quicklook_shape(tiling.region_width, tiling.region_height)

    def read() -> tuple:
        with GDAL_IO.reading():
            imagery = backdrop(shape)
        release_free_memory(collect=False)  # the read's buffers: not kept through the pipeline
        return imagery

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="terrabeam-quicklook-imagery") as pool:
        ahead = pool.submit(read)
        yield style, lambda wanted: ahead.result() if wanted == shape else backdrop(wanted)


def _quicklook(
    config: PipelineConfig, tiling: Tiling, made: Provenance, source_items: Sequence[SourceItem]
) -> tuple[QuicklookStyle, Backdrop | None]:
    """The quicklook's look, and the source imagery under it (raster or STAC sources with RGB
    bands: a STAC window's Items composited as for the model)."""
    classes = list(config.model.output_names)
    window = "/".join(made.window) if made.window else "no window"
    style = QuicklookStyle(
        classes,
        class_colors(classes, config.outputs.colors),
        f"{made.pipeline} · run {made.run_id} · {window}",
        config.outputs.quicklook_opacity,
        config.outputs.quicklook_stretch,
    )
    bands = config.quicklook_bands()
    if not bands or config.source.kind == "earthengine":  # no files to read the imagery from
        return style, None
    grid = tiling.grid
    size = (tiling.region_width, tiling.region_height)

    def backdrop(shape: tuple[int, int]) -> tuple:
        if config.source.kind == "stac":
            from terrabeam.sources.stac import read_overview as read_items

            return read_items(config, source_items, bands, grid.crs, grid.transform, size, shape)
        from terrabeam.sources.raster import read_overview

        return read_overview(config, bands, grid.crs, grid.transform, size, shape)

    return style, backdrop
