"""Engines side by side: the whole `terrabeam run` (rasters → model → map tiles) with ONNX Runtime
fp32, OpenVINO fp32 and OpenVINO bf16 (where the CPU has bf16 units), same scene, model, threads and
batch; Mpx/s from each run's summary, the ratio to ONNX Runtime fp32 and the share of map pixels
given the same class as ONNX Runtime fp32.

    python -m benchmarks.engines [SCALE] [WORKDIR]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import yaml

from benchmarks.scenes import pixel_model, scene_config, tiled_scene
from terrabeam.predict.engines import cpu_supports_bf16

SETTINGS = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def run_engine(config: Path, work: Path, engine: str, precision: str) -> tuple[float, np.ndarray]:
    """(Mpx/s of the run, its class map) with the model on ``engine`` at ``precision``."""
    document = yaml.safe_load(config.read_text())
    document["model"] |= {"engine": engine, "precision": precision, "threads": 2}
    workspace = work / f"ws-{config.stem}-{engine}-{precision}"
    shutil.rmtree(workspace, ignore_errors=True)
    document["workspace"] = str(workspace)
    variant = work / f"{config.stem}-{engine}-{precision}.yaml"
    variant.write_text(yaml.safe_dump(document, sort_keys=False))
    subprocess.run([sys.executable, "-m", "terrabeam", "-q", "run", str(variant), "--run", "r"], check=True)
    summary = json.loads((workspace / "r" / "summary.json").read_text())
    with rasterio.open(workspace / "r" / "deliver" / f"{document['name']}-classes.tif") as ds:
        labels = ds.read(1)
    return summary["mpx_per_second"], labels


def engine_rows(scale: int, work: Path) -> list[dict]:
    bands = tiled_scene(work / f"scene-x{scale}", scale)
    rows = []
    for label, model in (("U-Net (ukis-csmask, 6 bands)", None), ("per-pixel linear (1×1 conv)", "light")):
        path = pixel_model(work / "pixel.onnx") if model else None
        config = scene_config(work / f"{model or 'unet'}-x{scale}.yaml", bands, work / "ws", model=path)
        reference = None
        for engine, precision in SETTINGS:
            if precision == "bf16" and not cpu_supports_bf16():
                continue
            speed, labels = run_engine(config, work, engine, precision)
            if reference is None:
                reference = (speed, labels)
            rows.append(
                {
                    "model": label,
                    "engine": f"{engine} {precision}",
                    "mpx_per_second": speed,
                    "ratio": speed / reference[0],
                    "agreement": float((labels == reference[1]).mean()),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | engine | run Mpx/s | / onnxruntime fp32 | same class as onnxruntime fp32 |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['mpx_per_second']:.2f} | {r['ratio']:.2f} | "
            f"{100 * r['agreement']:.3f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    scale = int(argv[0]) if argv else 16
    work = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="terrabeam-engines-"))
    print(table(engine_rows(scale, work)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
