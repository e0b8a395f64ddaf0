"""Maps that explain themselves: STAC Items for the map and the model (valid under pystac with the
extensions' own schemas, offline), the class COG's colour table, class names and provenance tags,
and the quicklook (imagery under the classes, nodata transparent, shares, world file).

Synthetic scene and 1×1-conv model (tiny_pipeline); the demo's real scene in test_demo_pipeline."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from PIL import Image
from pystac.validation import JsonSchemaSTACValidator

from terrabeam import __version__
from terrabeam.cli import main
from terrabeam.sinks.quicklook import QuicklookStyle, compose_quicklook

SCHEMAS = Path(__file__).parent / "stac_schemas"


def offline_validator() -> JsonSchemaSTACValidator:
    """pystac's validator with the shipped extension schemas: no schema is fetched."""
    validator = JsonSchemaSTACValidator()
    for path in SCHEMAS.rglob("schema.json"):
        schema = json.loads(path.read_text())
        uri = schema["$id"].rstrip("#")
        validator.schema_cache[uri] = schema
    return validator


def _read(path: Path) -> pystac.Item:
    """As written: pystac would otherwise migrate the classification fields to v2.0.0 on reading,
    whose schema is not shipped (the v1.1.0 fields are valid v2.0.0 ones too)."""
    return pystac.Item.from_dict(json.loads(path.read_text()), migrate=False)


@pytest.fixture
def delivered(tiny_pipeline, tmp_path):
    document, write = tiny_pipeline
    document["model"]["architecture"] = "1x1 convolution"
    document["source"]["bands"]["blue"] = document["source"]["bands"]["green"]  # an RGB to show
    document["outputs"]["colors"] = {"land": "#228b22", "water": "#1e90ff"}
    config = write(document)
    assert main(["run", str(config), "--run", "r1", "--window", "2024-05-01/2024-05-11"]) == 0
    return tmp_path / "ws" / "r1" / "deliver"


def test_items_validate_offline_and_describe_the_map(delivered):
    validator = offline_validator()
    item, model = (_read(delivered / name) for name in ("tiny.item.json", "tiny-model.item.json"))
    assert item.validate(validator=validator) and model.validate(validator=validator)
    assert set(item.stac_extensions) >= {
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
        "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
    }

    props = item.properties
    assert (
        props["start_datetime"] == "2024-05-01T00:00:00Z" and props["end_datetime"] == "2024-05-11T00:00:00Z"
    )
    assert props["proj:code"] == "EPSG:32633" and props["proj:shape"] == [50, 70]
    assert props["proj:transform"] == [10.0, 0.0, 400000.0, 0.0, -10.0, 5600000.0]
    assert props["processing:software"] == {"terrabeam": __version__}
    assert props["terrabeam:run"] == "r1"
    lon_min, lat_min, lon_max, lat_max = item.bbox
    assert 13.5 < lon_min < lon_max < 13.6 and 50.5 < lat_min < lat_max < 50.6  # UTM 33N, 400 km E

    classes = item.assets["classes"].extra_fields["classification:classes"]
    assert classes == [
        {"value": 0, "name": "land", "description": "land", "color_hint": "228B22"},
        {"value": 1, "name": "water", "description": "water", "color_hint": "1E90FF"},
    ]
    assert item.assets["classes"].media_type == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert item.assets["probabilities"].extra_fields["raster:bands"][0]["data_type"] == "float32"
    assert "thumbnail" in item.assets["thumbnail"].roles
    for asset in item.assets.values():  # relative links that resolve inside the folder
        assert asset.href.startswith("./") and (delivered / asset.href).exists()
    [link] = [link for link in item.links if link.rel == "derived_from"]
    assert link.href == "./tiny-model.item.json"

    mlm = model.properties
    assert mlm["mlm:framework"] == "ONNX" and mlm["mlm:architecture"] == "1x1 convolution"
    assert mlm["mlm:input"][0]["bands"] == ["red", "green", "nir"]
    assert mlm["mlm:input"][0]["input"]["shape"] == [-1, 3, 20, 36]  # core 32 × 16 + kernel 4 × 4
    assert [c["name"] for c in mlm["mlm:output"][0]["classification:classes"]] == ["land", "water"]
    assert model.assets["model"].roles == ["mlm:model"]


def test_a_broken_item_fails_validation(delivered):
    """The offline validator really checks the extensions: a class without a value is refused."""
    data = json.loads((delivered / "tiny.item.json").read_text())
    del data["assets"]["classes"]["classification:classes"][0]["value"]
    with pytest.raises(pystac.errors.STACValidationError):
        pystac.Item.from_dict(data, migrate=False).validate(validator=offline_validator())


def test_class_cog_carries_colours_names_and_provenance(delivered):
    cog = delivered / "tiny-classes.tif"
    with rasterio.open(cog) as ds:
        colormap = ds.colormap(1)
        tags = ds.tags()
    assert colormap[0][:3] == (0x22, 0x8B, 0x22) and colormap[1][:3] == (0x1E, 0x90, 0xFF)
    assert tags["TERRABEAM_RUN"] == "r1" and tags["TERRABEAM_WINDOW"] == "2024-05-01/2024-05-11"
    assert tags["TERRABEAM_VERSION"] == __version__ and len(tags["TERRABEAM_MODEL_VERSION"]) == 12
    assert tags["TERRABEAM_CONFIG_HASH"] and tags["TERRABEAM_MODEL"] == "model.onnx"
    # GDAL keeps category names beside the COG (QGIS and GDAL read the .aux.xml)
    names = ET.parse(f"{cog}.aux.xml").getroot().findall("./PAMRasterBand/CategoryNames/Category")
    assert [n.text for n in names] == ["land", "water"]
    vrt = ET.parse(delivered / "tiny-classes.vrt").getroot()
    assert [n.text for n in vrt.findall("./VRTRasterBand/CategoryNames/Category")] == ["land", "water"]


def test_quicklook_is_placed_and_shows_the_imagery(delivered):
    png = delivered / "tiny-quicklook.png"
    with rasterio.open(png) as ds:  # world file + aux.xml: GDAL (and QGIS) place it
        assert ds.crs == "EPSG:32633" and ds.count == 4
        enlarge = ds.width // 70
        assert enlarge >= 7  # a 70 px map is enlarged so that title and legend fit
        assert ds.transform.a == pytest.approx(10.0 / enlarge)
        x, y = ds.transform * (0, 0)
        title = (y - 5600000.0) / (10.0 / enlarge)  # rows above the map's top edge
        assert x == pytest.approx(400000.0) and title > 0
        # the map's bottom edge lies where the region's does
        assert (ds.transform * (0, title + 50 * enlarge))[1] == pytest.approx(5600000.0 - 500)
    image = np.asarray(Image.open(png))
    rows = int(round(title))
    map_part = image[rows : rows + 50 * enlarge]
    # the classes are blended with the imagery: not only the two class colours
    assert len(np.unique(map_part[..., :3].reshape(-1, 3), axis=0)) > 10
    assert (map_part[..., 3] == 255).all()


def test_quicklook_nodata_is_transparent_and_legend_wraps():
    """Synthetic labels: nodata (255) without imagery is transparent; shares add up; a legend wider
    than the map wraps onto more lines instead of being cut off."""
    labels = np.full((20, 30), 255, np.uint8)
    labels[:10] = 0
    labels[10:, :15] = 1
    names = [f"class-with-a-long-name-{i}" for i in range(2)]
    style = QuicklookStyle(names, ["#ff0000", "#0000ff"], "t", 0.5, None)
    image, enlarge, title_height, counts = compose_quicklook(labels, style, None)
    assert counts.tolist() == [300, 150]
    map_part = image[title_height : title_height + 20 * enlarge]
    assert (map_part[-1, -1, 3] == 0) and (map_part[0, 0, 3] == 255)
    one_line = compose_quicklook(labels, QuicklookStyle(["a", "b"], ["#ff0000", "#0000ff"], "t"), None)[0]
    assert image.shape[0] >= one_line.shape[0]
    wide = QuicklookStyle([f"{n}-{i}" for i in range(6) for n in names], ["#ff0000"] * 12, "t")
    tall = compose_quicklook(np.zeros((20, 30), np.uint8), wide, None)[0]
    assert tall.shape[0] > one_line.shape[0]  # wrapped onto more legend lines


def test_the_quicklooks_imagery_is_read_beside_the_pipeline(tiny_pipeline, tmp_path, monkeypatch):
    """Synthetic scene: the imagery under the quicklook is read once, in its own thread, and before
    the mosaic starts (beside the pipeline, not in the run's tail); the quicklook shows it."""
    import threading

    from terrabeam.sources import raster
    from terrabeam.workflow import maps

    document, write = tiny_pipeline
    document["source"]["bands"]["blue"] = document["source"]["bands"]["green"]  # an RGB to show
    calls = []
    read_overview, mosaic = raster.read_overview, maps._mosaic

    def reading(*args, **kwargs):
        calls.append(("read", threading.current_thread().name, args[-1]))
        return read_overview(*args, **kwargs)

    def mosaicking(*args, **kwargs):
        calls.append(("mosaic",))
        return mosaic(*args, **kwargs)

    monkeypatch.setattr(raster, "read_overview", reading)
    monkeypatch.setattr(maps, "_mosaic", mosaicking)
    assert main(["run", str(write(document)), "--run", "r1"]) == 0
    assert calls == [("read", "terrabeam-quicklook-imagery_0", (50, 70)), ("mosaic",)]
    image = np.asarray(Image.open(tmp_path / "ws" / "r1" / "deliver" / "tiny-quicklook.png"))
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 10  # imagery under the classes


@pytest.mark.parametrize(
    ("rgb", "message"),
    [(["red", "green"], "needs three bands"), (["red", "green", "ndvi"], "bands with files")],
)
def test_quicklook_rgb_must_name_three_band_files(tiny_pipeline, rgb, message):
    from terrabeam.config import load_config
    from terrabeam.errors import ConfigError

    document, write = tiny_pipeline
    document["source"]["derived"] = {"ndvi": "(nir - red) / (nir + red)"}
    document["outputs"]["quicklook_rgb"] = rgb
    with pytest.raises(ConfigError, match=message):
        load_config(write(document))


def test_tiled_map_has_an_item_per_tile_in_a_collection(tiny_pipeline, tmp_path):
    """70 × 50 px in tiles of 2 × 2 patches of 32 × 16: 3 × 2 tiles, each with an Item beside its
    COGs, all in one Collection with the map's own Item; valid offline, extents cover the tiles."""
    document, write = tiny_pipeline
    document["outputs"]["tile_size"] = 32
    assert main(["run", str(write(document)), "--run", "r1", "--window", "2024-05-01/2024-05-11"]) == 0
    deliver = tmp_path / "ws" / "r1" / "deliver"
    validator = offline_validator()
    collection = pystac.Collection.from_dict(json.loads((deliver / "tiny.collection.json").read_text()))
    assert collection.validate(validator=validator)
    hrefs = [link.href for link in collection.links if link.rel == "item"]
    assert len(hrefs) == 1 + 6 and hrefs[0] == "./tiny.item.json"
    whole = _read(deliver / "tiny.item.json")
    assert whole.collection_id == collection.id and whole.validate(validator=validator)
    boxes = []
    for href in hrefs[1:]:
        item = _read(deliver / href)
        assert item.validate(validator=validator) and item.collection_id == collection.id
        cog = deliver / "tiles" / item.assets["classes"].href
        with rasterio.open(cog) as tile:  # the Item's proj: fields are the tile's own
            assert item.properties["proj:shape"] == [tile.height, tile.width]
            assert item.properties["proj:transform"] == list(tile.transform)[:6]
        boxes.append(item.bbox)
        assert (deliver / "tiles" / item.assets["probabilities"].href).exists()
    west, south, east, north = collection.extent.spatial.bboxes[0]
    assert min(b[0] for b in boxes) == pytest.approx(west) and max(b[2] for b in boxes) == pytest.approx(east)
    assert min(b[1] for b in boxes) == pytest.approx(south) and max(b[3] for b in boxes) == pytest.approx(
        north
    )
    interval = collection.extent.temporal.intervals[0]
    assert [t.isoformat() for t in interval] == ["2024-05-01T00:00:00+00:00", "2024-05-11T00:00:00+00:00"]
