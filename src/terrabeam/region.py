"""The region to predict, from ``grid.region``: a bbox in the grid CRS, or a GeoJSON geometry
(EPSG:4326, inline or a file) reduced to its bounding box, and the pixel-snapped target it gives."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from terrabeam.config import PipelineConfig
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


def snap(crs: CRS, resolution: tuple[float, float], bounds: tuple[float, ...]) -> TargetRegion:
    """Snap bounds outward to the pixel grid of the CRS origin, as ``gdalwarp -tap`` does."""
    xres, yres = resolution
    minx, miny, maxx, maxy = bounds
    left = math.floor(round(minx / xres, 9)) * xres
    top = math.ceil(round(maxy / yres, 9)) * yres
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
