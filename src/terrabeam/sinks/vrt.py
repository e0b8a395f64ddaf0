"""GDAL VRT documents for a map layer: the georeferencing, band descriptions and nodata every VRT
of a layer shares; the mosaic adds its tiles as sources, the tile writer its raw scratch files."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from affine import Affine
from rasterio.crs import CRS

if TYPE_CHECKING:  # the tile writer imports this module
    from terrabeam.sinks.tiles import MapLayer

GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "int32": "Int32"}
GDAL_TYPES |= {"float32": "Float32", "float64": "Float64"}


def _number(value: float) -> str:
    return (
        "nan" if np.isnan(value) else repr(float(value)) if not float(value).is_integer() else str(int(value))
    )


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def layer_vrt(
    width: int,
    height: int,
    crs: object,
    transform: Affine,
    layer: MapLayer,
    add_pixels: Callable[[ET.Element, int], None],
    band_class: str | None = None,
    tags: dict[str, str] | None = None,
) -> ET.Element:
    """A VRT of ``width`` × ``height`` pixels of ``layer``; ``add_pixels(band element, band number)``
    says where each band's pixels come from (``band_class``: a VRT band subclass, e.g. raw).
    ``tags`` become dataset metadata; a layer with categories gets its colour table and category
    names (GDAL copies both into a COG made from the VRT: the table inside, the names beside it)."""
    t = transform
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = CRS.from_user_input(crs).to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    metadata = ET.SubElement(root, "Metadata")
    ET.SubElement(metadata, "MDI", key="bands").text = ",".join(layer.descriptions)
    for key, value in (tags or {}).items():
        ET.SubElement(metadata, "MDI", key=key).text = value
    for number, description in enumerate(layer.descriptions, start=1):
        attributes = {"dataType": GDAL_TYPES[layer.dtype], "band": str(number)}
        if band_class:
            attributes["subClass"] = band_class
        band = ET.SubElement(root, "VRTRasterBand", attributes)
        ET.SubElement(band, "Description").text = description
        ET.SubElement(band, "NoDataValue").text = _number(layer.nodata)
        if layer.colors:
            ET.SubElement(band, "ColorInterp").text = "Palette"
            table = ET.SubElement(band, "ColorTable")
            for color in layer.colors:
                red, green, blue = hex_to_rgb(color)
                ET.SubElement(table, "Entry", c1=str(red), c2=str(green), c3=str(blue), c4="255")
        if layer.categories:
            names = ET.SubElement(band, "CategoryNames")
            for name in layer.categories:
                ET.SubElement(names, "Category").text = name
        add_pixels(band, number)
    return root


def write_vrt_file(root: ET.Element, path: Path) -> Path:
    """Write ``root`` to ``path`` under a temporary name, renamed into place."""
    ET.indent(root)
    partial = path.with_name(f".{path.name}.partial")
    ET.ElementTree(root).write(partial, encoding="unicode")
    os.replace(partial, path)
    return path
