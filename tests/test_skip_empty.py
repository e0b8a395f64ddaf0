"""Empty patches skip the model: a core wholly masked (nodata, NaN) or wholly outside the region
comes back as nodata without a model call, and the run's summary counts it.

The unit tests use small synthetic batches and grids; the end-to-end test runs `terrabeam run` on
the real demo scene and U-Net with an L-shaped polygon region.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform_geom

from terrabeam.cli import main
from terrabeam.config import ModelConfig
from terrabeam.grid import Grid, PatchKey
from terrabeam.predict.io import PreparePatch
from terrabeam.predict.models import PatchModelHandler, empty_cores, run_model
from terrabeam.region import TrueRegion

NAN = np.float32(np.nan)


def _recording(calls: list[np.ndarray]):
    """A per-patch 'model' that records its inputs and returns them doubled (2 bands → 2 outputs)."""

    def predictor(inputs: np.ndarray) -> np.ndarray:
        calls.append(inputs.copy())
        return inputs * 2

    return predictor


def _batch() -> np.ndarray:
    """Three 2-band 6 × 6 patches (margin 1 → 4 × 4 core): whole; all masked; one valid core pixel
    (masked in one band elsewhere only, so the pixel still counts as masked there)."""
    batch = np.random.default_rng(5).random((3, 2, 6, 6)).astype(np.float32)
    batch[1] = NAN
    batch[2, :, 1:5, 1:5] = NAN
    batch[2, :, 3, 2] = 0.5  # the one valid core pixel
    batch[2, 0, 0, :] = NAN  # margin partly masked: no matter
    return batch


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_per_patch_model_sees_only_patches_with_a_valid_core_pixel(layout):
    model = ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y"], layout=layout)
    batch = _batch()
    calls: list[np.ndarray] = []
    out = run_model(_recording(calls), batch, model, (1, 1))
    assert len(calls) == 1
    seen = np.nan_to_num(batch[[0, 2]], nan=0.0)
    expected = seen.transpose(0, 2, 3, 1) if layout == "NHWC" else seen
    np.testing.assert_array_equal(calls[0], expected)  # patch 1 never reached the model
    assert out.shape == (3, 2, 6, 6)
    np.testing.assert_array_equal(out[0], batch[0] * 2)
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[2], np.where(np.isnan(batch[2]).any(axis=0), NAN, batch[2] * 2))
    np.testing.assert_array_equal(empty_cores(batch, (1, 1)), [False, True, False])


def test_a_batch_of_empty_patches_makes_no_model_call():
    model = ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y", "z"])
    batch = np.full((2, 2, 6, 6), NAN)
    calls: list[np.ndarray] = []
    out = run_model(_recording(calls), batch, model, (1, 1))
    assert calls == []
    assert out.shape == (2, 3, 6, 6) and out.dtype == np.float32 and np.isnan(out).all()


def test_only_the_core_decides_a_patch_is_empty():
    """Data in the margin alone is context for nothing: the patch is skipped; one valid core pixel
    is enough to keep it."""
    model = ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y"])
    batch = np.random.default_rng(6).random((2, 2, 8, 8)).astype(np.float32)
    batch[:, :, 2:6, 2:6] = NAN  # margin 2: the cores masked, the margins full of data
    batch[1, :, 5, 5] = 0.25
    np.testing.assert_array_equal(empty_cores(batch, (2, 2)), [True, False])
    np.testing.assert_array_equal(empty_cores(batch, (1, 1)), [False, False])  # margin 1: core has data
    calls: list[np.ndarray] = []
    out = run_model(_recording(calls), batch, model, (2, 2))
    assert len(calls) == 1 and calls[0].shape == (1, 2, 8, 8)
    assert np.isnan(out[0]).all() and out[1, 0, 5, 5] == 0.5


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


@pytest.mark.parametrize("kind", ["per_patch", "per_pixel"])
def test_the_handler_counts_patches_whose_core_is_empty(kind):
    model = ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y"], kind=kind)
    handler = PatchModelHandler(model, "m.onnx", (1, 1))
    handler._skipped = _Counter()
    calls: list[np.ndarray] = []
    results = handler.run_inference(list(_batch()), _recording(calls))
    assert handler._skipped.value == 1
    assert len(results) == 3 and np.isnan(results[1].inference).all()
    if kind == "per_pixel":  # core pixels only: 16 of patch 0, the one valid pixel of patch 2
        assert len(calls) == 1 and calls[0].shape == (17, 2)


def _grid(per_row: int = 3, total: int = 6) -> Grid:
    """4 × 4 px patches, 10 m pixels, top-left at (1000, 2000)."""
    return Grid("EPSG:32633", Affine(10, 0, 1000, 0, -10, 2000), 4, 4, per_row, total)


def test_cores_beyond_the_region_width_or_height_are_outside():
    region = TrueRegion(_grid(), width=8, height=5)  # columns 0–1 in; row 1 has one pixel row in
    assert [region.core_outside(i) for i in range(6)] == [False, False, True, False, False, True]
    assert not TrueRegion(_grid(), width=9, height=8).core_outside(2)  # one pixel column is in


def test_cores_outside_the_polygon_by_pixel_centres():
    # The grid: x 1000–1120, y 2000–1920; patch 1's core is x 1040–1080, its first pixel centre
    # (1045, 1995). Both polygons reach into patch 1's core; only the second holds a pixel centre.
    triangle = {"type": "Polygon", "coordinates": [[[1000, 2000], [1044, 2000], [1000, 1960], [1000, 2000]]]}
    region = TrueRegion(_grid(), width=12, height=8, polygon=triangle)
    assert [region.core_outside(i) for i in range(6)] == [False, True, True, True, True, True]
    corner = [[1000, 2000], [1046, 2000], [1046, 1994], [1000, 1960], [1000, 2000]]
    region = TrueRegion(_grid(), width=12, height=8, polygon={"type": "Polygon", "coordinates": [corner]})
    assert [region.core_outside(i) for i in range(6)] == [False, False, True, True, True, True]
    far = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}
    assert all(TrueRegion(_grid(), 12, 8, far).core_outside(i) for i in range(6))


def test_prepare_patch_empties_only_patches_wholly_outside():
    region = TrueRegion(_grid(), width=8, height=8)
    prepare = PreparePatch(["a", "b"], ([2.0, 2.0], [1.0, 1.0]), nodata=None, region=region)
    patch = {"a": np.ones((6, 6), np.float32), "b": np.zeros((6, 6), np.float32)}  # margin 1 each side
    [(_, inside)] = prepare.process((PatchKey(1), patch))
    [(_, outside)] = prepare.process((PatchKey(2), patch))
    np.testing.assert_array_equal(inside, np.stack([np.full((6, 6), 3.0), np.ones((6, 6))]))
    assert outside.shape == (2, 6, 6) and outside.dtype == np.float32 and np.isnan(outside).all()


# The demo scene: 768 × 384 px of 20 m from (330000, 5822040). The region, inset 5.5 px, snaps to
# 758 × 374 px from (330100, 5821940): 4 × 2 patches of 192 px.
_LEFT, _TOP = 330100.0, 5821940.0
_L_SHAPE_PX = [(0.5, 0.5), (757.5, 0.5), (757.5, 100), (250, 100), (250, 373.5), (0.5, 373.5)]
_SKIPPED = [6, 7]  # row 1, columns 2 and 3: below y 100 and right of x 250


def _l_shape_config(tmp, demo_data) -> tuple:
    from conftest import DEMO_CONFIG

    ring = [(_LEFT + 20 * x, _TOP - 20 * y) for x, y in _L_SHAPE_PX]
    polygon = transform_geom("EPSG:32633", "EPSG:4326", {"type": "Polygon", "coordinates": [ring + ring[:1]]})
    config = tmp / "config.yaml"
    config.write_text(
        DEMO_CONFIG.read_text()
        .replace("../data/demo", str(demo_data))
        .replace("workspace: ../workspace", f"workspace: {tmp / 'ws'}")
        .replace(
            "  # region: default is the extent of the first band (the whole scene)\n",
            f"  region: {{geojson: {json.dumps(polygon)}}}\n",
        )
    )
    return config


def _maps(run) -> tuple[np.ndarray, np.ndarray]:
    deliver = run / "deliver"
    with rasterio.open(deliver / "sentinel2-cloudmask-classes.tif") as ds:
        classes = ds.read(1)
    with rasterio.open(deliver / "sentinel2-cloudmask-probabilities.tif") as ds:
        probabilities = ds.read()
    return classes, probabilities


def test_patches_outside_a_polygon_skip_the_model_and_the_map_is_unchanged(tmp_path, demo_data, monkeypatch):
    """The same run twice: once with skipping turned off (every patch through the model, as before
    skipping existed), once as is. The maps must be identical; the patches skipped are those whose
    core the unskipped map shows wholly nodata."""
    config = _l_shape_config(tmp_path, demo_data)
    with monkeypatch.context() as m:
        m.setattr(TrueRegion, "core_outside", lambda self, index: False)
        m.setattr("terrabeam.predict.models.empty_cores", lambda batch, margin: np.zeros(len(batch), bool))
        assert main(["run", str(config), "--run", "every"]) == 0
    assert main(["run", str(config), "--run", "skipping"]) == 0
    every, skipping = tmp_path / "ws" / "every", tmp_path / "ws" / "skipping"
    assert json.loads((every / "summary.json").read_text())["patches_skipped"] == 0

    summary = json.loads((skipping / "summary.json").read_text())
    assert summary["region_pixels"] == [758, 374] and summary["patches"] == 8
    assert summary["patches_skipped"] == summary["steps"]["map"]["patches_skipped"] == len(_SKIPPED)
    classes, probabilities = _maps(every)
    nodata_cores = [
        i
        for i in range(8)
        if (classes[(i // 4) * 192 : (i // 4 + 1) * 192, (i % 4) * 192 : (i % 4 + 1) * 192] == 255).all()
    ]
    assert nodata_cores == _SKIPPED
    assert (classes != 255).mean() > 0.4  # about half the grid is in the polygon
    skipped_classes, skipped_probabilities = _maps(skipping)
    assert np.array_equal(skipped_classes, classes)
    assert np.array_equal(skipped_probabilities, probabilities, equal_nan=True)


def test_predict_step_counts_patches_outside_the_polygon(tmp_path, tiny_pipeline, capsys):
    """Synthetic scene (tiny_pipeline), the steps alone: a triangle region, inset half a pixel, snaps
    to 61 × 41 px from (400050, 5599950): 2 × 3 patches of 32 × 16; only the bottom-right core
    (x 32–61, y 32–41 px) has no pixel centre in the triangle."""
    document, write = tiny_pipeline
    triangle = [(400055, 5599945), (400655, 5599945), (400055, 5599545), (400055, 5599945)]
    geometry = transform_geom("EPSG:32633", "EPSG:4326", {"type": "Polygon", "coordinates": [triangle]})
    document["grid"] = document["grid"] | {"region": {"geojson": geometry}}
    config = str(write(document))
    assert main(["export", config, "--run", "r"]) == 0
    capsys.readouterr()
    assert main(["predict", config, "--run", "r", "--json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["patches"] == 6 and details["patches_skipped"] == 1
