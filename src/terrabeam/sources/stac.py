"""The STAC source: Items of a STAC API search or a static catalog, composited onto the grid.

Where the run starts, the search — the grid's region as geometry, the run's window as datetime,
the configured collections, query and filter — gives the window's Items (at most ``max_items``,
newest first); a window without Items has no data (the map step raises ``errors.NoDataError``:
the run is recorded as such, not as failed). A band is an asset by key, or the asset band whose
``eo:bands`` (STAC 1.0) or ``bands`` (1.1) entry has the band's common name. On the workers, each
Item's band assets are read through GDAL (``/vsicurl/`` for http(s), ``/vsis3/``, ``/vsigs/``)
onto a block of patches with the raster source's reader, its mask asset applied, and the Items
combined per pixel by the reducer; memory holds one block per Item, whatever the region's size.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from rasterio.features import bounds
from rasterio.warp import transform_bounds

from terrabeam.config import BandFile, PipelineConfig, RasterSource
from terrabeam.errors import InputError
from terrabeam.grid import Grid
from terrabeam.provenance import window_range
from terrabeam.region import region_geometry
from terrabeam.sources.raster import RasterPatchReader, add_derived, block_patches, block_window


@dataclass(frozen=True)
class SourceItem:
    """What a worker needs of one Item: id, acquisition time, its own href, where each band is."""

    id: str
    datetime: str
    href: str | None
    bands: dict[str, tuple[str, int]]  # band name → (asset href, 1-based band in its file)
    mask: str | None = None  # the mask asset's href


def _search_geometry(config: PipelineConfig) -> dict[str, Any]:
    """The region in lon/lat: its polygon, or its bbox (given in the grid's CRS) as one."""
    geometry = region_geometry(config)
    if geometry is not None:
        return geometry
    bbox = config.grid.region.bbox
    left, bottom, right, top = transform_bounds(config.grid.crs, "EPSG:4326", *bbox, densify_pts=21)
    ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
    return {"type": "Polygon", "coordinates": [ring]}


def _item_time(item: Any) -> datetime:
    props = item.properties
    moment = item.datetime or datetime.fromisoformat(props.get("start_datetime").replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


QUERY_OPERATORS = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "in": lambda a, b: a in b,
}


def _catalog_items(config: PipelineConfig, window: tuple[datetime, datetime] | None) -> list[Any]:
    """A static catalog's Items that match: collections, window, bbox overlap, query (the search
    an API would do, on the Items' own fields)."""
    import pystac

    source = config.source
    if source.filter is not None:
        raise InputError("source.filter (CQL2) needs a STAC API; a static catalog takes source.query")
    try:
        catalog = pystac.Catalog.from_file(config.locate(source.catalog))
    except Exception as exc:
        raise InputError(f"source.catalog: cannot read {source.catalog} ({exc})") from None
    left, bottom, right, top = bounds(_search_geometry(config))
    chosen = []
    for item in catalog.get_items(recursive=True):
        if source.collections and item.collection_id not in source.collections:
            continue
        if window is not None and not window[0] <= _item_time(item) < window[1]:
            continue
        x0, y0, x1, y1 = item.bbox or (-180, -90, 180, 90)
        if x0 > right or x1 < left or y0 > top or y1 < bottom:
            continue
        props = item.properties
        if all(
            QUERY_OPERATORS[op](props.get(field), value)
            for field, ops in (source.query or {}).items()
            for op, value in ops.items()
        ):
            chosen.append(item)
    return chosen


def _api_items(config: PipelineConfig, window: tuple[datetime, datetime] | None) -> list[Any]:
    from pystac_client import Client
    from pystac_client.conformance import ConformanceClasses
    from pystac_client.exceptions import APIError

    source = config.source
    when = None
    if window is not None:  # the API's range includes its end; the window's does not
        last = window[1] - timedelta(milliseconds=1)
        when = f"{window[0]:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + "Z/" + f"{last:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + "Z"
    try:
        client = Client.open(source.api)
        # newest first from the API where it can sort: then only max_items are fetched
        sorts = client.conforms_to(ConformanceClasses.SORT)
        search = client.search(
            collections=source.collections or None,
            intersects=_search_geometry(config),
            datetime=when,
            query=source.query,
            filter=source.filter,
            sortby="-properties.datetime" if sorts else None,
            max_items=source.max_items if sorts else None,
        )
        return list(search.items())
    except (APIError, OSError, ValueError) as exc:
        raise InputError(f"source.api: search at {source.api} failed ({exc})") from None


def _signer(config: PipelineConfig):
    hook = config.source.sign
    if hook is None:
        return lambda item: item
    module, _, name = hook.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"source.sign: cannot load {hook} ({exc})") from None


def _common_name_band(item: Any, name: str) -> tuple[str, int] | None:
    """(asset key, 1-based band) of the asset band with common name ``name``: ``eo:bands`` entries'
    ``common_name`` (STAC 1.0) or ``bands`` entries' ``eo:common_name`` (1.1)."""
    for key, asset in item.assets.items():
        fields = asset.extra_fields
        entries = fields.get("eo:bands") or fields.get("bands") or []
        for number, entry in enumerate(entries, start=1):
            if name in (entry.get("common_name"), entry.get("eo:common_name")):
                return key, number
    return None


def _locate_bands(item: Any, source: Any) -> dict[str, tuple[str, int]]:
    """Band name → (asset key, band), or an InputError naming the Item and what is missing."""
    located, missing = {}, []
    for name, spec in source.bands.items():
        if spec.asset is not None:
            if spec.asset in item.assets:
                located[name] = (spec.asset, spec.band)
            else:
                missing.append(f"asset {spec.asset!r}")
        elif (found := _common_name_band(item, spec.common_name)) is not None:
            located[name] = found
        else:
            missing.append(f"a band with common name {spec.common_name!r}")
    if source.mask is not None and source.mask.asset not in item.assets:
        missing.append(f"mask asset {source.mask.asset!r}")
    if missing:
        raise InputError(
            f"STAC Item {item.id}: missing {', '.join(missing)} (assets: {sorted(item.assets)}); "
            "check source.bands and source.mask"
        )
    return located


def search_items(config: PipelineConfig, window: tuple[str, str] | None) -> list[SourceItem]:
    """The window's Items, newest first, at most ``source.max_items``; each must have every band
    (and the mask asset)."""
    source = config.source
    span = window_range(window)
    found = _api_items(config, span) if source.api else _catalog_items(config, span)
    found.sort(key=_item_time, reverse=True)
    sign = _signer(config)
    items = []
    for item in found[: source.max_items]:
        item = sign(item) or item

        def href(key: str, item=item) -> str:
            return item.assets[key].get_absolute_href() or item.assets[key].href

        bands = {name: (href(key), band) for name, (key, band) in _locate_bands(item, source).items()}
        mask = href(source.mask.asset) if source.mask is not None else None
        items.append(SourceItem(item.id, _item_time(item).isoformat(), item.get_self_href(), bands, mask))
    return items


def _masked(values: np.ndarray, mask: Any) -> np.ndarray:
    """Where the mask asset's ``values`` (NaN: no data) mask a pixel."""
    masked = np.isnan(values)
    whole = np.where(masked, 0, values).astype(np.int64)
    if mask.classes:
        masked |= np.isin(whole, mask.classes)
    if mask.bits:
        masked |= (whole & sum(1 << bit for bit in mask.bits)) != 0
    return masked


def _combine(stack: np.ndarray, reducer: str) -> np.ndarray:
    """(items, H, W) with NaN where an Item has nothing → (H, W); Items newest first."""
    if reducer in ("first", "latest"):  # first: the earliest valid, latest: the newest valid
        ordered = stack[::-1] if reducer == "first" else stack
        chosen = np.argmax(~np.isnan(ordered), axis=0)
        return np.take_along_axis(ordered, chosen[None], axis=0)[0]
    with warnings.catch_warnings():  # a pixel no Item covers stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmedian if reducer == "median" else np.nanmean)(stack, axis=0).astype(np.float32)


def _item_config(config: PipelineConfig, item: SourceItem) -> PipelineConfig:
    """The config of a raster source over one Item's band assets (NaN where it has no data)."""
    source = config.source
    bands = {
        name: BandFile(
            path=item.bands[name][0],  # rasterio reads http(s)/s3/gs URLs via /vsi…
            band=item.bands[name][1],
            scale=spec.scale,
            offset=spec.offset,
        )
        for name, spec in source.bands.items()
    }
    per_item = RasterSource(
        bands=bands, nodata=source.nodata, fill_value=float("nan"), resampling=source.resampling
    )
    return config.model_copy(update={"source": per_item})


def read_overview(
    config: PipelineConfig,
    items: Sequence[SourceItem],
    bands: list[str],
    crs: object,
    transform: Any,
    size: tuple[int, int],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The raster source's ``read_overview`` over the window's Items, combined by the reducer
    (masks not applied: the quicklook shows what the model saw, clouds included)."""
    from terrabeam.sources.raster import read_overview as read_files

    stacks = []
    for item in items:
        values, valid = read_files(_item_config(config, item), bands, crs, transform, size, shape)
        values[:, ~valid] = np.nan
        stacks.append(values)
    combined = np.stack(
        [_combine(np.stack([s[b] for s in stacks]), config.source.reducer) for b in range(len(bands))]
    )
    return np.nan_to_num(combined), ~np.isnan(combined).any(axis=0)


class StacPatchReader:
    """The raster reader's interface (``read_block``) over a window's Items: each Item's bands read
    with the raster source's reader (NaN where it has no data), masked, then combined."""

    def __init__(
        self, config: PipelineConfig, grid: Grid, kernel: tuple[int, int], items: Sequence[SourceItem]
    ) -> None:
        source = config.source
        self.config, self.grid, self.kernel, self.items = config, grid, kernel, list(items)
        self.readers: list[tuple[RasterPatchReader, RasterPatchReader | None]] = []
        try:
            for item in self.items:
                reader = RasterPatchReader(_item_config(config, item), grid, kernel)
                mask = None
                if source.mask is not None:
                    mask_source = RasterSource(
                        bands={"mask": BandFile(path=item.mask)},
                        fill_value=float("nan"),
                        resampling="nearest",
                    )
                    mask = RasterPatchReader(config.model_copy(update={"source": mask_source}), grid, kernel)
                self.readers.append((reader, mask))
        except BaseException:
            self.close()
            raise

    def read_block(self, row: int, first: int, last: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The raster reader's patches of a block, each band the Items' composite."""
        source = self.config.source
        window = block_window(self.grid, self.kernel, row, first, last)
        stacks: dict[str, list[np.ndarray]] = {name: [] for name in source.bands}
        for reader, mask in self.readers:
            bands, _ = reader.read_window(window)  # NaN where the Item has no data
            if mask is not None:
                flags, _ = mask.read_window(window)
                masked = _masked(flags["mask"], source.mask)
                for values in bands.values():
                    values[masked] = np.nan
            for name, values in bands.items():
                stacks[name].append(values)
        bands = {name: _combine(np.stack(values), source.reducer) for name, values in stacks.items()}
        valid = np.logical_and.reduce([~np.isnan(values) for values in bands.values()])
        for values in bands.values():
            values[~valid] = np.float32(source.fill_value)
        add_derived(bands, source.derived, valid, source.fill_value)
        return block_patches(self.grid, self.kernel, row, first, last, bands)

    def close(self) -> None:
        for reader, mask in self.readers:
            reader.close()
            if mask is not None:
                mask.close()
        self.readers = []
