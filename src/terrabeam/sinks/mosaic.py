"""The mosaic over a map's tiles, made where the run was launched once every tile is written: a GDAL
VRT per layer (metadata only: it is built from the tiling, not from the pixels), one COG per layer
assembled from the tiles when the region is small enough, and the quicklook PNG."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling

from terrabeam.sinks.tiles import MapLayer, cog_options, tile_file_name
from terrabeam.sinks.vrt import GDAL_TYPES, layer_vrt, write_vrt_file
from terrabeam.tiling import Tiling

QUICKLOOK_MAX_SIDE = 1024
TILES_FOLDER = "tiles"
DEFAULT_COLORS = ["#1b9e77", "#f0f0f0", "#4b3f9e", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]


def write_vrt(path: Path, stem: str, layer: MapLayer, tiling: Tiling) -> Path:
    """A VRT of the layer's tiles (``tiles/…`` relative to ``path``), written under a temporary name
    and renamed into place."""
    grid = tiling.grid
    typename = GDAL_TYPES[layer.dtype]

    def add_tiles(band: ET.Element, number: int) -> None:
        for tile in range(tiling.count):
            window = tiling.window(tile)
            source = ET.SubElement(band, "SimpleSource")
            name = f"{TILES_FOLDER}/{tile_file_name(stem, layer, tiling, tile)}"
            ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = name
            ET.SubElement(source, "SourceBand").text = str(number)
            size = {"xSize": str(window.width), "ySize": str(window.height)}
            ET.SubElement(
                source,
                "SourceProperties",
                RasterXSize=size["xSize"],
                RasterYSize=size["ySize"],
                DataType=typename,
                BlockXSize="512",
                BlockYSize="512",
            )
            ET.SubElement(source, "SrcRect", xOff="0", yOff="0", **size)
            ET.SubElement(source, "DstRect", xOff=str(window.col_off), yOff=str(window.row_off), **size)

    root = layer_vrt(tiling.region_width, tiling.region_height, grid.crs, grid.transform, layer, add_tiles)
    return write_vrt_file(root, path)


def write_single_cog(
    vrt: Path, path: Path, stem: str, layer: MapLayer, tiling: Tiling, compression: tuple[str, int | None]
) -> Path:
    """One COG of the whole layer with overviews: its only tile itself (a hard link, no second
    encoding), or assembled from the tiles through the VRT."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    if tiling.count == 1:
        os.link(
            vrt.parent
            / TILES_FOLDER
            / tile_file_name(path.name.removesuffix(f"-{layer.stem}.tif"), layer, tiling, 0),
            partial,
        )
    else:
        rasterio.shutil.copy(vrt, partial, driver="COG", **cog_options(layer, *compression))
    os.replace(partial, path)
    return path


def _hex_to_rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def class_colors(classes: list[str], colors: dict[str, str]) -> list[str]:
    """The configured colour of each class, else one of the built-in palette."""
    return [colors.get(c, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, c in enumerate(classes)]


def write_quicklook(class_map: Path, target: Path, classes: list[str], colors: list[str]) -> Path:
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
    partial = target.with_name(f".{target.name}.partial")
    image.save(partial, format="PNG")
    os.replace(partial, target)
    return target
