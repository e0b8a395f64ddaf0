"""A kernel margin removes patch seams: with a 5×5 convolution (built here in ONNX, fixed random
weights) and a margin of 2 px a side, the assembled map equals the convolution applied to the whole
real scene at once, away from the scene's own edges; without a margin it does not."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
import yaml
from conftest import write_conv_model

from terrabeam.cli import main


def _config(tmp_path, demo_data, kernel):
    scene = demo_data / "s2l1c"
    document = {
        "name": "conv",
        "workspace": str(tmp_path / "ws"),
        "source": {
            "bands": {
                "swir16": {"path": str(scene / "T33UUU_20170216T102101_B11.jp2"), "scale": 1e-4},
                "swir22": {"path": str(scene / "T33UUU_20170216T102101_B12.jp2"), "scale": 1e-4},
            },
            "resampling": "nearest",
        },
        "grid": {"patch_size": [64, 48], "kernel_size": kernel},
        "export": {"prefix": "conv", "max_file_size": 300_000},
        "model": {
            "path": str(tmp_path / "conv.onnx"),
            "input_bands": ["swir16", "swir22"],
            "output": "probabilities",
            "classes": ["a", "b"],
            "batch_size": 8,
        },
        "outputs": {"quicklook": False},
    }
    path = tmp_path / f"conv-{kernel[0]}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _whole_scene_convolution(tmp_path, demo_data):
    bands = []
    for name in ("B11", "B12"):
        with rasterio.open(demo_data / "s2l1c" / f"T33UUU_20170216T102101_{name}.jp2") as ds:
            bands.append(ds.read(1).astype(np.float32) * np.float32(1e-4))
    session = ort.InferenceSession(str(tmp_path / "conv.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.stack(bands)[None]})[0][0]


def _assembled(tmp_path, demo_data, kernel, run):
    assert main(["run", str(_config(tmp_path, demo_data, kernel)), "--run", run]) == 0
    with rasterio.open(tmp_path / "ws" / run / "deliver" / "conv-probabilities.tif") as ds:
        return ds.read()


@pytest.fixture
def conv_model(tmp_path):
    write_conv_model(tmp_path / "conv.onnx")


def test_margin_gives_seamless_map(tmp_path, demo_data, conv_model):
    expected = _whole_scene_convolution(tmp_path, demo_data)
    seamless = _assembled(tmp_path, demo_data, [4, 4], "margin")
    assert seamless.shape == expected.shape == (2, 384, 768)
    interior = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(seamless[interior], expected[interior], rtol=1e-5, atol=1e-5)

    seamed = _assembled(tmp_path, demo_data, [0, 0], "no-margin")
    difference = np.abs(seamed - expected)[interior].max(axis=0)
    # Without a margin the zero padding of each patch shows along patch borders (every 64 px / 48 px).
    assert difference[:, 64 - 2 - 1].max() > 1e-3
    assert difference[48 - 2 - 1, :].max() > 1e-3
    np.testing.assert_allclose(seamed[:, 10:40, 10:50], expected[:, 10:40, 10:50], rtol=1e-5, atol=1e-5)
