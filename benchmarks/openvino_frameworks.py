"""OpenVINO against TensorFlow's and PyTorch's own CPU paths, the model alone, same inputs, same
threads, side by side in one process: the predictor terrabeam builds for ``model.engine: openvino``
vs the one it builds for the framework, after a warm-up call each.

    python -m benchmarks.openvino_frameworks [--threads 2] [--repeat 5]

Models (synthetic weights, seeded; what terrabeam's loaders read from disk):
- the Keras per-pixel DNN of examples/build_landcover_dnn.py (7 inputs → Dense 64 → Dense 3),
  as a .keras file, on 294 912 pixels (the demo scene at 20 m) — TensorFlow vs OpenVINO;
- a small fully convolutional net (6 → 32 → 64 → 32 → 3 channels, 3×3 convolutions) as
  TorchScript, on batches of 4 patches of 256 × 256 — PyTorch vs OpenVINO.
Prints seconds per call, the speed ratio to the framework, the largest difference of the outputs
and, for bf16, the share of pixels given the same class.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from terrabeam.predict.engines import Runtime, cpu_supports_bf16
from terrabeam.predict.frameworks import load_predictor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _seconds(predict, batch: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    output = predict(batch)  # warm-up (and the output to compare)
    start = time.perf_counter()
    for _ in range(repeat):
        predict(batch)
    return (time.perf_counter() - start) / repeat, np.asarray(output)


def _models(folder: Path) -> list[tuple[str, str, str, np.ndarray]]:
    """(label, framework, path, input batch) of each model measured."""
    import torch
    from build_landcover_dnn import build_model

    keras_path = folder / "dnn.keras"
    build_model().save(keras_path)
    pixels = np.random.default_rng(0).random((294_912, 7), dtype=np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(6, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 3, 1),
    ).eval()  # fmt: skip
    torch_path = folder / "fcn.pt"
    torch.jit.script(net).save(str(torch_path))
    patches = np.random.default_rng(1).standard_normal((4, 6, 256, 256), dtype=np.float32)
    return [
        ("Keras per-pixel DNN (294 912 px)", "tensorflow", str(keras_path), pixels),
        ("TorchScript FCN (4 × 256²)", "torch", str(torch_path), patches),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openvino_frameworks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print("| model | engine | s / call | speed vs framework | max abs diff | same class |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for label, framework, path, batch in _models(Path(folder)):
            own = load_predictor(
                framework, path, "classification", Runtime(framework, "cpu", "fp32", args.threads, 0)
            )
            reference_s, reference = _seconds(own, batch, args.repeat)
            print(f"| {label} | {framework} fp32 | {reference_s:.4f} | 1.00 | — | — |")
            for precision in ("fp32", "bf16"):
                if precision == "bf16" and not cpu_supports_bf16():
                    continue
                runtime = Runtime("openvino", "cpu", precision, args.threads, 0)
                seconds, output = _seconds(
                    load_predictor("openvino", path, "classification", runtime), batch, args.repeat
                )
                axis = 1
                same = float((output.argmax(axis) == reference.argmax(axis)).mean())
                print(
                    f"| {label} | openvino {precision} | {seconds:.4f} | {reference_s / seconds:.2f} | "
                    f"{np.abs(output - reference).max():.2e} | {100 * same:.3f} % |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
