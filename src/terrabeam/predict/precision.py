"""`terrabeam compare-precision`: what a reduced precision costs on the run's own patches, before a
user chooses it. The model runs at fp32 (the model's own results) and at the asked precision on a
sample of patches read from the source, and the agreement and the speed ratio are reported."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from terrabeam.config import PipelineConfig
from terrabeam.errors import ConfigError
from terrabeam.predict.engines import Runtime, default_threads, resolve_runtime
from terrabeam.predict.frameworks import load_predictor
from terrabeam.predict.io import PostProcess, PreparePatch
from terrabeam.predict.models import run_model


@dataclass(frozen=True)
class PrecisionReport:
    reference: Runtime
    candidate: Runtime
    patches: int
    agreement: float  # share of valid core pixels given the same class (classification)
    max_abs_difference: float  # of probabilities (classification) or values (regression)
    speed_ratio: float  # candidate speed / reference speed, model calls only

    def as_dict(self) -> dict:
        return {
            "reference": f"{self.reference.engine} {self.reference.precision} on {self.reference.device}",
            "candidate": f"{self.candidate.engine} {self.candidate.precision} on {self.candidate.device}",
            "patches": self.patches,
            "agreement": round(self.agreement, 6),
            "max_abs_difference": float(self.max_abs_difference),
            "speed_ratio": round(self.speed_ratio, 3),
        }


def read_sample(config: PipelineConfig, count: int) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Up to ``count`` patches as the source reads them, (grid index, {band: (H, W) float32}), from
    patch rows spread over the grid, a block of patches at the start of each row."""
    if config.source.kind != "raster":
        raise ConfigError("the sample of patches is read from raster sources (source.kind: raster)")
    from terrabeam.sources.raster import RasterPatchReader, export_grid

    grid, _ = export_grid(config)
    rows = np.unique(np.linspace(0, grid.patch_rows - 1, num=min(grid.patch_rows, count)).astype(int))
    per_row = max(1, -(-count // len(rows)))
    patches = []
    with RasterPatchReader(config, grid, config.grid.kernel_size) as reader:
        for row in rows:
            patches += reader.read_block(int(row), 0, min(per_row, grid.patches_per_row))
    return patches[:count]


def prepare_sample(config: PipelineConfig, patches: list[tuple[int, dict[str, np.ndarray]]]) -> np.ndarray:
    """The model's input (N, C, H, W) for patches of :func:`read_sample`: bands stacked, normalised."""
    model = config.model
    norm = model.normalization
    prepare = PreparePatch(model.input_bands, norm.factors() if norm else None, model.nodata)
    return np.stack([next(iter(prepare.process(patch)))[1] for patch in patches])


def sample_patches(config: PipelineConfig, count: int) -> np.ndarray:
    """Up to ``count`` prepared patches (N, C, H, W), from patch rows spread over the grid."""
    return prepare_sample(config, read_sample(config, count))


def _timed(predictor, batches: list[np.ndarray], config: PipelineConfig, margin) -> tuple[np.ndarray, float]:
    run_model(predictor, batches[0], config.model, margin)  # warm-up (compilation, allocation)
    start = time.perf_counter()
    outputs = [run_model(predictor, batch, config.model, margin) for batch in batches]
    return np.concatenate(outputs), time.perf_counter() - start


def compare_precision(config: PipelineConfig, precision: str, count: int = 16) -> PrecisionReport:
    model = config.model
    kw, kh = config.grid.kernel_size
    margin = (kw // 2, kh // 2)
    threads = default_threads(model, 1)
    reference = resolve_runtime(model.model_copy(update={"precision": "fp32", "engine": "auto"}), threads)
    candidate = resolve_runtime(model.model_copy(update={"precision": precision}), threads)
    patches = sample_patches(config, count)
    batches = [patches[i : i + model.batch_size] for i in range(0, len(patches), model.batch_size)]
    path = str(config.locate(model.path))
    task = "regression" if model.output == "regression" else "classification"
    results, seconds = [], []
    for runtime in (reference, candidate):
        output, elapsed = _timed(
            load_predictor(model.framework, path, task, runtime), batches, config, margin
        )
        results.append(output)
        seconds.append(elapsed)
    core = (config.grid.patch_size[1], config.grid.patch_size[0])
    post = PostProcess(model.output_names, core, model.output)
    agree = total = 0
    difference = 0.0
    for ref, cand in zip(*results, strict=True):
        a, b = post.features(ref), post.features(cand)
        if "class" in a:
            valid = a["class"] != 255
            agree += int((a["class"][valid] == b["class"][valid]).sum())
            total += int(valid.sum())
        for name in a:
            if name != "class":
                finite = np.isfinite(a[name])
                if finite.any():
                    difference = max(difference, float(np.abs(a[name][finite] - b[name][finite]).max()))
    agreement = agree / total if total else 1.0
    return PrecisionReport(reference, candidate, len(patches), agreement, difference, seconds[0] / seconds[1])
