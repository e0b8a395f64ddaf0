"""`terrabeam init`: a starter config from the user's own rasters and model that loads, validates
and runs. The synthetic scene and 1×1-conv model (tiny_pipeline), plus the demo's real Sentinel-2
files and U-Net for what is read from real files (band ids, fixed model input)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine

from terrabeam.cli import main

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def _init(capsys, *argv: object, code: int = 0) -> dict:
    capsys.readouterr()
    assert main(["init", *map(str, argv), "--json"]) == code, capsys.readouterr().err
    return json.load(io.StringIO(capsys.readouterr().out)) if code == 0 else {}


def test_init_then_run_on_synthetic_files(tiny_pipeline, tmp_path, capsys):
    document, _ = tiny_pipeline
    paths = [document["source"]["bands"][b]["path"] for b in ("red", "green", "nir")]
    out = tmp_path / "mine.yaml"
    made = _init(capsys, *paths, "--model", document["model"]["path"], "--out", out)
    assert list(made["bands"]) == ["red", "green", "nir"]  # what sets the file names apart
    assert made["model"] | {"notes": None} == {
        "framework": "onnx",
        "kind": "per_patch",
        "layout": "NCHW",
        "channels": 3,
        "input_size": None,  # the conv takes any size
        "outputs": 2,
        "output": "logits",
        "notes": None,
    }
    config = yaml.safe_load(out.read_text())
    assert config["grid"]["crs"] == "EPSG:32633" and config["grid"]["resolution"] == 10.0
    assert config["model"]["input_bands"] == ["red", "green", "nir"]
    assert config["model"]["classes"] == ["class_0", "class_1"]
    assert config["source"]["bands"]["red"]["path"] == "red.tif"  # beside the config: relative
    assert "CHECK" in out.read_text()  # what the user must decide is marked
    assert main(["validate", str(out)]) == 0
    assert main(["run", str(out), "--run", "r", "--workspace", str(tmp_path / "ws2")]) == 0
    with rasterio.open(tmp_path / "ws2" / "r" / "deliver" / "mine-classes.tif") as ds:
        assert (ds.width, ds.height) == (70, 50) and set(np.unique(ds.read(1))) <= {0, 1}


def test_init_names_bands_of_a_multiband_file_by_description(tmp_path, capsys):
    """A synthetic 4-band GeoTIFF with band descriptions and a model taking 3 of its bands."""
    from conftest import write_conv_model

    path = tmp_path / "scene.tif"
    profile = {
        "driver": "GTiff",
        "width": 40,
        "height": 30,
        "count": 4,
        "dtype": "uint16",
        "crs": "EPSG:3857",
    }
    with rasterio.open(path, "w", transform=Affine(30, 0, 0, 0, -30, 0), nodata=0, **profile) as ds:
        ds.write(np.ones((4, 30, 40), np.uint16))
        ds.descriptions = ("Blue", "Green", "Red", "NIR 1")
    write_conv_model(tmp_path / "m.onnx", channels=3, outputs=4, kernel=1)
    made = _init(
        capsys, path, "--model", tmp_path / "m.onnx", "--out", tmp_path / "c.yaml", "--name", "Scene A"
    )
    assert made["name"] == "scene-a"
    assert made["bands"] == {
        n: {"path": str(path), "band": i} for i, n in enumerate(["blue", "green", "red", "nir_1"], 1)
    }
    text = (tmp_path / "c.yaml").read_text()
    assert "not fed: nir_1" in text and "nodata: 0" in text
    assert main(["validate", str(tmp_path / "c.yaml")]) == 0


def test_init_refuses_what_would_not_work(tiny_pipeline, tmp_path, capsys):
    from conftest import write_conv_model

    document, _ = tiny_pipeline
    red = document["source"]["bands"]["red"]["path"]
    write_conv_model(tmp_path / "wide.onnx", channels=5, outputs=2, kernel=1)
    out = tmp_path / "c.yaml"
    assert main(["init", red, "--model", str(tmp_path / "wide.onnx"), "--out", str(out)]) == 1
    assert "takes 5 input channels but the rasters have 1 bands (red)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".c.yaml*"))  # nothing half-written
    out.write_text("mine\n")
    assert main(["init", red, "--model", document["model"]["path"], "--out", str(out)]) == 1
    assert f"{out}: exists; give another --out or --force" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert (
        main(
            [
                "init",
                str(tmp_path / "none.tif"),
                "--model",
                document["model"]["path"],
                "--out",
                str(out),
                "--force",
            ]
        )
        == 1
    )
    assert "none.tif: cannot read as a raster" in capsys.readouterr().err


@pytest.mark.skipif(not (DEMO / ".complete").exists(), reason="needs the demo data (make test fetches it)")
def test_init_on_the_demo_scene_reads_what_the_demo_config_says(tmp_path, capsys):
    """The real Sentinel-2 files and U-Net: band ids become the common names the demo config uses, and
    the U-Net's fixed 256 × 256 input is cut as the demo cuts it (192 core + 64 margin)."""
    ids = ["B02", "B03", "B04", "B08", "B11", "B12"]
    rasters = [DEMO / "s2l1c" / f"T33UUU_20170216T102101_{b}.jp2" for b in ids]
    model = DEMO / "ukis_csmask" / "model_6b_l1c.onnx"
    made = _init(capsys, *rasters, "--model", model, "--out", tmp_path / "s2.yaml")
    demo = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "examples" / "sentinel2-cloudmask.yaml").read_text()
    )
    assert list(made["bands"]) == demo["model"]["input_bands"]
    assert made["model"]["input_size"] == [256, 256] and made["model"]["outputs"] == len(
        demo["model"]["classes"]
    )
    config = yaml.safe_load((tmp_path / "s2.yaml").read_text())
    assert config["grid"]["patch_size"] == demo["grid"]["patch_size"]
    assert config["grid"]["kernel_size"] == demo["grid"]["kernel_size"]
    assert config["grid"]["crs"] == demo["grid"]["crs"] and config["grid"]["resolution"] == 10.0
    assert "bands at 20 × 20 are resampled" in (tmp_path / "s2.yaml").read_text()
    assert main(["validate", str(tmp_path / "s2.yaml")]) == 0


def test_init_reads_keras_and_torch_models(tiny_pipeline, tmp_path, capsys):
    """Synthetic models: a Keras per-pixel DNN (its declared input), a torch.export per-pixel program
    (its example input) and a TorchScript conv net (tried on a zero patch of the rasters' bands)."""
    keras = pytest.importorskip("keras")
    torch = pytest.importorskip("torch")
    document, _ = tiny_pipeline
    paths = [document["source"]["bands"][b]["path"] for b in ("red", "green", "nir")]
    keras.utils.set_random_seed(0)
    dnn = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax")])
    dnn.save(tmp_path / "dnn.keras")
    linear = torch.nn.Sequential(torch.nn.Linear(3, 5)).eval()
    program = torch.export.export(linear, (torch.zeros(8, 3),), dynamic_shapes=({0: torch.export.Dim("p")},))
    torch.export.save(program, str(tmp_path / "linear.pt2"))
    torch.jit.script(torch.nn.Conv2d(3, 6, 3, padding=1).eval()).save(str(tmp_path / "conv.pt"))
    expected = {
        "dnn.keras": ("tensorflow", "per_pixel", 3, 4, "probabilities"),
        "linear.pt2": ("torch", "per_pixel", 3, 5, "logits"),
        "conv.pt": ("torch", "per_patch", 3, 6, "logits"),
    }
    for name, (framework, kind, channels, outputs, output) in expected.items():
        out = tmp_path / f"{name.replace('.', '-')}.yaml"
        made = _init(capsys, *paths, "--model", tmp_path / name, "--out", out)["model"]
        assert (made["framework"], made["kind"], made["channels"], made["outputs"], made["output"]) == (
            framework, kind, channels, outputs, output,
        ), name  # fmt: skip
        assert main(["validate", str(out)]) == 0, capsys.readouterr().err
