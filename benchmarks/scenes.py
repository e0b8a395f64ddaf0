"""Benchmark inputs from the real demo data: the scene tiled to larger areas, configs, a light model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
import yaml
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "examples" / "sentinel2-cloudmask.yaml"
LANDCOVER_CONFIG = REPO / "examples" / "sentinel2-landcover-dnn.yaml"
DEMO_DATA = REPO / "data" / "demo"
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11", "swir22": "B12"}


def tiled_scene(out: Path, factor: int) -> dict[str, Path]:
    """The real scene's six bands repeated √factor × √factor times (eastward and southward) as tiled
    GeoTIFFs on the scene's own grid: 1× = the scene, 16× = 4 × 4 scenes. Writes one tile at a time."""
    side = math.isqrt(factor)
    if side * side != factor:
        raise ValueError(f"factor {factor} must be a square number")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, code in BANDS.items():
        with rasterio.open(DEMO_DATA / "s2l1c" / f"T33UUU_20170216T102101_{code}.jp2") as src:
            data = src.read(1)
            profile = {
                "driver": "GTiff",
                "dtype": data.dtype,
                "count": 1,
                "crs": src.crs,
                "transform": src.transform,
                "width": src.width * side,
                "height": src.height * side,
                "tiled": True,
                "blockxsize": 512,
                "blockysize": 512,
            }
        path = out / f"{name}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            for iy in range(side):
                for ix in range(side):
                    dst.write(
                        data[None], window=Window(ix * data.shape[1], iy * data.shape[0], *data.shape[::-1])
                    )
        paths[name] = path
    return paths


def pixel_model(path: Path, channels: int = 6, classes: int = 3) -> Path:
    """A light per-pixel model: a 1×1 convolution (a linear classifier on each pixel), fixed weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(classes, channels, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])],
        "pixel_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes, "H", "W"])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def keras_pixel_model(path: Path) -> Path:
    """The land-cover example's Keras DNN (untrained, fixed seed): a per-pixel TensorFlow model."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from build_landcover_dnn import build_model
    finally:
        sys.path.remove(str(REPO / "examples"))
    build_model().save(path)
    return path


def scene_config(
    path: Path, bands: dict[str, Path], workspace: Path, model: Path | None = None, base: Path = DEMO_CONFIG
) -> Path:
    """``base`` (the demo config) on other band files (and optionally another model), written to ``path``."""
    document = yaml.safe_load(base.read_text())
    # export settings must match the demo's so one export serves every model
    document["grid"] = yaml.safe_load(DEMO_CONFIG.read_text())["grid"]
    document["export"] = yaml.safe_load(DEMO_CONFIG.read_text())["export"]
    document["workspace"] = str(workspace)
    for name, band_path in bands.items():
        document["source"]["bands"][name]["path"] = str(band_path)
    document["model"]["path"] = str(model or DEMO_DATA / "ukis_csmask" / "model_6b_l1c.onnx")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_variant(config: Path, work: Path, name: str, edit) -> tuple[dict, np.ndarray]:
    """`terrabeam run` of ``config`` changed by ``edit(document)`` in its own workspace under
    ``work``: (the run's summary, its class map)."""
    import json
    import shutil
    import subprocess
    import sys

    document = yaml.safe_load(config.read_text())
    edit(document)
    workspace = work / f"ws-{name}"
    shutil.rmtree(workspace, ignore_errors=True)
    document["workspace"] = str(workspace)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    subprocess.run([sys.executable, "-m", "terrabeam", "-q", "run", str(path), "--run", "r"], check=True)
    summary = json.loads((workspace / "r" / "summary.json").read_text())
    with rasterio.open(workspace / "r" / "deliver" / f"{document['name']}-classes.tif") as ds:
        return summary, ds.read(1)
