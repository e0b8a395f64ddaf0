"""The mosaic over a map's tiles, made where the run was launched once every tile is written: a GDAL
VRT per layer (metadata only: it is built from the tiling, not from the pixels), one COG per layer
assembled from the tiles when the region is small enough (the quicklook: sinks/quicklook.py)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import rasterio
import rasterio.shutil

from terrabeam.sinks.tiles import MapLayer, cog_options, tile_file_name
from terrabeam.sinks.vrt import GDAL_TYPES, layer_vrt, write_vrt_file
from terrabeam.tiling import Tiling

TILES_FOLDER = "tiles"


def write_vrt(
    path: Path, stem: str, layer: MapLayer, tiling: Tiling, tags: dict[str, str] | None = None
) -> Path:
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

    root = layer_vrt(
        tiling.region_width, tiling.region_height, grid.crs, grid.transform, layer, add_tiles, tags=tags
    )
    return write_vrt_file(root, path)


def write_single_cog(
    vrt: Path, path: Path, stem: str, layer: MapLayer, tiling: Tiling, compression: tuple[str, int | None]
) -> Path:
    """One COG of the whole layer with overviews: its only tile itself (a hard link, no second
    encoding), or assembled from the tiles through the VRT. GDAL's sidecar (``.aux.xml``: the class
    names) goes with it, in place before the COG."""
    partial = path.with_name(f".{path.name}.partial")
    sidecar = partial.with_name(f"{partial.name}.aux.xml")
    partial.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    if tiling.count == 1:
        tile = vrt.parent / TILES_FOLDER / tile_file_name(stem, layer, tiling, 0)
        os.link(tile, partial)
        if tile.with_name(f"{tile.name}.aux.xml").exists():
            os.link(tile.with_name(f"{tile.name}.aux.xml"), sidecar)
    else:
        rasterio.shutil.copy(vrt, partial, driver="COG", **cog_options(layer, *compression))
    if sidecar.exists():
        os.replace(sidecar, path.with_name(f"{path.name}.aux.xml"))
    os.replace(partial, path)
    return path
