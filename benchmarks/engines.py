"""Engines side by side: the whole `terrabeam run` (rasters → model → map tiles) with ONNX Runtime
fp32, OpenVINO fp32 and OpenVINO bf16 (where the CPU has bf16 units), same scene, model, threads and
batch; Mpx/s from each run's summary, the ratio to ONNX Runtime fp32 and the share of map pixels
given the same class as ONNX Runtime fp32.

    python -m benchmarks.engines [SCALE] [WORKDIR]

First the model alone (the demo's U-Net, batch 4 of seeded random-normal patches, 2 threads,
after a warm-up call), then the whole runs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.scenes import pixel_model, run_variant, scene_config, tiled_scene
from terrabeam.predict.engines import cpu_supports_bf16

SETTINGS = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def run_engine(config: Path, work: Path, engine: str, precision: str) -> tuple[float, np.ndarray]:
    """(Mpx/s of the run, its class map) with the model on ``engine`` at ``precision``."""

    def edit(document: dict) -> None:
        document["model"] |= {"engine": engine, "precision": precision, "threads": 2}

    summary, labels = run_variant(config, work, f"{config.stem}-{engine}-{precision}", edit)
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


def model_alone(calls: int = 5) -> str:
    """Patches/s of the U-Net alone on each engine, the ratio to ONNX Runtime fp32, class agreement."""
    import time

    from benchmarks.scenes import DEMO_CONFIG
    from terrabeam.config import load_config
    from terrabeam.predict.engines import Runtime
    from terrabeam.predict.frameworks import load_predictor

    config = load_config(DEMO_CONFIG)
    path = str(config.locate(config.model.path))
    inputs = np.random.default_rng(0).normal(size=(4, 6, 256, 256)).astype(np.float32)
    lines = ["| engine (U-Net alone) | patches/s | / onnxruntime fp32 | same class |", "|---|---:|---:|---:|"]
    reference = None
    for engine, precision in SETTINGS:
        if precision == "bf16" and not cpu_supports_bf16():
            continue
        predict = load_predictor("onnx", path, "classification", Runtime(engine, "cpu", precision, 2, 0))
        predict(inputs)
        start = time.perf_counter()
        for _ in range(calls):
            output = predict(inputs)
        speed = calls * len(inputs) / (time.perf_counter() - start)
        reference = reference or (speed, output.argmax(axis=1))
        agreement = (output.argmax(axis=1) == reference[1]).mean()
        lines.append(
            f"| {engine} {precision} | {speed:.1f} | {speed / reference[0]:.2f} | {100 * agreement:.3f} % |"
        )
    return "\n".join(lines)


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
    print(model_alone())
    print()
    print(table(engine_rows(scale, work)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
