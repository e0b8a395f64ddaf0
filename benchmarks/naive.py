"""The baseline a user would write: rasterio windowed read → model → rasterio windowed write, one process.

Same work as a terrabeam run: the same 20 m grid, patches with the same margin, the same
normalisation and model, softmax/argmax, and a class map plus a probability GeoTIFF cropped to the
scene. No TFRecords, no Beam, no COG conversion, one patch per model call.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from terrabeam.config import PipelineConfig


def naive_run(config: PipelineConfig, out_dir: Path) -> tuple[float, int]:
    """(seconds, pixels) for the whole scene of ``config``."""
    start = time.perf_counter()
    model = config.model
    norm = model.normalization
    mean = np.asarray(norm.mean, np.float32)[:, None, None]
    std = np.asarray(norm.std, np.float32)[:, None, None]
    pw, ph = config.grid.patch_size
    kw, kh = config.grid.kernel_size
    resolution = config.grid.resolution
    sources = [rasterio.open(config.resolve(config.source.bands[b].path)) for b in model.input_bands]
    scales = [np.float32(config.source.bands[b].scale) for b in model.input_bands]
    first = sources[0]
    width = round(first.width * abs(first.transform.a) / resolution)
    height = round(first.height * abs(first.transform.e) / resolution)
    transform = first.transform @ Affine.scale(resolution / abs(first.transform.a))
    session = ort.InferenceSession(str(config.resolve(model.path)), providers=ort.get_available_providers())
    name = session.get_inputs()[0].name
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "crs": first.crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        rasterio.open(out_dir / "classes.tif", "w", count=1, dtype="uint8", **profile) as classes,
        rasterio.open(
            out_dir / "probabilities.tif", "w", count=len(model.classes), dtype="float32", **profile
        ) as probabilities,
    ):
        for row in range(math.ceil(height / ph)):
            for col in range(math.ceil(width / pw)):
                x0, y0 = col * pw - kw // 2, row * ph - kh // 2
                patch = np.empty((len(sources), ph + kh, pw + kw), np.float32)
                for i, (src, scale) in enumerate(zip(sources, scales, strict=True)):
                    factor = resolution / abs(src.transform.a)
                    window = Window(x0 * factor, y0 * factor, (pw + kw) * factor, (ph + kh) * factor)
                    patch[i] = (
                        src.read(
                            1,
                            window=window,
                            out_shape=(ph + kh, pw + kw),
                            boundless=True,
                            fill_value=0,
                            resampling=Resampling.average,
                        )
                        * scale
                    )
                logits = session.run(None, {name: ((patch - mean) / std)[None]})[0][0]
                core = logits[:, kh // 2 : kh // 2 + ph, kw // 2 : kw // 2 + pw]
                exp = np.exp(core - core.max(axis=0))
                probs = exp / exp.sum(axis=0)
                rows, cols = min(ph, height - row * ph), min(pw, width - col * pw)
                target = Window(col * pw, row * ph, cols, rows)
                classes.write(probs.argmax(axis=0).astype(np.uint8)[None, :rows, :cols], window=target)
                probabilities.write(probs[:, :rows, :cols], window=target)
    for src in sources:
        src.close()
    return time.perf_counter() - start, width * height
