"""The mosaic over a map's tiles, made where the run was launched once every tile is written: a GDAL
VRT per layer (metadata only: it is built from the tiling, not from the pixels), one COG per layer
assembled from the tiles when the region is small enough (the quicklook: sinks/quicklook.py)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import rasterio
import rasterio.shutil
from affine import Affine

from terrabeam.sinks.tiles import MapLayer, cog_options, tile_file_name
from terrabeam.sinks.vrt import GDAL_TYPES, layer_vrt, write_vrt_file
from terrabeam.tiling import Tiling

TILES_FOLDER = "tiles"


def write_vrt(
    path: Path,
    stem: str,
    layer: MapLayer,
    tiling: Tiling,
    tags: dict[str, str] | None = None,
    overview_levels: int = 0,
) -> Path:
    """A VRT of the layer's tiles (``tiles/…`` relative to ``path``), written under a temporary name
    and renamed into place. With ``overview_levels`` (the tiles carry that many overviews each) it
    exposes them: one VRT per level over the tiles' own level (``tiles/<stem>-<layer>-overview<k>.vrt``),
    named in each band's ``Overview`` elements. GDAL builds no overviews for a VRT of several
    sources by itself."""
    levels = [
        _level_vrt(path.parent / TILES_FOLDER, stem, layer, tiling, level, tags)
        for level in range(1, overview_levels + 1)
    ]

    def add_tiles(band: ET.Element, number: int) -> None:
        _add_tile_sources(band, number, stem, layer, tiling, 0, f"{TILES_FOLDER}/")
        for level in levels:
            overview = ET.SubElement(band, "Overview")
            ET.SubElement(overview, "SourceFilename", relativeToVRT="1").text = f"{TILES_FOLDER}/{level.name}"
            ET.SubElement(overview, "SourceBand").text = str(number)

    grid = tiling.grid
    root = layer_vrt(
        tiling.region_width, tiling.region_height, grid.crs, grid.transform, layer, add_tiles, tags=tags
    )
    return write_vrt_file(root, path)


def _level_vrt(
    folder: Path, stem: str, layer: MapLayer, tiling: Tiling, level: int, tags: dict[str, str] | None
) -> Path:
    """The mosaic at overview ``level`` (factor 2**level): each tile's own overview of that level,
    placed at its offset divided by the factor (whole pixels: ``vrt_overview_levels``)."""
    factor = 2**level
    width, height = -(-tiling.region_width // factor), -(-tiling.region_height // factor)
    transform = tiling.grid.transform @ Affine.scale(
        tiling.region_width / width, tiling.region_height / height
    )

    def add_tiles(band: ET.Element, number: int) -> None:
        _add_tile_sources(band, number, stem, layer, tiling, level, "")

    root = layer_vrt(width, height, tiling.grid.crs, transform, layer, add_tiles, tags=tags)
    return write_vrt_file(root, folder / f"{stem}-{layer.stem}-overview{level}.vrt")


def _add_tile_sources(
    band: ET.Element, number: int, stem: str, layer: MapLayer, tiling: Tiling, level: int, prefix: str
) -> None:
    """One SimpleSource per tile for band ``number``: the tile's full resolution (``level`` 0) or its
    overview ``level``, at the tile's place in the mosaic of that level."""
    typename = GDAL_TYPES[layer.dtype]
    factor = 2**level
    for tile in range(tiling.count):
        window = tiling.window(tile)
        source = ET.SubElement(band, "SimpleSource")
        name = f"{prefix}{tile_file_name(stem, layer, tiling, tile)}"
        ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = name
        if level:  # GDAL's open option for "this overview level as the dataset" (0 = the first)
            options = ET.SubElement(source, "OpenOptions")
            ET.SubElement(options, "OOI", key="OVERVIEW_LEVEL").text = str(level - 1)
        ET.SubElement(source, "SourceBand").text = str(number)
        size = {"xSize": str(-(-window.width // factor)), "ySize": str(-(-window.height // factor))}
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
        offsets = {"xOff": str(window.col_off // factor), "yOff": str(window.row_off // factor)}
        ET.SubElement(source, "DstRect", **offsets, **size)


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
