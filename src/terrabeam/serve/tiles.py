"""Map tiles (Web Mercator XYZ, 256 × 256 PNG) rendered on request straight from a run's COGs with
rio-tiler, no pyramid written: the class map in its own colour table, one class's probability
(0–1) through a colormap; nodata and outside the map are transparent."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import rasterio
from rasterio.warp import transform_bounds
from rio_tiler.colormap import cmap
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader

from terrabeam.serve.history import RunMap

PROBABILITY_COLORMAP = "viridis"  # perceptually uniform, legible over a light or dark base
OVERZOOM = 4  # zoom levels past the map's native resolution the page still offers (pixels enlarged)


def category_names(vrt: Path) -> list[str]:
    """Class names by pixel value: the GDAL category names of the class VRT deliver writes."""
    names = ET.parse(vrt).getroot().find("VRTRasterBand/CategoryNames")
    return [c.text or "" for c in names] if names is not None else []


def map_info(run_map: RunMap) -> dict[str, Any]:
    """What the page needs to show a map: lon/lat bounds, zoom range, classes (value, name,
    colour), the probability bands, and where the quicklook lies."""
    with Reader(str(run_map.classes)) as reader:
        bounds = reader.get_geographic_bounds(reader.tms.rasterio_geographic_crs)
        colormap = reader.colormap or {}
        minzoom, maxzoom = reader.minzoom, reader.maxzoom
    names = category_names(run_map.classes_vrt)
    classes = [
        {
            "value": value,
            "name": name,
            "color": "#{:02x}{:02x}{:02x}".format(*colormap.get(value, (0, 0, 0))[:3]),
        }
        for value, name in enumerate(names)
    ]
    probabilities = None
    if run_map.probabilities is not None:
        with rasterio.open(run_map.probabilities) as dataset:
            probabilities = list(dataset.descriptions)
    quicklook = None
    if run_map.quicklook is not None:
        with rasterio.open(run_map.quicklook) as image:  # georeferenced by its world file + .aux.xml
            if image.crs is not None:
                quicklook = list(transform_bounds(image.crs, "EPSG:4326", *image.bounds))
    return {
        "name": run_map.name,
        "bounds": list(bounds),
        "minzoom": minzoom,
        "maxzoom": maxzoom,
        "max_overzoom": maxzoom + OVERZOOM,
        "classes": classes,
        "probabilities": probabilities,
        "probability_colormap": PROBABILITY_COLORMAP,
        "probability_colors": probability_colors(),
        "quicklook_bounds": quicklook,
    }


def class_tile(path: Path, z: int, x: int, y: int) -> bytes | None:
    """The class map's tile z/x/y in its colour table (nearest neighbour: classes are not mixed),
    or None where the tile lies outside the map."""
    with Reader(str(path)) as reader:
        try:
            image = reader.tile(x, y, z, resampling_method="nearest")
        except TileOutsideBounds:
            return None
        return image.render(img_format="PNG", colormap=reader.colormap)


def probability_tile(path: Path, band: int, z: int, x: int, y: int) -> bytes | None:
    """Band ``band`` (1-based: the probability of class band - 1) as a tile, 0–1 stretched over
    PROBABILITY_COLORMAP; None where the tile lies outside the map."""
    with Reader(str(path)) as reader:
        if not 1 <= band <= reader.dataset.count:
            raise IndexError(f"{path.name} has bands 1–{reader.dataset.count}, not {band}")
        try:
            image = reader.tile(x, y, z, indexes=band, resampling_method="bilinear")
        except TileOutsideBounds:
            return None
        image.array.fill_value = 0  # NaN (the COG's nodata) cannot be cast to the PNG's bytes
        image.rescale(in_range=((0.0, 1.0),))
        return image.render(img_format="PNG", colormap=cmap.get(PROBABILITY_COLORMAP))


def probability_colors(steps: int = 11) -> list[str]:
    """The probability colormap at ``steps`` even points of 0–1, for the page's legend."""
    colors = cmap.get(PROBABILITY_COLORMAP)
    picks = [round(i * 255 / (steps - 1)) for i in range(steps)]
    return ["#{:02x}{:02x}{:02x}".format(*colors[p][:3]) for p in picks]
