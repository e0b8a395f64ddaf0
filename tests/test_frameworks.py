"""Every model framework through the whole pipeline on a small real scene (a 256 × 128 px crop of the
demo scene's native 20 m bands): the assembled map equals the model applied to the whole crop in
memory. The models are tiny, built here with fixed weights or trained on fixed synthetic labels."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from terrabeam.cli import main

BANDS = {"nir08": "B8A", "swir16": "B11", "swir22": "B12"}
MEAN, STD = [0.3, 0.2, 0.15], [0.2, 0.15, 0.12]
WIDTH, HEIGHT = 256, 128
CLASSES = ["water", "land", "bright"]


def _scene_pixels(demo_data) -> np.ndarray:
    """(H, W, bands) normalised reflectance of the crop, read directly with rasterio."""
    bands = []
    for code in BANDS.values():
        with rasterio.open(demo_data / "s2l1c" / f"T33UUU_20170216T102101_{code}.jp2") as ds:
            bands.append(ds.read(1, window=Window(0, 0, WIDTH, HEIGHT)).astype(np.float32) * np.float32(1e-4))
    stack = np.stack(bands, axis=-1)
    return (stack - np.float32(MEAN)) / np.float32(STD)


def _labels(pixels: np.ndarray) -> np.ndarray:
    """Synthetic training labels from the pixels themselves (terciles of the swir16 band)."""
    low, high = np.percentile(pixels[:, 1], [33, 66])
    return np.where(pixels[:, 1] < low, 0, np.where(pixels[:, 1] > high, 2, 1))


def _run(tmp_path, demo_data, model_path, **model):
    document = {
        "name": "fw",
        "workspace": str(tmp_path / "ws"),
        "source": {
            "bands": {
                name: {"path": str(demo_data / "s2l1c" / f"T33UUU_20170216T102101_{code}.jp2"), "scale": 1e-4}
                for name, code in BANDS.items()
            },
            "resampling": "nearest",
        },
        "grid": {
            "region": {"bbox": [330000, 5822040 - HEIGHT * 20, 330000 + WIDTH * 20, 5822040]},
            "patch_size": [64, 48],
            "kernel_size": model.pop("kernel_size", [0, 0]),
        },
        "model": {
            "path": str(model_path),
            "input_bands": list(BANDS),
            "normalization": {"mean": MEAN, "std": STD},
            "classes": CLASSES,
            "output": "probabilities",
            "batch_size": 3,
            **model,
        },
        "outputs": {"quicklook": False},
    }
    config = tmp_path / f"{model_path.stem}.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    run = model_path.name.replace(".", "-")
    assert main(["run", str(config), "--run", run]) == 0
    deliver = tmp_path / "ws" / run / "deliver"
    with rasterio.open(deliver / "fw-classes.tif") as ds:
        classes = ds.read(1)
    with rasterio.open(deliver / "fw-probabilities.tif") as ds:
        probabilities = ds.read()
    return classes, probabilities


def _assert_same_map(classes, probabilities, expected_probabilities):
    """Probabilities equal to float tolerance; classes equal wherever the top two are not tied."""
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=1e-4, atol=1e-5)
    top2 = np.sort(expected_probabilities, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-4
    np.testing.assert_array_equal(classes[decided], np.argmax(expected_probabilities, axis=0)[decided])
    assert decided.mean() > 0.99
    assert len(np.unique(classes)) >= 2  # the test scene really shows more than one class


def test_sklearn_per_pixel(tmp_path, demo_data):
    joblib = pytest.importorskip("joblib")
    from sklearn.linear_model import LogisticRegression

    pixels = _scene_pixels(demo_data).reshape(-1, 3)
    model = LogisticRegression(max_iter=200).fit(pixels[::7], _labels(pixels[::7]))
    path = tmp_path / "sk.joblib"
    joblib.dump(model, path)
    classes, probabilities = _run(tmp_path, demo_data, path, framework="sklearn", kind="per_pixel")
    expected = model.predict_proba(pixels).T.reshape(3, HEIGHT, WIDTH)
    _assert_same_map(classes, probabilities, expected)


def test_lightgbm_per_pixel(tmp_path, demo_data):
    lightgbm = pytest.importorskip("lightgbm")
    pixels = _scene_pixels(demo_data).reshape(-1, 3)
    train = lightgbm.Dataset(pixels[::5], label=_labels(pixels[::5]))
    booster = lightgbm.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1, "seed": 1}, train, 10
    )
    path = tmp_path / "lgb.txt"
    booster.save_model(str(path))
    classes, probabilities = _run(tmp_path, demo_data, path, framework="lightgbm", kind="per_pixel")
    expected = lightgbm.Booster(model_file=str(path)).predict(pixels).T.reshape(3, HEIGHT, WIDTH)
    _assert_same_map(classes, probabilities, expected)


def test_torch_per_patch_with_margin(tmp_path, demo_data):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Softmax(dim=1)).eval()
    path = tmp_path / "conv.pt"
    torch.jit.script(net).save(str(path))
    classes, probabilities = _run(tmp_path, demo_data, path, framework="torch", kernel_size=[2, 2])
    scene = torch.from_numpy(np.ascontiguousarray(_scene_pixels(demo_data).transpose(2, 0, 1))[None])
    with torch.inference_mode():
        expected = net(scene)[0].numpy()
    # a 3×3 kernel needs 1 px of context: with a 1 px margin the map is seamless away from the edges
    inner = (slice(None), slice(1, -1), slice(1, -1))
    _assert_same_map(classes[inner[1:]], probabilities[inner], expected[inner])


@pytest.mark.parametrize("exported", [False, True], ids=["torchscript", "torch.export"])
def test_torch_models_on_openvino_equal_pytorch(tmp_path, demo_data, exported):
    """engine openvino converts the PyTorch file in memory; the map equals PyTorch's own (fp32)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("openvino")
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1),
                              torch.nn.Softmax(dim=1)).eval()  # fmt: skip
    if exported:
        path = tmp_path / "conv.pt2"
        dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
        torch.export.save(
            torch.export.export(net, (torch.zeros(2, 3, 48, 64),), dynamic_shapes=(dims,)), str(path)
        )
    else:
        path = tmp_path / "conv.pt"
        torch.jit.script(net).save(str(path))
    maps = {}
    for engine in ("torch", "openvino"):
        (tmp_path / engine).mkdir()
        maps[engine] = _run(
            tmp_path / engine, demo_data, path, framework="torch", engine=engine, kernel_size=[2, 2]
        )
    np.testing.assert_allclose(maps["openvino"][1], maps["torch"][1], atol=1e-5)
    assert (maps["openvino"][0] == maps["torch"][0]).mean() > 0.9999


def _keras_pixel_model():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_tensorflow_keras_per_pixel_and_same_map_as_onnx(tmp_path, demo_data):
    """The seed design's kind of model: a Keras per-pixel DNN. Run as TensorFlow and, with the same
    weights written as ONNX, through ONNX Runtime: both maps equal the model in memory."""
    model = _keras_pixel_model()
    path = tmp_path / "dnn.keras"
    model.save(path)
    classes, probabilities = _run(tmp_path, demo_data, path, framework="tensorflow", kind="per_pixel")
    pixels = _scene_pixels(demo_data).reshape(-1, 3)
    expected = np.asarray(model(pixels, training=False)).T.reshape(3, HEIGHT, WIDTH)
    _assert_same_map(classes, probabilities, expected)

    onnx_path = _dense_as_onnx(model, tmp_path / "dnn.onnx")
    onnx_classes, onnx_probabilities = _run(tmp_path, demo_data, onnx_path, kind="per_pixel")
    np.testing.assert_allclose(onnx_probabilities, probabilities, rtol=1e-4, atol=1e-5)
    decided = np.abs(np.diff(np.sort(probabilities, axis=0)[-2:], axis=0))[0] > 1e-4
    np.testing.assert_array_equal(onnx_classes[decided], classes[decided])


def _dense_as_onnx(model, path):
    """The Keras model's weights as an ONNX graph: MatMul + Add + Relu, MatMul + Add + Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (w1, b1), (w2, b2) = (layer.get_weights() for layer in model.layers)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"]),
        helper.make_node("Add", ["h4", "b2"], ["h5"]),
        helper.make_node("Softmax", ["h5"], ["y"], axis=1),
    ]
    weights = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    graph = helper.make_graph(
        nodes,
        "dnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["P", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["P", 3])],
        weights,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, path)
    return path


def test_tensorflow_nhwc_per_patch(tmp_path, demo_data):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(3, 1, activation="softmax")])
    path = tmp_path / "nhwc.keras"
    model.save(path)
    classes, probabilities = _run(tmp_path, demo_data, path, framework="tensorflow", layout="NHWC")
    expected = np.asarray(model(_scene_pixels(demo_data)[None], training=False))[0].transpose(2, 0, 1)
    _assert_same_map(classes, probabilities, expected)


@pytest.mark.parametrize("saved", ["dnn.keras", "dnn_saved"])
def test_tensorflow_models_on_openvino_equal_tensorflow(tmp_path, demo_data, saved):
    """engine openvino converts a Keras file or SavedModel folder in memory; same map as TensorFlow."""
    pytest.importorskip("openvino")
    model = _keras_pixel_model()
    path = tmp_path / saved
    if saved.endswith(".keras"):
        model.save(path)
    else:
        model.export(str(path), verbose=False)
    maps = {}
    for engine in ("tensorflow", "openvino"):
        (tmp_path / engine).mkdir()
        maps[engine] = _run(tmp_path / engine, demo_data, path, framework="tensorflow", kind="per_pixel",
                            engine=engine)  # fmt: skip
    np.testing.assert_allclose(maps["openvino"][1], maps["tensorflow"][1], atol=1e-5)
    assert (maps["openvino"][0] == maps["tensorflow"][0]).mean() > 0.9999


def test_torch_exported_program_per_pixel(tmp_path, demo_data):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Softmax(dim=1)).eval()
    example = torch.zeros(16, 3)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("pixels")},))
    path = tmp_path / "linear.pt2"
    torch.export.save(program, str(path))
    classes, probabilities = _run(tmp_path, demo_data, path, framework="torch", kind="per_pixel")
    pixels = torch.from_numpy(_scene_pixels(demo_data).reshape(-1, 3))
    with torch.inference_mode():
        expected = net(pixels).numpy().T.reshape(3, HEIGHT, WIDTH)
    _assert_same_map(classes, probabilities, expected)


def test_tensorflow_savedmodel_per_pixel(tmp_path, demo_data):
    model = _keras_pixel_model()
    path = tmp_path / "dnn_saved"
    model.export(str(path), verbose=False)  # a SavedModel folder with a serving_default signature
    classes, probabilities = _run(tmp_path, demo_data, path, framework="tensorflow", kind="per_pixel")
    pixels = _scene_pixels(demo_data).reshape(-1, 3)
    expected = np.asarray(model(pixels, training=False)).T.reshape(3, HEIGHT, WIDTH)
    _assert_same_map(classes, probabilities, expected)
