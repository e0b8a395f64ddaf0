"""Where the time goes: per-step and per-stage seconds of one `terrabeam run`, from cProfile.

Stages are the cumulative times of the functions that do each kind of work; the runner executes
bundles in this thread, so the profile sees the pipeline's main line. Work in other threads (band
reads ahead, tile encoding behind the model, the mosaic's COGs and quicklook side by side) is timed
by wrapping its function instead: seconds summed over threads, which may overlap each other.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import threading
import time
from pathlib import Path

from terrabeam.config import load_config
from terrabeam.sinks import tiles
from terrabeam.sources import raster
from terrabeam.workflow import maps
from terrabeam.workflow.runner import Runner

# stage → (file suffix, function name) whose cumulative time is that stage
STAGES = {
    "model (ONNX Runtime run)": ("onnxruntime_inference_collection.py", "run"),
    "model load": ("predict/models.py", "load_model"),
    "model probe": ("predict/models.py", "probe_model"),
    "waiting for threads (band reads, tile writes behind)": ("concurrent/futures/_base.py", "result"),
    "model input: stack, normalise": ("predict/io.py", "process"),
    "post-process (softmax, argmax, crop)": ("predict/io.py", "features"),
    "patches into the tile's scratch files": ("sinks/tiles.py", "add"),
}


# Stages that run in worker threads, which cProfile does not see: timed by wrapping the function
# (seconds summed over threads). stage → (object, attribute)
THREADED = {
    "raster read + warp (in reader threads, overlapping the model)": (raster._BandReader, "read"),
    "tile COGs: encode + publish (writer thread, behind the model)": (tiles._TileFile, "publish"),
    "mosaic: VRT": (maps, "write_vrt"),
    "mosaic: single COG per layer from the tiles (side by side)": (maps, "write_single_cog"),
    "mosaic: quicklook PNG (beside the single COGs)": (maps, "write_quicklook"),
}


def _timed(function, totals: dict[str, float], stage: str, lock: threading.Lock):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            with lock:
                totals[stage] += time.perf_counter() - start

    return wrapper


def profile_run(config_path: Path, workspace: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per step, seconds per stage) of one run of ``config_path``."""
    config = load_config(config_path)
    threaded = dict.fromkeys(THREADED, 0.0)
    lock = threading.Lock()
    originals = {stage: getattr(owner, name) for stage, (owner, name) in THREADED.items()}
    for stage, (owner, name) in THREADED.items():
        setattr(owner, name, _timed(originals[stage], threaded, stage, lock))
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        Runner(config, workspace).run("profiled")
        summary = workspace / "profiled" / "summary.json"
        profiler.disable()
    finally:
        for stage, (owner, name) in THREADED.items():
            setattr(owner, name, originals[stage])
    steps = json.loads(summary.read_text())["seconds"]
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    stages = {}
    for stage, (suffix, name) in STAGES.items():
        stages[stage] = sum(
            ct
            for (file, _, function), (_, _, _, ct, _) in stats.items()
            if file.endswith(suffix) and function == name
        )
    return steps, stages | threaded
