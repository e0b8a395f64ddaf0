"""The region to predict, from ``grid.region``: a bbox in the grid CRS, or a GeoJSON geometry
(EPSG:4326, inline or a file) reduced to its bounding box, and the pixel-snapped target it gives.

Pixel edges lie where ``grid.align`` says: on the first band's own edges (``source``: no resampling,
maps line up with the input pixel for pixel), on multiples of the resolution (``origin``: Earth
Engine's ``crsTransform`` grids, ``gdalwarp -tap``), or through an explicit point ``[x0, y0]``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import bounds, geometry_mask
from rasterio.warp import transform_geom

from terrabeam.config import Align, PipelineConfig
from terrabeam.errors import InputError
from terrabeam.grid import Grid


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


@dataclass(frozen=True)
class TrueRegion:
    """The region on its patch grid: ``width`` × ``height`` pixels from the grid's origin (the grid
    is padded to whole patches beyond them) and, if configured, its polygon in the grid's CRS (a
    pixel is in it when its centre is, as the map writer masks)."""

    grid: Grid
    width: int
    height: int
    polygon: dict[str, Any] | None = None
    polygon_bounds: tuple[float, float, float, float] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "polygon_bounds", bounds(self.polygon) if self.polygon else None)

    def core_outside(self, index: int) -> bool:
        """Whether no pixel of patch ``index``'s core lies in the region: the core is beyond its
        width or height, or no core pixel's centre is in the polygon. Rasterizes the polygon only
        for cores that meet its bounding box."""
        window = self.grid.patch_window(index)
        rows = min(window.height, self.height - window.row_off)
        cols = min(window.width, self.width - window.col_off)
        if rows <= 0 or cols <= 0:
            return True
        if self.polygon is None:
            return False
        corners = [self.grid.xy(window.col_off + c, window.row_off + r) for c in (0, cols) for r in (0, rows)]
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        left, bottom, right, top = self.polygon_bounds
        if min(xs) >= right or max(xs) <= left or min(ys) >= top or max(ys) <= bottom:
            return True
        transform = self.grid.window_transform(window)
        return bool(geometry_mask([self.polygon], out_shape=(rows, cols), transform=transform).all())


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


def stated_grid(config: PipelineConfig) -> tuple[Grid, TargetRegion]:
    """The patch grid (padded) and the true region of a source without band files (Earth Engine,
    STAC), from ``grid.crs``, ``resolution``, ``region`` and
    ``align`` (multiples of the resolution unless an explicit ``[x0, y0]``: there is no band file whose
    edges ``source`` could mean)."""
    grid_config = config.grid
    crs = CRS.from_user_input(grid_config.crs)
    resolution = grid_config.resolution
    res = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    region = snap(crs, res, region_bounds(config, crs), anchor(grid_config.align or "origin", None))
    grid = Grid.covering(region.crs, region.transform, region.width, region.height, grid_config.patch_size)
    return grid, region
