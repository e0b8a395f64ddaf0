"""STAC out: an Item for each delivered map, and one for the model that made it.

``<name>.item.json`` describes the map: the true region's geometry, the run's window, the COGs (or
VRTs over the tiles), the quicklook as thumbnail, ``proj:`` / ``raster:`` / ``classification:``
fields, ``processing:`` and ``terrabeam:`` provenance, ``derived_from`` links to the model's Item
and to the source Items. ``<name>-model.item.json`` describes the model with the MLM extension
(name, architecture, task, framework, input bands, outputs). Assets are linked relative to the
Items, so the folder can move as a whole. Written with pystac; valid under the extensions' own
schemas (tests/stac_schemas, tests/test_stac_out.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pystac
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import bounds
from rasterio.warp import transform_geom

from terrabeam import __version__
from terrabeam.config import PipelineConfig
from terrabeam.errors import InputError, TransientError
from terrabeam.provenance import Provenance, window_range
from terrabeam.region import projected_geometry
from terrabeam.sinks.mosaic import TILES_FOLDER
from terrabeam.sinks.tiles import MapLayer, class_colors, tile_file_name
from terrabeam.tiling import Tiling

EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
    "processing": "https://stac-extensions.github.io/processing/v1.2.0/schema.json",
    "mlm": "https://stac-extensions.github.io/mlm/v1.4.0/schema.json",
}
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
FRAMEWORKS = {
    "onnx": "ONNX",
    "tensorflow": "TensorFlow",
    "torch": "PyTorch",
    "sklearn": "scikit-learn",
    "lightgbm": "LightGBM",
}


def item_file_name(stem: str) -> str:
    return f"{stem}.item.json"


def model_item_file_name(stem: str) -> str:
    return f"{stem}-model.item.json"


def _rectangle(crs: str, t: Affine, width: int, height: int) -> dict[str, Any]:
    """``width`` × ``height`` pixels from ``t``'s origin, in lon/lat."""
    corners = [t * (0, 0), t * (width, 0), t * (width, height), t * (0, height), t * (0, 0)]
    return transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [[list(c) for c in corners]]})


def _footprint(config: PipelineConfig, tiling: Tiling) -> dict[str, Any]:
    """The true region in lon/lat: the configured polygon, else the region's rectangle."""
    polygon = projected_geometry(config, "EPSG:4326")
    if polygon is not None:
        return polygon
    return _rectangle(tiling.grid.crs, tiling.grid.transform, tiling.region_width, tiling.region_height)


def _proj_fields(crs_text: str, t: Affine, width: int, height: int) -> dict[str, Any]:
    crs = CRS.from_user_input(crs_text)
    fields: dict[str, Any] = {
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "proj:shape": [height, width],
    }
    epsg = crs.to_epsg()
    fields |= {"proj:code": f"EPSG:{epsg}"} if epsg else {"proj:code": None, "proj:wkt2": crs.to_wkt()}
    return fields


def _class_list(layer: MapLayer) -> list[dict[str, Any]]:
    return [
        {"value": value, "name": name, "description": name, "color_hint": color.lstrip("#").upper()}
        for value, (name, color) in enumerate(zip(layer.categories, layer.colors, strict=True))
    ]


def _raster_bands(layer: MapLayer, resolution: float) -> list[dict[str, Any]]:
    nodata: Any = "nan" if layer.nodata != layer.nodata else layer.nodata
    return [
        {"data_type": layer.dtype, "nodata": nodata, "spatial_resolution": resolution}
        for _ in layer.descriptions
    ]


def _layer_asset(layer: MapLayer, href: str, resolution: float) -> pystac.Asset:
    """A map layer's file: a COG (``.tif``) or the VRT over the tiles."""
    extra: dict[str, Any] = {"raster:bands": _raster_bands(layer, resolution)}
    extra["bands"] = [{"name": d} for d in layer.descriptions]
    if layer.categories:
        extra["classification:classes"] = _class_list(layer)
    cog = href.endswith(".tif")
    title = f"{layer.stem} ({'Cloud-Optimized GeoTIFF' if cog else 'GDAL VRT over the tiles'})"
    return pystac.Asset(href, title, None, COG if cog else "application/xml", ["data"], extra)


def map_item(
    config: PipelineConfig,
    made: Provenance,
    tiling: Tiling,
    layers: Sequence[MapLayer],
    files: Sequence[Path],
    created: datetime,
    derived_from: Sequence[str] = (),
) -> pystac.Item:
    """The Item of a map whose ``files`` (the deliver folder's) it links relative to the folder."""
    geometry = _footprint(config, tiling)
    window = window_range(made.window)
    properties: dict[str, Any] = {
        "processing:software": {"terrabeam": __version__},
        "processing:datetime": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "processing:lineage": f"model {made.model} ({made.framework}, version {made.model_version}) "
        f"applied patch by patch with terrabeam, pipeline {made.pipeline}",
        "terrabeam:pipeline": made.pipeline,
        "terrabeam:run": made.run_id,
        "terrabeam:config_hash": made.config_hash,
        "terrabeam:model": made.model,
        "terrabeam:model_version": made.model_version,
    }
    grid = tiling.grid
    properties |= _proj_fields(grid.crs, grid.transform, tiling.region_width, tiling.region_height)
    item = pystac.Item(
        id=f"{made.pipeline}-{made.run_id}",
        geometry=geometry,
        bbox=list(bounds(geometry)),
        datetime=None if window else created,
        start_datetime=window[0] if window else None,
        end_datetime=window[1] if window else None,
        properties=properties,
        stac_extensions=[EXTENSIONS[name] for name in ("proj", "raster", "classification", "processing")],
    )
    resolution = abs(tiling.grid.transform.a)
    by_stem = {layer.stem: layer for layer in layers}
    for path in files:
        name = path.name
        for stem, layer in by_stem.items():
            if name.endswith(f"-{stem}.tif") or name.endswith(f"-{stem}.vrt"):
                key = stem if name.endswith(".tif") else f"{stem}-vrt"
                item.add_asset(key, _layer_asset(layer, f"./{name}", resolution))
        if name.endswith("-quicklook.png"):
            item.add_asset(
                "thumbnail",
                pystac.Asset(f"./{name}", "quicklook", None, pystac.MediaType.PNG, ["thumbnail", "overview"]),
            )
    item.add_link(
        pystac.Link("derived_from", f"./{model_item_file_name(config.name)}", "application/geo+json")
    )
    for source in derived_from:
        item.add_link(pystac.Link("derived_from", source, "application/geo+json"))
    return item


def model_item(config: PipelineConfig, made: Provenance, created: datetime) -> pystac.Item:
    """The model's Item (MLM): what it reads and what it gives, with the model file as its asset."""
    model, grid = config.model, config.grid
    (width, height), (kw, kh) = grid.patch_size, grid.kernel_size
    regression = model.output == "regression"
    tasks = (
        ["regression"]
        if regression
        else ["classification" if model.kind == "per_pixel" else "semantic-segmentation"]
    )
    bands = list(model.input_bands)
    if model.kind == "per_pixel":
        shape_in, order_in = [-1, len(bands)], ["batch", "channel"]
        shape_out, order_out = [-1, len(model.output_names)], ["batch", "class"]
    elif model.layout == "NHWC":
        shape_in, order_in = (
            [-1, height + kh, width + kw, len(bands)],
            ["batch", "height", "width", "channel"],
        )
        shape_out, order_out = (
            [-1, height + kh, width + kw, len(model.output_names)],
            ["batch", "height", "width", "class"],
        )
    else:
        shape_in, order_in = (
            [-1, len(bands), height + kh, width + kw],
            ["batch", "channel", "height", "width"],
        )
        shape_out, order_out = (
            [-1, len(model.output_names), height + kh, width + kw],
            ["batch", "class", "height", "width"],
        )
    model_input: dict[str, Any] = {
        "name": "patch",
        "bands": bands,
        "input": {"shape": shape_in, "dim_order": order_in, "data_type": "float32"},
    }
    if model.normalization is not None and model.normalization.mean is not None:
        norm = model.normalization
        model_input["value_scaling"] = [
            {"type": "z-score", "mean": m, "stddev": s} for m, s in zip(norm.mean, norm.std, strict=True)
        ]
    output: dict[str, Any] = {
        "name": "values" if regression else "classes",
        "tasks": tasks,
        "result": {"shape": shape_out, "dim_order": order_out, "data_type": "float32"},
    }
    if not regression:
        colors = dict(zip(model.output_names, _model_colors(config), strict=True))
        output["classification:classes"] = [
            {"value": i, "name": name, "description": name, "color_hint": colors[name].lstrip("#").upper()}
            for i, name in enumerate(model.output_names)
        ]
    name = made.model if _mlm_name(made.model) else f"model-{made.model_version}"
    properties: dict[str, Any] = {
        "mlm:name": name,
        "mlm:architecture": model.architecture or "unspecified",
        "mlm:tasks": tasks,
        "mlm:framework": FRAMEWORKS[model.framework],
        "mlm:input": [model_input],
        "mlm:output": [output],
        "mlm:batch_size_suggestion": model.batch_size,
        "bands": [{"name": band} for band in bands],
        "terrabeam:model_version": made.model_version,
    }
    item = pystac.Item(
        id=f"{name}-{made.model_version}",
        geometry=None,
        bbox=None,
        datetime=created,
        properties=properties,
        stac_extensions=[EXTENSIONS["mlm"]],
    )
    location = config.locate(model.path)
    href = location if "://" in location else Path(location).as_uri()
    item.add_asset(
        "model",
        pystac.Asset(
            href,
            f"{made.model} ({made.framework})",
            None,
            None,
            ["mlm:model"],
            # STAC 1.1 allows the Item's bands only where an asset has bands: the model reads them
            {"mlm:artifact_type": model.framework, "bands": [{"name": band} for band in bands]},
        ),
    )
    return item


def _mlm_name(name: str) -> bool:
    return re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_.\-\s]+[a-zA-Z0-9]", name) is not None


def _model_colors(config: PipelineConfig) -> list[str]:
    return class_colors(config.model.output_names, config.outputs.colors)


def collection_file_name(stem: str) -> str:
    return f"{stem}.collection.json"


def tile_item_file_name(stem: str, tiling: Tiling, tile: int) -> str:
    return f"{stem}-{tiling.name(tile)}.item.json"


def tile_item(
    config: PipelineConfig,
    made: Provenance,
    tiling: Tiling,
    layers: Sequence[MapLayer],
    tile: int,
    created: datetime,
    collection_id: str,
) -> pystac.Item:
    """The Item of one tile of a tiled map (it lies in ``tiles/``, beside the tile COGs it links)."""
    grid, window = tiling.grid, tiling.window(tile)
    transform = grid.transform * Affine.translation(window.col_off, window.row_off)
    geometry = _rectangle(grid.crs, transform, window.width, window.height)
    span = window_range(made.window)
    row, col = tiling.position(tile)[::-1]
    properties: dict[str, Any] = {
        "terrabeam:pipeline": made.pipeline,
        "terrabeam:run": made.run_id,
        "terrabeam:tile": {"row": row, "col": col},
    } | _proj_fields(grid.crs, transform, window.width, window.height)
    item = pystac.Item(
        id=f"{made.pipeline}-{made.run_id}-{tiling.name(tile)}",
        geometry=geometry,
        bbox=list(bounds(geometry)),
        datetime=None if span else created,
        start_datetime=span[0] if span else None,
        end_datetime=span[1] if span else None,
        properties=properties,
        stac_extensions=[EXTENSIONS[name] for name in ("proj", "raster", "classification")],
        collection=collection_id,
    )
    resolution = abs(grid.transform.a)
    for layer in layers:
        if layer.stem != "classes" or config.outputs.class_map:
            href = f"./{tile_file_name(config.name, layer, tiling, tile)}"
            item.add_asset(layer.stem, _layer_asset(layer, href, resolution))
    item.add_link(pystac.Link("collection", f"../{collection_file_name(config.name)}", pystac.MediaType.JSON))
    item.add_link(pystac.Link("parent", f"../{collection_file_name(config.name)}", pystac.MediaType.JSON))
    item.add_link(
        pystac.Link("derived_from", f"../{model_item_file_name(config.name)}", pystac.MediaType.GEOJSON)
    )
    return item


def tiles_collection(map_of: pystac.Item, stem: str, tiling: Tiling) -> pystac.Collection:
    """The Collection of a tiled map's tile Items, and of the map's own Item."""
    props, common = map_of.properties, map_of.common_metadata
    start = common.start_datetime or map_of.datetime
    end = common.end_datetime or map_of.datetime
    collection = pystac.Collection(
        id=map_of.id,
        description=f"map of terrabeam pipeline {props['terrabeam:pipeline']}, run {props['terrabeam:run']}, "
        f"as {tiling.count} Cloud-Optimized GeoTIFF tiles",
        extent=pystac.Extent(
            pystac.SpatialExtent([map_of.bbox]),
            pystac.TemporalExtent([[start, end]]),
        ),
        license="other",
    )
    collection.clear_links()
    collection.add_link(pystac.Link("item", f"./{item_file_name(stem)}", pystac.MediaType.GEOJSON))
    for tile in range(tiling.count):
        href = f"./{TILES_FOLDER}/{tile_item_file_name(stem, tiling, tile)}"
        collection.add_link(pystac.Link("item", href, pystac.MediaType.GEOJSON))
    return collection


def _write_json(path: Path, stac_object: pystac.STACObject) -> Path:
    """Written under a temporary name and renamed into place."""
    partial = path.with_name(f".{path.name}.partial")
    data = stac_object.to_dict(include_self_link=False, transform_hrefs=False)
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)
    return path


def write_items(
    config: PipelineConfig,
    work: Path,
    made: Provenance,
    tiling: Tiling,
    layers: Sequence[MapLayer],
    files: Sequence[Path],
    derived_from: Sequence[str] = (),
    created: datetime | None = None,
) -> list[Path]:
    """The map's and the model's Items in ``work`` (the deliver folder being made); for a map of
    several tiles also an Item per tile (in ``tiles/``) and a Collection of them all."""
    created = created or datetime.now(UTC).replace(microsecond=0)
    stem = config.name
    model = model_item(config, made, created)
    whole = map_item(config, made, tiling, layers, files, created, derived_from)
    written = [_write_json(work / model_item_file_name(stem), model)]
    if tiling.count > 1:
        collection = tiles_collection(whole, stem, tiling)
        whole.collection_id = collection.id
        whole.add_link(pystac.Link("collection", f"./{collection_file_name(stem)}", pystac.MediaType.JSON))
        for tile in range(tiling.count):
            item = tile_item(config, made, tiling, layers, tile, created, collection.id)
            _write_json(work / TILES_FOLDER / tile_item_file_name(stem, tiling, tile), item)
        written.append(_write_json(work / collection_file_name(stem), collection))
    written.append(_write_json(work / item_file_name(stem), whole))
    return written


def post_item(api: str, collection: str, item_path: Path, location: str) -> str:
    """POST the map's Item (its asset and link hrefs made absolute against ``location``, the
    published deliver folder) to a STAC API's Transactions endpoint, creating the collection on
    first use and replacing an Item of the same id; returns the Item's URL there."""
    import requests

    data = json.loads(item_path.read_text())
    base = location if "://" in location else Path(location).as_uri()
    for asset in data["assets"].values():
        asset["href"] = f"{base}/{asset['href'].removeprefix('./')}"
    for link in data["links"]:
        if link["href"].startswith("./"):
            link["href"] = f"{base}/{link['href'].removeprefix('./')}"
    data["collection"] = collection
    root = api.rstrip("/")
    items = f"{root}/collections/{collection}/items"
    try:
        if requests.get(f"{root}/collections/{collection}", timeout=30).status_code == 404:
            west, south, east, north = data["bbox"]
            when = data["properties"].get("start_datetime") or data["properties"].get("datetime")
            created = requests.post(
                f"{root}/collections",
                json={
                    "type": "Collection",
                    "stac_version": data["stac_version"],
                    "id": collection,
                    "description": f"maps of terrabeam pipeline {data['properties']['terrabeam:pipeline']}",
                    "license": "other",
                    "extent": {
                        "spatial": {"bbox": [[west, south, east, north]]},
                        "temporal": {"interval": [[when, None]]},
                    },
                    "links": [],
                },
                timeout=30,
            )
            created.raise_for_status()
        response = requests.post(items, json=data, timeout=60)
        if response.status_code == 409:  # the run's Item from an earlier attempt
            response = requests.put(f"{items}/{data['id']}", json=data, timeout=60)
        response.raise_for_status()
    except requests.HTTPError as exc:  # the API refused it: a config or Item problem, not a blip
        status = exc.response.status_code if exc.response is not None else None
        detail = exc.response.text[:300] if exc.response is not None else str(exc)
        kind = TransientError if status is not None and status >= 500 else InputError
        raise kind(f"outputs.stac.api: {items} refused Item {data['id']} (HTTP {status}: {detail})") from None
    except requests.RequestException as exc:
        raise TransientError(f"outputs.stac.api: cannot reach {items} ({exc})") from None
    return f"{items}/{data['id']}"
