"""Model spec handling: optional frameworks stay optional, masked pixels never reach a per-pixel model
and come out as nodata, regression outputs, validation messages. Synthetic scene (tiny_pipeline)."""

from __future__ import annotations

import copy
import re
from importlib import metadata

import numpy as np
import pytest
import rasterio
from onnx import TensorProto, helper, numpy_helper

from terrabeam.cli import main
from terrabeam.errors import ModelError
from terrabeam.predict.frameworks import require
from terrabeam.predict.models import run_model


def _closure(requirement_names: list[str]) -> set[str]:
    """Names of the installed distributions a set of requirements pulls in, transitively."""
    seen: set[str] = set()
    todo = list(requirement_names)
    while todo:
        name = re.split(r"[\s<>=!~;\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend(r for r in requires if "extra ==" not in r)
    return seen


def test_base_install_does_not_pull_tensorflow_or_torch():
    base = [r for r in metadata.requires("terrabeam") if "extra ==" not in r]
    closure = _closure(base)
    assert "onnxruntime" in closure and "apache-beam" in closure
    heavy = {
        n
        for n in closure
        if n.startswith(("tensorflow", "torch", "keras", "jax", "scikit-learn", "lightgbm"))
    }
    assert heavy == set()


def test_missing_framework_names_the_extra():
    with pytest.raises(ModelError, match=r"pip install 'terrabeam\[tensorflow\]'"):
        require("tensorflow_is_not_installed_here", "tensorflow")


def _pixel_matmul(path, weights: np.ndarray):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "pixels",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["P", weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["P", weights.shape[1]])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    import onnx

    onnx.save(model, path)


def test_per_pixel_model_never_sees_masked_pixels():
    calls = []

    def predictor(pixels):
        calls.append(pixels.copy())
        return pixels[:, :2] * 2

    batch = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6)
    batch[1, :, 3, 3] = np.nan
    from terrabeam.config import ModelConfig

    model = ModelConfig(path="m", input_bands=["a", "b", "c"], classes=["x", "y"], kind="per_pixel")
    out = run_model(predictor, batch, model, margin=(1, 1))
    assert len(calls) == 1  # one call for every pixel of the batch
    assert calls[0].shape == (2 * 4 * 4 - 1, 3)  # core pixels only, the masked one left out
    assert out.shape == (2, 2, 4, 4)
    assert np.isnan(out[1, :, 2, 2]).all() and np.isfinite(out[0]).all()
    np.testing.assert_array_equal(out[0, 0], batch[0, 0, 1:5, 1:5] * 2)


def test_nodata_pixels_become_nodata_in_the_maps(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    for band in ("red", "green", "nir"):
        with rasterio.open(document["source"]["bands"][band]["path"], "r+") as ds:
            data = ds.read(1)
            data[data == 0] = 1  # the random scene may hold zeros of its own
            if band == "red":
                data[10:20, 30:40] = 0
            ds.write(data, 1)
    doc = copy.deepcopy(document)
    doc["model"]["nodata"] = 0
    assert main(["run", str(write(doc)), "--run", "r"]) == 0
    deliver = tmp_path / "ws" / "r" / "deliver"
    with rasterio.open(deliver / "tiny-classes.tif") as ds:
        classes = ds.read(1)
    with rasterio.open(deliver / "tiny-probabilities.tif") as ds:
        probs = ds.read()
    assert (classes[10:20, 30:40] == 255).all()
    assert np.isnan(probs[:, 10:20, 30:40]).all()
    outside = np.ones(classes.shape, bool)
    outside[10:20, 30:40] = False
    assert (classes[outside] != 255).all() and np.isfinite(probs[:, outside]).all()


def test_regression_per_pixel_writes_named_float_bands(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    weights = np.array([[1.0, 0.5], [0.0, -1.0], [2.0, 0.25]])
    _pixel_matmul(tmp_path / "reg.onnx", weights)
    doc = copy.deepcopy(document)
    doc["model"] = {
        "path": str(tmp_path / "reg.onnx"),
        "kind": "per_pixel",
        "input_bands": ["red", "green", "nir"],
        "normalization": {"scale": [10, 10, 10], "offset": [0, 0, 1]},
        "output": "regression",
        "regression_bands": ["biomass", "height"],
    }
    assert main(["run", str(write(doc)), "--run", "r"]) == 0
    deliver = tmp_path / "ws" / "r" / "deliver"
    assert sorted(p.name for p in deliver.iterdir()) == [
        "tiles",
        "tiny-model.item.json",
        "tiny-values.tif",
        "tiny-values.vrt",
        "tiny.item.json",
    ]
    stack = []
    for band in ("red", "green", "nir"):
        with rasterio.open(document["source"]["bands"][band]["path"]) as ds:
            stack.append(ds.read(1).astype(np.float32) * np.float32(1e-4))
    x = np.stack(stack, axis=-1) * np.float32(10) + np.float32([0, 0, 1])
    expected = (x.reshape(-1, 3) @ weights.astype(np.float32)).T.reshape(2, 50, 70)
    with rasterio.open(deliver / "tiny-values.tif") as ds:
        assert ds.descriptions == ("biomass", "height") and ds.dtypes == ("float32", "float32")
        np.testing.assert_allclose(ds.read(), expected, rtol=1e-5, atol=1e-5)


def test_integer_regression_with_nodata(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    _pixel_matmul(tmp_path / "reg.onnx", np.array([[300.0], [0.0], [0.0]]))
    for band in ("red", "green", "nir"):
        with rasterio.open(document["source"]["bands"][band]["path"], "r+") as ds:
            data = ds.read(1)
            data[data == 0] = 1
            if band == "nir":
                data[0:5, 0:5] = 0
            ds.write(data, 1)
    doc = copy.deepcopy(document)
    doc["model"] = {
        "path": str(tmp_path / "reg.onnx"),
        "kind": "per_pixel",
        "input_bands": ["red", "green", "nir"],
        "nodata": 0,
        "output": "regression",
        "regression_bands": ["score"],
        "regression_dtype": "uint8",
        "regression_nodata": 255,
    }
    assert main(["run", str(write(doc)), "--run", "r"]) == 0
    with rasterio.open(document["source"]["bands"]["red"]["path"]) as ds:
        red = ds.read(1).astype(np.float32) * np.float32(1e-4)
    with rasterio.open(tmp_path / "ws" / "r" / "deliver" / "tiny-values.tif") as ds:
        assert ds.dtypes == ("uint8",) and ds.nodata == 255
        values = ds.read(1)
    assert (values[0:5, 0:5] == 255).all()
    expected = np.clip(np.rint(red * np.float32(300)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(values[5:, 5:], expected[5:, 5:])


def test_output_count_mismatch_fails_before_export(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["model"]["classes"] = ["a", "b", "c"]
    assert main(["run", str(write(doc)), "--run", "r"]) == 1
    assert "model returns 2 outputs but the config names 3 ['a', 'b', 'c']" in capsys.readouterr().err
    assert not (tmp_path / "ws" / "r" / "export").exists()


def test_config_needs_classes_or_regression_bands(tiny_pipeline, capsys):
    document, write = tiny_pipeline
    doc = copy.deepcopy(document)
    doc["model"]["output"] = "regression"
    assert main(["validate", str(write(doc))]) == 1
    assert "output: regression needs regression_bands" in capsys.readouterr().err
    doc = copy.deepcopy(document)
    doc["model"]["normalization"] = {"mean": [0, 0, 0], "scale": [1, 1, 1]}
    assert main(["validate", str(write(doc))]) == 1
    assert "give either mean and std, or scale and offset" in capsys.readouterr().err


def test_run_model_masks_nan_and_passes_finite_batches_through_unchanged():
    """Synthetic: a finite batch reaches the model as the same array (no copy); NaN pixels are fed as
    0 and come out NaN; the handler counts batch bytes from the arrays (not by pickling)."""
    from terrabeam.config import ModelConfig
    from terrabeam.predict.models import PatchModelHandler, run_model

    model = ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y"])
    seen = []

    def identity(inputs):
        seen.append(inputs)
        return inputs

    batch = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    np.testing.assert_array_equal(run_model(identity, batch, model, (0, 0)), batch)
    assert seen[-1] is batch
    masked = batch.copy()
    masked[1, 0, 2, 3] = np.nan
    out = run_model(identity, masked, model, (0, 0))
    assert seen[-1][1, 0, 2, 3] == 0 and np.isnan(out[1, :, 2, 3]).all()
    assert np.isfinite(np.delete(out.reshape(2, 2, -1), 11, axis=2)).all()
    handler = PatchModelHandler(model, "m.onnx", (0, 0))
    assert handler.get_num_bytes(list(batch)) == batch.nbytes


def test_a_model_that_returns_the_core_gets_its_masked_pixels_right():
    """Synthetic: a per-patch model may crop the kernel margin itself (the probe accepts core-size
    outputs); a masked pixel then comes out NaN at its place in the core, in batches where every
    patch is seen and where one is not (all its core masked)."""
    from terrabeam.config import ModelConfig
    from terrabeam.predict.models import run_model

    model = ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y"])

    def crop(inputs):  # the core of a 2 px margin, channels kept
        return inputs[:, :, 2:-2, 2:-2] * 2

    batch = np.random.default_rng(0).random((3, 2, 12, 12), dtype=np.float32)
    batch[1, 0, 5, 6] = np.nan  # inside the core: (3, 4) there
    batch[2, :, 2:10, 2:10] = np.nan  # patch 2: its whole core masked, so not seen
    out = run_model(crop, batch, model, (2, 2))
    assert out.shape == (3, 2, 8, 8)
    assert np.isnan(out[1, :, 3, 4]).all() and np.isnan(out[1]).sum() == 2
    assert np.isnan(out[2]).all()
    np.testing.assert_array_equal(out[0], batch[0, :, 2:-2, 2:-2] * 2)


def test_per_pixel_run_model_feeds_only_unmasked_pixels():
    """Synthetic: a per-pixel model sees every pixel when none is masked, and only the unmasked ones
    otherwise; masked pixels come out NaN in every output."""
    from terrabeam.config import ModelConfig
    from terrabeam.predict.models import run_model

    model = ModelConfig(path="m.onnx", kind="per_pixel", input_bands=["a", "b"], classes=["x", "y", "z"])
    calls = []

    def three_outputs(pixels):
        calls.append(pixels.shape[0])
        return np.stack([pixels[:, 0], pixels[:, 1], pixels.sum(axis=1)], axis=1)

    batch = np.random.default_rng(1).random((2, 2, 6, 8)).astype(np.float32)  # margin 1 → 4 × 6 core
    out = run_model(three_outputs, batch, model, (1, 1))
    assert out.shape == (2, 3, 4, 6) and calls == [48]
    np.testing.assert_array_equal(out[:, 0], batch[:, 0, 1:5, 1:7])
    batch[0, 1, 2, 3] = np.nan  # core pixel (1, 2) of patch 0
    out = run_model(three_outputs, batch, model, (1, 1))
    assert calls[-1] == 47 and np.isnan(out[0, :, 1, 2]).all()
    assert np.isfinite(out).sum() == 3 * 47


def test_the_probe_hands_its_model_to_the_first_load_in_this_process(tmp_path, monkeypatch):
    """Synthetic 1×1 conv model. The probe's session is reused once (no second load), then loads
    are fresh again; forget_probed() drops a model nobody took."""
    from conftest import write_conv_model

    from terrabeam.config import parse_config
    from terrabeam.predict import models

    write_conv_model(tmp_path / "m.onnx", channels=2, outputs=2, kernel=1)
    config = parse_config(
        {
            "name": "t",
            "source": {"bands": {"a": {"path": "a.tif"}, "b": {"path": "b.tif"}}},
            "model": {"path": "m.onnx", "input_bands": ["a", "b"], "classes": ["x", "y"]},
        },
        tmp_path,
    )
    path = str(tmp_path / "m.onnx")
    loads = []
    real = models.load_predictor
    monkeypatch.setattr(models, "load_predictor", lambda *a: loads.append(a) or real(*a))
    models.probe_model(config.model, path, (8, 8))
    assert len(loads) == 1
    handler = models.PatchModelHandler(config.model, path, (0, 0))
    first = handler.load_model()
    assert len(loads) == 1, "the probe's model is handed over, not loaded again"
    assert handler.load_model() is not first and len(loads) == 2
    models.probe_model(config.model, path, (8, 8))
    models.forget_probed()
    handler.load_model()
    assert len(loads) == 4


def test_the_model_sees_batches_of_the_configured_size(tmp_path, tiny_pipeline, monkeypatch):
    """Synthetic scene (12 patches, one tile), batch_size 5: batches 5, 5, 2. Beam's adaptive
    batching (min 1) would start at 1 and grow, and ONNX Runtime's memory with it."""
    from terrabeam.predict import models

    document, write = tiny_pipeline
    document["model"]["batch_size"] = 5
    sizes: list[int] = []
    real = models.PatchModelHandler.run_inference

    def recorded(self, batch, model, inference_args=None):
        sizes.append(len(batch))
        return real(self, batch, model, inference_args)

    monkeypatch.setattr(models.PatchModelHandler, "run_inference", recorded)
    assert main(["run", str(write(document)), "--run", "r"]) == 0
    assert sorted(sizes, reverse=True) == [5, 5, 2]


def test_onnx_runtime_on_the_cpu_keeps_no_memory_pattern_and_does_not_spin(tmp_path, monkeypatch):
    """Synthetic 1×1 conv model: the CPU session is made without ONNX Runtime's memory pattern (a
    planned block kept per input shape: +42 MiB for the U-Net at batch 4, BENCHMARKS.md) and
    without its pool threads busy-waiting between calls (they took the cores of the reads)."""
    import onnxruntime as ort
    from conftest import write_conv_model

    from terrabeam.predict.engines import Runtime
    from terrabeam.predict.frameworks import onnx_model

    write_conv_model(tmp_path / "m.onnx", channels=2, outputs=2, kernel=1)
    made = []
    real = ort.InferenceSession
    monkeypatch.setattr(
        onnx_model.ort, "InferenceSession", lambda *a, **k: made.append(a[1]) or real(*a, **k)
    )
    predict = onnx_model.load(
        str(tmp_path / "m.onnx"), "classification", Runtime("onnxruntime", "cpu", "fp32", 1, 0)
    )
    assert predict(np.ones((3, 2, 4, 4), np.float32)).shape == (3, 2, 4, 4)
    assert [options.enable_mem_pattern for options in made] == [False]
    assert made[0].intra_op_num_threads == 1
    assert made[0].get_session_config_entry(onnx_model.SPINNING) == "0"
