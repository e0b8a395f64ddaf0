"""The raster source: GDAL-readable rasters warped onto the target grid, scaled, derived, cut into
patches, as a Beam transform (read on the workers) or as the export step's Earth Engine-layout files.

Reads one block of patches at a time (one patch row of a tile, or at most ~2048 px wide, plus the
kernel margin), so memory does not depend on the scene's size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import apache_beam as beam
import numexpr
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from terrabeam import NAMESPACE
from terrabeam.config import PipelineConfig
from terrabeam.errors import GridMismatchError, InputError
from terrabeam.gdal_threads import GDAL_IO
from terrabeam.grid import Grid, PatchKey
from terrabeam.layout import ExportManifest, ShardedWriter, manifest_path, mixer_path
from terrabeam.progress import Progress
from terrabeam.region import TargetRegion, anchor, region_bounds, snap
from terrabeam.tfrecord import encode_example
from terrabeam.tiling import Tiling

BLOCK_WIDTH = 2048  # pixels of patch cores read per block


def _open(path: str, name: str) -> rasterio.DatasetReader:
    if "://" not in path and not path.startswith("/vsi") and not Path(path).exists():
        raise InputError(f"source.bands.{name}.path: file not found: {path}")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"source.bands.{name}.path: cannot read {path} ({exc})") from None


def open_band(config: PipelineConfig, name: str) -> rasterio.DatasetReader:
    """Open source band ``name`` (metadata only until read) after checking what placing it on a grid
    needs: the file, the band inside it, a CRS."""
    spec = config.source.bands[name]
    ds = _open(config.locate(spec.path), name)
    if spec.band > ds.count:
        ds.close()
        raise InputError(f"source.bands.{name}.band = {spec.band}: {ds.name} has only {ds.count} band(s)")
    if ds.crs is None:
        ds.close()
        raise GridMismatchError(f"source.bands.{name}.path: {ds.name} has no CRS; cannot place it on a grid")
    return ds


def check_overlap(ds: rasterio.DatasetReader, name: str, grid: Grid) -> None:
    """Fail unless band ``name`` covers some of the grid: else the map would be all fill."""
    left, top = grid.xy(0, 0)
    right, bottom = grid.xy(grid.width, grid.height)
    src_bounds = transform_bounds(ds.crs, grid.crs, *ds.bounds)
    if not (
        src_bounds[0] < right and src_bounds[2] > left and src_bounds[1] < top and src_bounds[3] > bottom
    ):
        raise GridMismatchError(
            f"source.bands.{name}.path: {ds.name} (extent {tuple(round(v, 3) for v in src_bounds)} in "
            f"{grid.crs}) does not overlap the region {(left, bottom, right, top)}; check grid.crs and grid.region"
        )


def target_region(config: PipelineConfig) -> TargetRegion:
    """Resolve CRS, resolution and region (defaults from the first band) and snap them to whole pixels
    of ``grid.align``: by default the first band's own grid, so it is read without resampling."""
    name = next(iter(config.source.bands))
    with open_band(config, name) as first:
        crs = CRS.from_user_input(config.grid.crs) if config.grid.crs else first.crs
        same_crs = crs == first.crs
        resolution = config.grid.resolution
        if resolution is None:
            if not same_crs:
                raise GridMismatchError(
                    f"grid.resolution is required: grid.crs {config.grid.crs} differs from "
                    f"{first.name}'s CRS {first.crs}"
                )
            resolution = (abs(first.transform.a), abs(first.transform.e))
        xres, yres = resolution if isinstance(resolution, tuple) else (resolution, resolution)
        bounds = region_bounds(config, crs) or transform_bounds(first.crs, crs, *first.bounds)
        through = anchor(config.grid.align or "source", first.transform if same_crs else None)
    return snap(crs, (xres, yres), bounds, through)


def export_grid(config: PipelineConfig) -> tuple[Grid, TargetRegion]:
    """The patch grid (padded to whole patches) and the true region it covers."""
    region = target_region(config)
    grid = Grid.covering(region.crs, region.transform, region.width, region.height, config.grid.patch_size)
    return grid, region


class _BandReader:
    """One source band warped onto the padded export grid, read strip by strip as scaled float32."""

    def __init__(self, config: PipelineConfig, name: str, grid: Grid, kernel: tuple[int, int]):
        spec = config.source.bands[name]
        self.name = name
        self.spec = spec
        self.fill = config.source.fill_value
        self.dataset = ds = open_band(config, name)
        try:
            check_overlap(ds, name, grid)
        except GridMismatchError:
            ds.close()
            raise
        kw, kh = kernel
        nodata = config.source.nodata if config.source.nodata is not None else ds.nodatavals[spec.band - 1]
        self.vrt = WarpedVRT(
            ds,
            crs=grid.crs,
            transform=grid.transform @ Affine.translation(-kw // 2, -kh // 2),
            width=grid.width + kw,
            height=grid.height + kh,
            resampling=Resampling[config.source.resampling],
            src_nodata=nodata,
            nodata=nodata,
            add_alpha=nodata is None,
        )
        # Without a nodata value GDAL marks warped coverage in an added alpha band (the last one);
        # the bands' own masks then claim every pixel valid.
        self.alpha_band = self.vrt.count if nodata is None else None
        same_crs = CRS.from_user_input(grid.crs) == ds.crs
        resampling = Resampling[config.source.resampling]
        self.direct = (
            _direct_read(ds, spec.band, self.vrt.transform, resampling, nodata) if same_crs else None
        )

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(values, valid) for ``window`` of the padded grid; invalid pixels hold the fill value."""
        direct = self.direct.read(self.dataset, self.spec.band, window) if self.direct else None
        if direct is not None:
            raw, valid = direct
        else:
            raw = self.vrt.read(self.spec.band, window=window, out_dtype="float32")
            if self.alpha_band is not None:
                valid = self.vrt.read(self.alpha_band, window=window) > 0
            else:
                valid = self.vrt.read_masks(self.spec.band, window=window) > 0
        values = raw * np.float32(self.spec.scale) + np.float32(self.spec.offset)
        values[~valid] = self.fill
        return values, valid

    def close(self) -> None:
        self.vrt.close()
        self.dataset.close()


@dataclass(frozen=True)
class _DirectRead:
    """A band whose pixels nest exactly in the grid's (same CRS, north-up, grid pixel = k × k band
    pixels, edges on band pixel edges): windows are read with GDAL's RasterIO (decimated for k > 1),
    ~10× cheaper than the warp kernel (BENCHMARKS.md). Grid pixels wholly outside the band are
    invalid, as the warp makes them; a window holding a grid pixel that the band covers only in
    part (band size not a multiple of k) goes through the warp."""

    col_off: int  # band pixel of the padded grid's (0, 0)
    row_off: int
    factor: int
    resampling: Resampling

    def read(
        self, ds: rasterio.DatasetReader, band: int, window: Window
    ) -> tuple[np.ndarray, np.ndarray] | None:
        k = self.factor
        gx, gy = int(window.col_off), int(window.row_off)
        width, height = int(window.width), int(window.height)
        # grid pixels (of the padded grid) that the band covers whole: [x0, x1) × [y0, y1)
        x0, x1 = -(self.col_off // k), (ds.width - self.col_off) // k
        y0, y1 = -(self.row_off // k), (ds.height - self.row_off) // k
        # a grid pixel the band covers in part (its edge not on a grid pixel edge) needs the warp
        partial_x = [x for x, cut in ((x0 - 1, self.col_off % k), (x1, (ds.width - self.col_off) % k)) if cut]
        partial_y = [
            y for y, cut in ((y0 - 1, self.row_off % k), (y1, (ds.height - self.row_off) % k)) if cut
        ]
        if any(gx <= x < gx + width for x in partial_x) or any(gy <= y < gy + height for y in partial_y):
            return None
        values = np.zeros((height, width), np.float32)
        valid = np.zeros((height, width), bool)
        left, right = max(gx, x0), min(gx + width, x1)
        top, bottom = max(gy, y0), min(gy + height, y1)
        if left >= right or top >= bottom:
            return values, valid
        inner = (slice(top - gy, bottom - gy), slice(left - gx, right - gx))
        source = Window(
            self.col_off + left * k, self.row_off + top * k, (right - left) * k, (bottom - top) * k
        )
        shape = (bottom - top, right - left)
        whole = inner == (slice(0, height), slice(0, width))
        out = values if whole else np.empty(shape, np.float32)  # whole window inside: read in place
        ds.read(band, window=source, out=out, resampling=self.resampling)
        if out is not values:
            values[inner] = out
        valid[inner] = ds.read_masks(band, window=source) > 0 if k == 1 else True
        return values, valid


def _direct_read(
    ds: rasterio.DatasetReader, index: int, grid: Affine, resampling: Resampling, nodata: float | None
) -> _DirectRead | None:
    """A direct read of ``ds`` onto the padded grid ``grid`` where it gives what the warp gives: same
    CRS is checked by the caller's grid; pixels nest exactly; decimation only where every band pixel
    is valid (no nodata, no mask), since the warp weighs masked pixels out of an average, and not
    with lanczos."""
    band = ds.transform
    if band.b or band.d or grid.b or grid.d or band.e >= 0 or grid.e >= 0:
        return None
    factor_x, factor_y = grid.a / band.a, grid.e / band.e
    col, row = (grid.c - band.c) / band.a, (grid.f - band.f) / band.e
    values = (factor_x, factor_y, col, row)
    if any(abs(v - round(v)) > 1e-9 for v in values) or round(factor_x) != round(factor_y) or factor_x < 1:
        return None
    factor = round(factor_x)
    masked = nodata is not None or any(flag != MaskFlags.all_valid for flag in ds.mask_flag_enums[index - 1])
    # lanczos decimation differs between RasterIO and the warp (tests/test_direct_read.py)
    if factor > 1 and (masked or resampling == Resampling.lanczos):
        return None
    return _DirectRead(round(col), round(row), factor, resampling)


def block_window(grid: Grid, kernel: tuple[int, int], row: int, first: int, last: int) -> Window:
    """The padded grid's window of patches ``first``..``last - 1`` of patch row ``row``, margins
    included."""
    kw, kh = kernel
    pw, ph = grid.patch_width, grid.patch_height
    return Window(first * pw, row * ph, (last - first) * pw + kw, ph + kh)


def block_patches(
    grid: Grid, kernel: tuple[int, int], row: int, first: int, last: int, bands: dict[str, np.ndarray]
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """A block's bands cut into its patches (views, margins overlapping): (grid index, bands)."""
    kw = kernel[0]
    pw = grid.patch_width
    patches = []
    for col in range(first, last):
        x0 = (col - first) * pw
        patches.append(
            (row * grid.patches_per_row + col, {n: v[:, x0 : x0 + pw + kw] for n, v in bands.items()})
        )
    return patches


def add_derived(
    bands: dict[str, np.ndarray], derived: dict[str, str], valid: np.ndarray, fill: float
) -> None:
    """Derived bands (numexpr over the bands before them) into ``bands``; ``fill`` where a source
    band is invalid or the expression is not finite."""
    for name, expression in derived.items():
        with np.errstate(all="ignore"):
            values = numexpr.evaluate(expression, local_dict=dict(bands)).astype(np.float32)
        values[~valid | ~np.isfinite(values)] = np.float32(fill)
        bands[name] = values


class RasterPatchReader:
    """Every source band on the padded grid, read a block of patches at a time (the bands of a block
    in parallel threads: GDAL releases the GIL while it reads and warps), with derived bands."""

    def __init__(self, config: PipelineConfig, grid: Grid, kernel: tuple[int, int]) -> None:
        self.config = config
        self.grid = grid
        self.kernel = kernel
        self._stack = ExitStack()
        try:
            self.readers: list[_BandReader] = []
            for name in config.source.bands:
                self.readers.append(_BandReader(config, name, grid, kernel))
                self._stack.callback(self.readers[-1].close)
            self._pool = ThreadPoolExecutor(max_workers=min(len(self.readers), os.cpu_count() or 1))
            self._stack.callback(self._pool.shutdown)
        except BaseException:
            self._stack.close()
            raise

    def read_window(self, window: Window) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({band: (h, w) float32}, valid in every band) of the source bands over ``window`` of the
        padded grid; invalid pixels hold the fill value."""
        bands: dict[str, np.ndarray] = {}
        valid_all = None
        with GDAL_IO.reading():  # no GDAL file is written meanwhile (gdal_threads)
            reads = list(self._pool.map(_BandReader.read, self.readers, [window] * len(self.readers)))
        for reader, (values, valid) in zip(self.readers, reads, strict=True):
            bands[reader.name] = values
            valid_all = valid if valid_all is None else valid_all & valid
        assert valid_all is not None
        return bands, valid_all

    def read_block(self, row: int, first: int, last: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        """(grid index, {band: (H + kh, W + kw) float32}) of patches ``first``..``last - 1`` of patch
        row ``row``; the arrays are views into one block."""
        bands, valid = self.read_window(block_window(self.grid, self.kernel, row, first, last))
        source = self.config.source
        add_derived(bands, source.derived, valid, source.fill_value)
        return block_patches(self.grid, self.kernel, row, first, last, bands)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> RasterPatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_overview(
    config: PipelineConfig,
    bands: list[str],
    crs: object,
    transform: Affine,
    size: tuple[int, int],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Source ``bands`` over the region (``size`` = width × height pixels at ``transform``),
    averaged down to ``shape`` (height, width): (bands, h, w) float32 scaled values and where every
    band is valid. A band in the region's CRS is read decimated (GDAL uses its overviews); any
    other is warped. For the quicklook's imagery, not for the model."""
    width, height = size
    target = transform * Affine.scale(width / shape[1], height / shape[0])
    values, valid = [], np.ones(shape, bool)
    for name in bands:
        spec = config.source.bands[name]
        with open_band(config, name) as ds:
            nodata = (
                config.source.nodata if config.source.nodata is not None else ds.nodatavals[spec.band - 1]
            )
            if CRS.from_user_input(crs) == ds.crs:
                left, top = transform * (0, 0)
                right, bottom = transform * (width, height)
                window = from_bounds(left, bottom, right, top, ds.transform)
                kwargs = {"window": window, "out_shape": shape, "boundless": True}
                raw = ds.read(spec.band, out_dtype="float32", resampling=Resampling.average, **kwargs)
                seen = ds.read_masks(spec.band, **kwargs) > 0
            else:
                with WarpedVRT(
                    ds,
                    crs=crs,
                    transform=target,
                    width=shape[1],
                    height=shape[0],
                    resampling=Resampling.average,
                    src_nodata=nodata,
                    nodata=nodata,
                    add_alpha=nodata is None,
                ) as vrt:
                    raw = vrt.read(spec.band, out_dtype="float32")
                    seen = (vrt.read(vrt.count) if nodata is None else vrt.read_masks(spec.band)) > 0
        values.append(raw * np.float32(spec.scale) + np.float32(spec.offset))
        valid &= seen
    return np.stack(values), valid


@dataclass(frozen=True)
class ExportResult:
    grid: Grid
    manifest: ExportManifest
    shards: list[Path]


def export_blocks(grid: Grid) -> Iterator[tuple[int, int, int]]:
    """(patch row, first column, column after the last) of each block of patches read at once, in
    patch order: one patch row, at most ~BLOCK_WIDTH pixels wide."""
    per_block = max(1, BLOCK_WIDTH // grid.patch_width)
    for row in range(grid.patch_rows):
        in_row = min(grid.patches_per_row, grid.total_patches - row * grid.patches_per_row)
        for first in range(0, in_row, per_block):
            yield row, first, min(in_row, first + per_block)


def export_rasters(config: PipelineConfig, out_dir: Path) -> ExportResult:
    """Write Earth Engine-layout shards, mixer and manifest for the configured rasters into ``out_dir``."""
    grid, region = export_grid(config)
    return export_patches(
        config, out_dir, grid, region, RasterPatchReader(config, grid, config.grid.kernel_size)
    )


def export_patches(
    config: PipelineConfig, out_dir: Path, grid: Grid, region: TargetRegion, reader: RasterPatchReader
) -> ExportResult:
    """Write Earth Engine-layout shards, mixer and manifest of ``reader``'s patches (closed after)
    into ``out_dir``, in grid order; a reader with ``read_ahead`` has that many blocks in flight."""
    kernel = config.grid.kernel_size
    writer = ShardedWriter(
        out_dir, config.export.prefix, config.export.max_file_size, config.export.compression_level
    )
    depth = max(1, getattr(reader, "read_ahead", 1))
    with ExitStack() as stack:
        stack.callback(writer.close)
        stack.enter_context(reader)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=depth))
        progress = stack.enter_context(Progress("export", grid.total_patches))
        for patches in read_ahead(pool, reader, export_blocks(grid), depth):
            for _, patch in patches:
                writer.write(encode_example(patch))
                progress.advance()
    grid.write_mixer(mixer_path(out_dir, config.export.prefix))
    manifest = ExportManifest(
        kernel_size=list(kernel),
        region_width=region.width,
        region_height=region.height,
        bands=config.source.band_names,
        shard_records=writer.counts,
    )
    manifest.write(manifest_path(out_dir, config.export.prefix))
    return ExportResult(grid, manifest, writer.paths)


def read_ahead(
    pool: ThreadPoolExecutor, reader: RasterPatchReader, blocks: Iterable[tuple[int, int, int]], depth: int
) -> Iterator[list[tuple[int, dict[str, np.ndarray]]]]:
    """``reader.read_block`` of each block, in order, with ``depth`` blocks read ahead in ``pool``."""
    blocks = iter(blocks)
    pending = deque(pool.submit(reader.read_block, *block) for block in islice(blocks, depth))
    while pending:
        patches = pending.popleft().result()
        for block in islice(blocks, 1):
            pending.append(pool.submit(reader.read_block, *block))
        yield patches


class _ReadTilePatches(beam.DoFn):
    """Tile number → (PatchKey, {band: patch}) for every patch of the tile, read on the worker.

    The next block of patches is read in a background thread while the current one flows on to
    the model, so reading overlaps the model on one machine (both release the GIL); a tile with
    overviews waits for it before its encoding (gdal_threads).
    """

    def __init__(self, open_reader: Callable[[], RasterPatchReader], tiling: Tiling) -> None:
        self.open_reader = open_reader  # a reader of blocks: rasters, or a STAC source's Items
        self.tiling = tiling
        self.patches_read = beam.metrics.Metrics.counter(NAMESPACE, "patches_read")

    def setup(self) -> None:
        self._reader = self.open_reader()
        # blocks read ahead: one for files; a network source may ask for more (its latency)
        self._depth = max(1, getattr(self._reader, "read_ahead", 1))
        self._ahead = ThreadPoolExecutor(max_workers=self._depth)

    def process(self, tile: int) -> Iterator[tuple[PatchKey, dict[str, np.ndarray]]]:
        blocks = self.tiling.patch_rows(tile)
        for patches in read_ahead(self._ahead, self._reader, blocks, self._depth):
            for index, patch in patches:
                self.patches_read.inc()
                yield PatchKey(index, 0, index), patch

    def teardown(self) -> None:
        self._ahead.shutdown()
        self._reader.close()


class ReadRasterPatches(beam.PTransform):
    """The patches of the given tiles, read from the configured rasters by the workers (or by
    ``open_reader``'s reader: the STAC source reads its Items' assets the same way).

    Tile numbers are the unit of work: with ``reshuffle`` they are spread over the runner's workers
    first, and every patch of a tile stays on the worker that read it (no patch is shuffled).
    """

    def __init__(
        self,
        config: PipelineConfig,
        grid: Grid,
        tiling: Tiling,
        tiles: list[int],
        reshuffle: bool,
        open_reader: Callable[[], RasterPatchReader] | None = None,
    ):
        super().__init__()
        self.tiling, self.tiles, self.reshuffle = tiling, tiles, reshuffle
        self.open_reader = open_reader or partial(RasterPatchReader, config, grid, config.grid.kernel_size)

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        tiles = pipeline | "Tiles" >> beam.Create(self.tiles, reshuffle=self.reshuffle)
        return tiles | "ReadTilePatches" >> beam.ParDo(_ReadTilePatches(self.open_reader, self.tiling))
