"""Deliver step to files: prediction shards + mixer → class-map and probability COGs and a quicklook PNG.

Patches are written one at a time into tiled GeoTIFFs cropped to the true region, which rio-cogeo
then turns into Cloud-Optimized GeoTIFFs; memory holds one patch, not the map.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from terrabeam.config import PipelineConfig
from terrabeam.errors import InputError, RecordCountError
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, list_shards, manifest_path, mixer_path
from terrabeam.progress import Progress
from terrabeam.region import projected_geometry
from terrabeam.tfrecord import decode_example, read_records

CLASS_NODATA = 255
QUICKLOOK_MAX_SIDE = 1024
_DEFAULT_COLORS = ["#1b9e77", "#f0f0f0", "#4b3f9e", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]


def _tiled_profile(grid: Grid, width: int, height: int, count: int, dtype: str, nodata) -> dict:
    """An uncompressed tiled GeoTIFF: a scratch file read once by the COG conversion, which compresses."""
    return {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "nodata": nodata,
        "crs": grid.crs,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }


def _hex_to_rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


@dataclass(frozen=True)
class _Layer:
    """One output file: which prediction bands go into it, as what type."""

    stem: str
    bands: list[str]
    dtype: str
    nodata: float
    resampling: str
    descriptions: list[str]


def _layers(config: PipelineConfig, bands: list[str]) -> list[_Layer]:
    outputs = config.outputs
    if "class" not in bands:  # regression: one float file with a band per output
        model = config.model
        nodata = model.regression_nodata if model.regression_nodata is not None else float("nan")
        resampling = "average" if model.regression_dtype.startswith("float") else "nearest"
        return [_Layer("values", bands, model.regression_dtype, nodata, resampling, bands)]
    classes = [band.removeprefix("prob_") for band in bands if band.startswith("prob_")]
    layers = [_Layer("classes", ["class"], "uint8", CLASS_NODATA, "mode", ["class"])]
    if outputs.probabilities:
        prob_bands = [f"prob_{c}" for c in classes]
        layers.append(_Layer("probabilities", prob_bands, "float32", float("nan"), "average", classes))
    return layers


def _as_dtype(values: np.ndarray, layer: _Layer) -> np.ndarray:
    """Prediction floats in the layer's type: masked (NaN) pixels become its nodata, integers rounded."""
    if np.issubdtype(np.dtype(layer.dtype), np.floating):
        return values.astype(layer.dtype, copy=False)
    info = np.iinfo(layer.dtype)
    rounded = np.clip(np.rint(values), info.min, info.max)
    return np.where(np.isnan(values), layer.nodata, rounded).astype(layer.dtype)


def _outside(polygon: dict, grid: Grid, target: Window) -> np.ndarray | None:
    """Pixels of ``target`` whose centre lies outside the region polygon (None if there are none)."""
    transform = grid.transform @ Affine.translation(target.col_off, target.row_off)
    outside = geometry_mask([polygon], out_shape=(target.height, target.width), transform=transform)
    return outside if outside.any() else None


def deliver_geotiff(config: PipelineConfig, predict_dir: Path, out_dir: Path) -> list[Path]:
    """Assemble the prediction shards in ``predict_dir`` into the configured outputs in ``out_dir``."""
    prefix = config.predict.prefix
    grid = Grid.read_mixer(mixer_path(predict_dir, prefix))
    manifest = ExportManifest.read(manifest_path(predict_dir, prefix))
    width, height = manifest.region_width, manifest.region_height
    shards = list_shards(predict_dir, prefix)
    outputs = config.outputs
    stem = config.name
    layers = _layers(config, manifest.bands)
    # A GeoJSON region is exported as its bounding box; pixels outside the polygon become nodata.
    polygon = projected_geometry(config, grid.crs)
    raw = {layer.stem: out_dir / f".{stem}-{layer.stem}.raw.tif" for layer in layers}
    shape = (grid.patch_height, grid.patch_width)
    index = 0
    with ExitStack() as stack:
        files = {
            layer.stem: stack.enter_context(
                rasterio.open(
                    raw[layer.stem],
                    "w",
                    **_tiled_profile(grid, width, height, len(layer.bands), layer.dtype, layer.nodata),
                )
            )
            for layer in layers
        }
        progress = stack.enter_context(Progress("deliver", grid.total_patches))
        for shard in shards:
            for position, payload in enumerate(read_records(shard)):
                if index >= grid.total_patches:
                    raise RecordCountError(
                        f"{shard}: more records than totalPatches={grid.total_patches} in the mixer"
                    )
                try:
                    features = decode_example(payload)
                except ValueError as exc:
                    raise InputError(f"{shard} record {position}: {exc}") from None
                window = grid.patch_window(index)
                rows = min(window.height, height - window.row_off)
                cols = min(window.width, width - window.col_off)
                index += 1
                progress.advance()
                if rows <= 0 or cols <= 0:
                    continue  # a padding patch wholly outside the true region
                target = Window(window.col_off, window.row_off, cols, rows)
                outside = _outside(polygon, grid, target) if polygon is not None else None
                for layer in layers:
                    missing = [b for b in layer.bands if b not in features]
                    if missing:
                        raise InputError(
                            f"{shard} record {position}: bands {missing} missing; has {sorted(features)}"
                        )
                    values = np.stack(
                        [np.asarray(features[b]).reshape(shape)[:rows, :cols] for b in layer.bands]
                    )
                    if outside is not None:  # NaN becomes each layer's nodata
                        values = values.astype(np.float32)
                        values[:, outside] = np.nan
                    files[layer.stem].write(_as_dtype(values, layer), window=target)
    if index != grid.total_patches:
        raise RecordCountError(
            f"{mixer_path(predict_dir, prefix)}: totalPatches={grid.total_patches} but the shards in "
            f"{predict_dir} hold {index} records"
        )

    written = []
    for layer in layers:
        if layer.stem == "classes" and not outputs.class_map:
            continue
        path = out_dir / f"{stem}-{layer.stem}.tif"
        tags = {"bands": ",".join(layer.descriptions)}
        _to_cog(raw[layer.stem], path, layer.resampling, tags, layer.descriptions)  # one at a time: memory
        written.append(path)
    if outputs.quicklook and "classes" in raw:
        classes = [b.removeprefix("prob_") for b in manifest.bands if b.startswith("prob_")]
        path = out_dir / f"{stem}-quicklook.png"
        colors = [
            outputs.colors.get(c, _DEFAULT_COLORS[i % len(_DEFAULT_COLORS)]) for i, c in enumerate(classes)
        ]
        write_quicklook(raw["classes"], path, classes, colors)
        written.append(path)
    for path in raw.values():
        path.unlink(missing_ok=True)
    return written


def _to_cog(
    source: Path, target: Path, resampling: str, tags: dict[str, str], band_names: list[str] | None
) -> None:
    if band_names:
        with rasterio.open(source, "r+") as ds:
            ds.descriptions = tuple(band_names)
    cog_translate(
        str(source),
        str(target),
        cog_profiles.get("deflate"),
        overview_resampling=resampling,
        additional_cog_metadata=tags,
        in_memory=False,  # rio-cogeo would hold rasters under 120 Mpx in memory: keep memory flat
        quiet=True,
    )


def write_quicklook(class_map: Path, target: Path, classes: list[str], colors: list[str]) -> None:
    """A PNG of the class map (at most 1024 px a side) with a legend strip underneath."""
    with rasterio.open(class_map) as ds:
        scale = max(1, int(np.ceil(max(ds.width, ds.height) / QUICKLOOK_MAX_SIDE)))
        shape = (max(1, ds.height // scale), max(1, ds.width // scale))
        labels = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i, color in enumerate(colors):
        palette[i] = _hex_to_rgb(color)
    rgb = palette[labels]
    font = ImageFont.load_default()
    legend_height = 24
    image = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + legend_height), "white")
    image.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(image)
    x = 6
    for name, color in zip(classes, colors, strict=True):
        y = rgb.shape[0] + 6
        draw.rectangle([x, y, x + 12, y + 12], fill=_hex_to_rgb(color), outline="black")
        draw.text((x + 16, y), name, fill="black", font=font)
        x += 16 + int(draw.textlength(name, font=font)) + 14
    image.save(target)
