"""The map sink: prediction bands of keyed patches → one Cloud-Optimized GeoTIFF per tile and layer.

A tile's patches are gathered a strip (one patch row of the tile) at a time and written into raw
scratch files (memory holds a strip per layer, not the tile; no GDAL call until the tile is
complete). Once the tile's last patch is in, each layer becomes a COG through GDAL's COG driver
(reading the scratch through a raw VRT), published atomically: renamed into place in a folder, or
uploaded whole to an object store (an object appears only complete). A tile is done when every
layer's file exists; a resumed run keeps done tiles and writes the others again, byte for byte the
same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import rasterio.shutil
from affine import Affine
from rasterio.features import geometry_mask

from terrabeam import NAMESPACE
from terrabeam.config import PipelineConfig
from terrabeam.errors import InputError, RecordCountError
from terrabeam.gdal_threads import GDAL_IO
from terrabeam.grid import PatchKey
from terrabeam.process_memory import release_free_memory
from terrabeam.sinks.vrt import layer_vrt, write_vrt_file
from terrabeam.tfrecord import RecordWriter, encode_example
from terrabeam.tiling import Tiling

CLASS_NODATA = 255

# What the tiles a run writes look like (encoding, overview levels, tags), for the work folder's
# stamp: a run resumed by a terrabeam whose tiles differ starts its tiles again instead of mixing
# them with the old ones (the mosaic's level VRTs name levels that older tiles lack). Bump it
# whenever the tile writer's output changes. 2: every tile of a VRT-only map has OVERVIEW_COUNT.
TILE_FORMAT = 2


@dataclass(frozen=True)
class MapLayer:
    """One map file: which prediction bands go into it, as what type."""

    stem: str
    bands: list[str]
    dtype: str
    nodata: float
    resampling: str
    descriptions: list[str]
    categories: tuple[str, ...] = ()  # class names by pixel value (GDAL category names)
    colors: tuple[str, ...] = ()  # '#rrggbb' by pixel value (the COG's colour table)


DEFAULT_COLORS = ["#1b9e77", "#f0f0f0", "#4b3f9e", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]


def class_colors(classes: Sequence[str], colors: dict[str, str]) -> list[str]:
    """The configured colour of each class, else one of the built-in palette."""
    return [colors.get(c, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, c in enumerate(classes)]


def map_layers(config: PipelineConfig, bands: Sequence[str]) -> list[MapLayer]:
    """The layers deliver writes for prediction ``bands``: classes (+ probabilities), or values."""
    if "class" not in bands:  # regression: one file with a band per output
        model = config.model
        nodata = model.regression_nodata if model.regression_nodata is not None else float("nan")
        resampling = "average" if model.regression_dtype.startswith("float") else "nearest"
        return [MapLayer("values", list(bands), model.regression_dtype, nodata, resampling, list(bands))]
    classes = [band.removeprefix("prob_") for band in bands if band.startswith("prob_")]
    colors = tuple(class_colors(classes, config.outputs.colors))
    layers = [
        MapLayer("classes", ["class"], "uint8", CLASS_NODATA, "mode", ["class"], tuple(classes), colors)
    ]
    if config.outputs.probabilities:
        prob_bands = [f"prob_{c}" for c in classes]
        layers.append(MapLayer("probabilities", prob_bands, "float32", float("nan"), "average", classes))
    return layers


def tile_file_name(stem: str, layer: MapLayer, tiling: Tiling, tile: int) -> str:
    return f"{stem}-{layer.stem}-{tiling.name(tile)}.tif"


def records_file_name(stem: str, tiling: Tiling, tile: int) -> str:
    """A tile's prediction records (plain TFRecord, tile order), kept until the shards are assembled."""
    return f"{stem}-records-{tiling.name(tile)}.tfrecord"


def cog_options(
    layer: MapLayer,
    compression: str,
    level: int | None,
    overviews: bool = True,
    overview_count: int | None = None,
) -> dict[str, str]:
    """GDAL COG driver options: the codec, 512 px blocks, overviews resampled as the layer needs
    (GDAL's number of levels, ``overview_count`` of them, or none), compression on every core."""
    options = {
        "COMPRESS": compression.upper(),
        "BLOCKSIZE": "512",
        "OVERVIEW_RESAMPLING": layer.resampling.upper(),
        "NUM_THREADS": "ALL_CPUS",
    }
    if not overviews:
        options["OVERVIEWS"] = "NONE"
    elif overview_count:
        options["OVERVIEW_COUNT"] = str(overview_count)
    if level is None and compression == "zstd":
        level = 1
    if level is not None and compression in ("zstd", "deflate"):
        options["LEVEL"] = str(level)
    return options


def _encoding_guard(overviews: bool) -> AbstractContextManager[None]:
    """How a tile's COG encoding shares GDAL with the source's reads in other threads (gdal_threads).

    Without overviews GDAL's COG driver copies the source's blocks straight into the file: no
    dirty block of it sits in the shared block cache for a read elsewhere to flush, so reads go on
    beside it (under load, 0 of 200 such encodings differed from their input where the old scratch
    GeoTIFF lost blocks in 10 of 40; tests/test_gdal_threads.py, BENCHMARKS.md). Overviews are
    computed through that cache in a temporary multi-band GeoTIFF, like that scratch: alone."""
    return GDAL_IO.writing() if overviews else GDAL_IO.reading()


def _raw_dtype(layer: MapLayer) -> np.dtype:
    """The layer's type, little-endian (the raw VRT says so)."""
    return np.dtype(layer.dtype).newbyteorder("<")


class _RawScratch:
    """One layer's scratch file of a tile: raw (bands, rows, cols) little-endian pixels, written a
    strip (a patch row of the tile, full width: contiguous per band) at a time with ``pwrite``.
    Not memory-mapped: the pages stay in the kernel's cache, out of the process's memory. Its blocks
    are allocated first, so a full disk is an OSError naming the file when the tile starts."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, int, int]) -> None:
        self.path, self.dtype, self.shape = path, dtype, shape
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = int(np.prod(shape)) * dtype.itemsize
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, 0, size)
            else:  # no fallocate (macOS): a sparse file
                os.ftruncate(self.fd, size)
        except OSError as exc:
            os.close(self.fd)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc

    def write_rows(self, top: int, pixels: np.ndarray) -> None:
        """(bands, rows, cols = full width) at tile row ``top``."""
        bands, height, width = self.shape
        data = np.ascontiguousarray(pixels, dtype=self.dtype)
        try:
            for band in range(bands):
                offset = (band * height + top) * width * self.dtype.itemsize
                os.pwrite(self.fd, data[band].tobytes(), offset)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Strip:
    """The rows of one patch row of a tile, filled patch by patch, written when all are in."""

    top: int  # tile row
    expected: int  # patches
    pixels: dict[str, np.ndarray]  # layer → (bands, rows, tile width), nodata where not written
    written: int = 0


def _as_dtype(values: np.ndarray, layer: MapLayer) -> np.ndarray:
    """Prediction values in the layer's type: masked (NaN) pixels become its nodata, integers rounded."""
    if np.issubdtype(np.dtype(layer.dtype), np.floating):
        return values.astype(layer.dtype, copy=False)
    info = np.iinfo(layer.dtype)
    if np.issubdtype(values.dtype, np.integer):  # class labels: nothing to round, no NaN
        return np.clip(values, info.min, info.max).astype(layer.dtype)
    rounded = np.clip(np.rint(values), info.min, info.max)
    return np.where(np.isnan(values), layer.nodata, rounded).astype(layer.dtype)


class _TileFile:
    """The scratch pixels of one tile being written, a raw file per layer, turned into
    COGs when complete."""

    def __init__(self, sink: WriteMapTiles, tile: int) -> None:
        self.sink = sink
        self.tile = tile
        self.window = sink.tiling.window(tile)
        self.expected = len(sink.tiling.patches(tile))
        self.written = 0
        self.scratch = Path(tempfile.mkdtemp(prefix="terrabeam-tile-", dir=sink.scratch_root()))
        self.files: dict[str, _RawScratch] = {}
        try:
            for layer in sink.layers:
                shape = (len(layer.bands), self.window.height, self.window.width)
                path = self.scratch / f"{layer.stem}.raw"
                self.files[layer.stem] = _RawScratch(path, _raw_dtype(layer), shape)
        except BaseException:
            self.discard()
            raise
        grid = sink.tiling.grid
        self.strips: dict[int, _Strip] = {}  # by patch row
        for patch_row, first, last in sink.tiling.patch_rows(tile):
            top = patch_row * grid.patch_height - self.window.row_off
            if top < self.window.height:
                self.strips[patch_row] = _Strip(top, last - first, {})
        # With records: the tile's prediction records in tile order, for the interchange shards.
        self.records = RecordWriter(self.scratch / "records.tfrecord", 0) if sink.with_records else None
        self.order = sink.tiling.patches(tile)
        self.pending: dict[int, bytes] = {}

    def _add_record(self, index: int, features: dict[str, np.ndarray]) -> None:
        """Write records in tile order, holding back any that arrive ahead of their turn."""
        assert self.records is not None
        self.pending[index] = encode_example(features)
        while self.records.records < len(self.order) and self.order[self.records.records] in self.pending:
            self.records.write(self.pending.pop(self.order[self.records.records]))

    def add(self, key: PatchKey, features: dict[str, np.ndarray]) -> None:
        """Write the part of a patch's core that lies in the region (and its record)."""
        sink, grid = self.sink, self.sink.tiling.grid
        if self.records is not None:
            self._add_record(key.index, features)
        window = grid.patch_window(key.index)
        rows = min(window.height, sink.tiling.region_height - window.row_off)
        cols = min(window.width, sink.tiling.region_width - window.col_off)
        self.written += 1
        patch_row = key.index // grid.patches_per_row
        if rows <= 0 or cols <= 0:  # a padding patch wholly outside the true region
            self._counted(patch_row)
            return
        strip = self.strips[patch_row]
        if not strip.pixels:
            strip_rows = min(grid.patch_height, self.window.height - strip.top)
            strip.pixels = {
                layer.stem: np.full(
                    (len(layer.bands), strip_rows, self.window.width), layer.nodata, _raw_dtype(layer)
                )
                for layer in sink.layers
            }
        left = window.col_off - self.window.col_off
        outside = None
        if sink.polygon is not None:
            transform = grid.transform @ Affine.translation(window.col_off, window.row_off)
            outside = geometry_mask([sink.polygon], out_shape=(rows, cols), transform=transform)
            outside = outside if outside.any() else None
        shape = (grid.patch_height, grid.patch_width)
        for layer in sink.layers:
            missing = [b for b in layer.bands if b not in features]
            if missing:
                raise InputError(
                    f"patch {key.index}: prediction bands {missing} missing; has {sorted(features)}"
                )
            values = np.stack([np.asarray(features[b]).reshape(shape)[:rows, :cols] for b in layer.bands])
            if outside is not None:  # NaN becomes each layer's nodata
                values = values.astype(np.float32)
                values[:, outside] = np.nan
            strip.pixels[layer.stem][:, :rows, left : left + cols] = _as_dtype(values, layer)
        self._counted(patch_row)

    def _counted(self, patch_row: int) -> None:
        """One more patch of ``patch_row`` is in; a complete strip goes to the scratch files."""
        strip = self.strips.get(patch_row)
        if strip is None:
            return  # a patch row below the true region
        strip.written += 1
        if strip.written == strip.expected:
            for stem, pixels in strip.pixels.items():
                self.files[stem].write_rows(strip.top, pixels)
            del self.strips[patch_row]

    @property
    def complete(self) -> bool:
        return self.written == self.expected

    def _raw_vrt(self, layer: MapLayer) -> Path:
        """A VRT reading ``layer``'s raw scratch file, georeferenced as the tile."""
        sink = self.sink
        grid, scratch = sink.tiling.grid, self.files[layer.stem]
        height, width = scratch.shape[1:]
        size = scratch.dtype.itemsize

        def add_raw(band: ET.Element, number: int) -> None:
            ET.SubElement(band, "SourceFilename", relativeToVRT="1").text = f"{layer.stem}.raw"
            ET.SubElement(band, "ImageOffset").text = str((number - 1) * height * width * size)
            ET.SubElement(band, "PixelOffset").text = str(size)
            ET.SubElement(band, "LineOffset").text = str(width * size)
            ET.SubElement(band, "ByteOrder").text = "LSB"

        transform = grid.transform @ Affine.translation(self.window.col_off, self.window.row_off)
        root = layer_vrt(width, height, grid.crs, transform, layer, add_raw, "VRTRawRasterBand", sink.tags)
        return write_vrt_file(root, self.scratch / f"{layer.stem}.vrt")

    def publish(self) -> int:
        """Each layer's scratch → COG under a temporary name → its final name; returns patches."""
        sink = self.sink
        try:
            if self.records is not None:  # before the layers: a tile with all layers is done
                self.records.close()
                sink.publish_file(self.records.path, records_file_name(sink.stem, sink.tiling, self.tile))
            assert not self.strips, f"tile {self.tile}: patch rows {sorted(self.strips)} incomplete"
            for layer in sink.layers:
                self.files[layer.stem].close()
                source = self._raw_vrt(layer)
                name = tile_file_name(sink.stem, layer, sink.tiling, self.tile)
                partial = self.scratch / f"{name}.partial"
                options = cog_options(
                    layer, sink.compression, sink.compression_level, sink.overviews, sink.overview_count
                )
                with _encoding_guard(sink.overviews):
                    rasterio.shutil.copy(source, partial, driver="COG", **options)
                sidecar = partial.with_name(f"{partial.name}.aux.xml")  # GDAL's: class names
                if sidecar.exists():  # before the COG: a tile whose COG exists is done
                    sink.publish_file(sidecar, f"{name}.aux.xml")
                sink.publish_file(partial, name)
        finally:
            for scratch in self.files.values():
                scratch.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
            # the encoder's buffers are free again; glibc would keep them, and a run's memory would
            # creep up tile after tile (~10 ms, BENCHMARKS.md)
            release_free_memory(collect=False)
        return self.written

    def discard(self) -> None:
        for scratch in getattr(self, "files", {}).values():
            scratch.close()
        if getattr(self, "records", None) is not None:
            self.records.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class WriteMapTiles(beam.DoFn):
    """(PatchKey, prediction bands) → the COGs of every tile, each written once its patches are in.

    Patches of a tile normally arrive in one bundle (a tile is read by one task); ``grouped``
    input, (tile, [(PatchKey, bands)]) after a GroupByKey, serves sources whose order differs.
    With ``WRITE_BEHIND`` > 0 a complete tile is encoded and published in a background thread while
    the next tile's patches go through the model (at most that many wait; the bundle ends only when
    all are published).
    Without ``overviews`` the tiles are COGs of full resolution only: for a map whose single COG,
    assembled from the tiles, carries the overviews (they cost about 2/3 of a tile's encoding).
    ``overview_count``: that many levels in every tile, small ones too, so that the mosaic's VRT
    can expose them (sinks/mosaic.py); otherwise GDAL's own count.
    """

    # One tile encoded behind the model: ~1.4x faster whole runs with the light model (I/O-bound),
    # no gain with the U-Net (model-bound; BENCHMARKS.md). Safe since the scratch is raw files
    # outside GDAL, and a tile with overviews encodes only while no GDAL read runs elsewhere
    # (_encoding_guard, gdal_threads).
    WRITE_BEHIND = 1

    def __init__(
        self,
        out_dir: str,
        stem: str,
        layers: Sequence[MapLayer],
        tiling: Tiling,
        polygon: dict | None,
        compression: tuple[str, int | None],
        grouped: bool = False,
        with_records: bool = False,
        overviews: bool = True,
        tags: dict[str, str] | None = None,
        overview_count: int | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.overviews = overviews
        self.overview_count = overview_count
        self.tags = dict(tags or {})
        self.with_records = with_records
        self.compression, self.compression_level = compression
        self.stem = stem
        self.layers = list(layers)
        self.tiling = tiling
        self.polygon = polygon
        self.grouped = grouped
        self.tiles_written = beam.metrics.Metrics.counter(NAMESPACE, "tiles_written")
        self.patches_written = beam.metrics.Metrics.counter(NAMESPACE, "patches_written")
        self._open: dict[int, _TileFile] = {}
        self._behind: deque[Future[int]] = deque()
        self._writer: ThreadPoolExecutor | None = None

    def scratch_root(self) -> str | None:
        """Scratch files beside the tiles in a local folder (so the final rename stays on one file
        system), in the temporary folder for an object store."""
        return None if "://" in self.out_dir else self.out_dir

    def publish_file(self, partial: Path, name: str) -> None:
        if "://" in self.out_dir:
            from terrabeam.storage import copy_file

            copy_file(str(partial), f"{self.out_dir.rstrip('/')}/{name}")
        else:
            os.replace(partial, Path(self.out_dir) / name)

    def setup(self) -> None:
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terrabeam-tile-writer")

    def start_bundle(self) -> None:
        self._open = {}
        self._behind = deque()

    def process(self, element) -> None:
        if self.grouped:
            tile, patches = element
            for key, features in sorted(patches, key=lambda kv: kv[0].index):
                self._add(tile, key, features)
            return
        key, features = element
        self._add(self.tiling.tile_of(key.index), key, features)

    def _add(self, tile: int, key: PatchKey, features: dict[str, np.ndarray]) -> None:
        file = self._open.get(tile)
        if file is None:
            file = self._open[tile] = _TileFile(self, tile)
        file.add(key, features)
        if file.complete:
            del self._open[tile]
            if not self.WRITE_BEHIND:
                self.patches_written.inc(file.publish())
                self.tiles_written.inc()
                return
            while len(self._behind) >= self.WRITE_BEHIND:
                self._published(self._behind.popleft())
            if self._writer is None:  # a DoFn used without setup (direct calls in tests)
                self.setup()
            self._behind.append(self._writer.submit(file.publish))

    def _published(self, future: Future[int]) -> None:
        """Wait for one tile's publication; counted here, in the bundle's thread (Beam's metrics
        are per bundle and thread)."""
        self.patches_written.inc(future.result())
        self.tiles_written.inc()

    def _drain(self) -> None:
        """Wait for every tile behind; the first error is raised after all have ended."""
        error = None
        while self._behind:
            try:
                self._published(self._behind.popleft())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def finish_bundle(self) -> None:
        incomplete = sorted(self._open)
        for file in self._open.values():
            file.discard()
        self._open = {}
        self._drain()
        if incomplete:
            raise RecordCountError(
                f"tiles {incomplete[:5]} did not receive all their patches in one bundle; "
                "group the patches by tile first (grouped=True)"
            )

    def teardown(self) -> None:
        for file in self._open.values():
            file.discard()
        if self._writer is not None:
            self._writer.shutdown(wait=True, cancel_futures=True)
            self._writer = None


class WriteMap(beam.PTransform):
    """(PatchKey, prediction bands) → map tiles in ``out_dir`` (a folder or a URI); with
    ``group_by_tile`` the patches of each tile are brought together first (for sources that spread
    a tile's patches over bundles, e.g. shards in row-major order on several workers)."""

    def __init__(
        self,
        out_dir: str,
        stem: str,
        layers: Sequence[MapLayer],
        tiling: Tiling,
        polygon: dict | None,
        compression: tuple[str, int | None],
        group_by_tile: bool,
        with_records: bool = False,
        overviews: bool = True,
        tags: dict[str, str] | None = None,
        overview_count: int | None = None,
    ) -> None:
        super().__init__()
        self.sink = WriteMapTiles(
            out_dir,
            stem,
            layers,
            tiling,
            polygon,
            compression,
            group_by_tile,
            with_records,
            overviews,
            tags,
            overview_count,
        )
        self.group_by_tile = group_by_tile

    def expand(self, predictions: beam.PCollection) -> beam.PCollection:
        if not self.group_by_tile:
            return predictions | "WriteMapTiles" >> beam.ParDo(self.sink)
        tiling = self.sink.tiling
        return (
            predictions
            | "KeyByTile" >> beam.Map(lambda kv: (tiling.tile_of(kv[0].index), kv))
            | "GroupByTile" >> beam.GroupByKey()
            | "WriteMapTiles" >> beam.ParDo(self.sink)
        )


def finished_tiles(
    files: Iterable[str], stem: str, layers: Sequence[MapLayer], tiling: Tiling, with_records: bool
) -> set[int]:
    """Tiles all of whose files are among ``files`` (names in the tiles folder)."""
    present = set(files)
    return {
        tile
        for tile in range(tiling.count)
        if all(tile_file_name(stem, layer, tiling, tile) in present for layer in layers)
        and (not with_records or records_file_name(stem, tiling, tile) in present)
    }
