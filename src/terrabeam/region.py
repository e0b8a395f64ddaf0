"""The region to predict, from ``grid.region``: a bbox in the grid CRS, or a GeoJSON geometry
(EPSG:4326, inline or a file) reduced to its bounding box, and the pixel-snapped target it gives.

Pixel edges lie where ``grid.align`` says: on the first band's own edges (``source``: no resampling,
maps line up with the input pixel for pixel), on multiples of the resolution (``origin``: Earth
Engine's ``crsTransform`` grids, ``gdalwarp -tap``), or through an explicit point ``[x0, y0]``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from terrabeam.config import Align, PipelineConfig
from terrabeam.errors import InputError


@dataclass(frozen=True)
class TargetRegion:
    """The region to export, snapped to whole pixels of the target grid."""

    crs: str
    transform: Affine
    width: int
    height: int


def region_geometry(config: PipelineConfig) -> dict[str, Any] | None:
    """The configured GeoJSON geometry (EPSG:4326), read from its file if given as a path."""
    geometry = config.grid.region.geojson
    if geometry is None:
        return None
    if isinstance(geometry, str):
        path = config.resolve(geometry)
        if not path.is_file():
            raise InputError(f"grid.region.geojson: file not found: {path}")
        try:
            geometry = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"grid.region.geojson: {path} is not JSON ({exc})") from None
    if geometry.get("type") == "FeatureCollection":
        return {"type": "GeometryCollection", "geometries": [f["geometry"] for f in geometry["features"]]}
    if geometry.get("type") == "Feature":
        return geometry["geometry"]
    return geometry


def projected_geometry(config: PipelineConfig, crs: str) -> dict[str, Any] | None:
    """The configured GeoJSON geometry in ``crs`` (None for a bbox region or none)."""
    geometry = region_geometry(config)
    return None if geometry is None else transform_geom("EPSG:4326", crs, geometry)


def region_bounds(config: PipelineConfig, crs: CRS) -> tuple[float, float, float, float] | None:
    """(minx, miny, maxx, maxy) of the configured region in ``crs``; None if no region is set."""
    if config.grid.region.bbox is not None:
        return tuple(config.grid.region.bbox)
    geometry = region_geometry(config)
    if geometry is None:
        return None
    projected = transform_geom("EPSG:4326", crs, geometry)
    coords = np.array(list(_coordinates(projected)), dtype=float)
    return coords[:, 0].min(), coords[:, 1].min(), coords[:, 0].max(), coords[:, 1].max()


def anchor(align: Align, source: Affine | None) -> tuple[float, float]:
    """A point every pixel edge of the grid passes through, for ``grid.align``.

    ``source`` is the first band's transform when the grid is in that band's CRS, else None: a band
    has pixel edges only in its own CRS, so ``source`` alignment onto another CRS is ``origin``
    (the band is resampled anyway).
    """
    if align == "source":
        return (source.c, source.f) if source is not None else (0.0, 0.0)
    if align == "origin":
        return 0.0, 0.0
    return float(align[0]), float(align[1])


def snap(
    crs: CRS,
    resolution: tuple[float, float],
    bounds: tuple[float, ...],
    through: tuple[float, float] = (0.0, 0.0),
) -> TargetRegion:
    """Snap bounds outward to whole pixels of the north-up grid whose edges pass through ``through``
    (the CRS origin by default, as ``gdalwarp -tap`` does)."""
    xres, yres = resolution
    x0, y0 = through
    minx, miny, maxx, maxy = bounds
    left = x0 + math.floor(round((minx - x0) / xres, 9)) * xres
    top = y0 + math.ceil(round((maxy - y0) / yres, 9)) * yres
    width = math.ceil(round((maxx - left) / xres, 9))
    height = math.ceil(round((top - miny) / yres, 9))
    return TargetRegion(crs.to_string(), Affine(xres, 0, left, 0, -yres, top), width, height)


def _coordinates(geometry: dict):
    if geometry["type"] == "GeometryCollection":
        for part in geometry["geometries"]:
            yield from _coordinates(part)
        return
    stack = [geometry["coordinates"]]
    while stack:
        item = stack.pop()
        if item and isinstance(item[0], int | float):
            yield item[:2]
        else:
            stack.extend(item)
