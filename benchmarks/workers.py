"""Local worker processes: predict throughput of `runner: {kind: local, workers: N, options:
{direct_running_mode: multi_processing}}` on one export.

Each setting (worker processes × ONNX Runtime threads per worker) runs the whole predict step
in this process (`run_predict`: probe, pipeline, worker start-up included) on the same export;
settings take turns, ``repeats`` rounds, so a busy moment of the machine spreads over all of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from terrabeam.config import load_config
from terrabeam.predict.pipeline import run_predict


@dataclass(frozen=True)
class WorkerSetting:
    workers: int
    threads: int  # ONNX Runtime intra-op threads per worker
    reshuffle: bool | None = None  # predict.reshuffle (None: terrabeam's default, on for > 1 worker)

    @property
    def label(self) -> str:
        return f"{self.workers} × {self.threads}"

    @property
    def runner(self) -> str:
        if self.workers == 1:
            return "FnApiRunner, in process"
        spread = "shards split, records not reshuffled" if self.reshuffle is False else "records reshuffled"
        return f"FnApiRunner, {self.workers} processes, {spread}"


def worker_settings(cores: int) -> list[WorkerSetting]:
    """The default (1 worker, all cores); 2 workers splitting the cores, with and without the record
    reshuffle (without it each worker predicts whole shards); 2 workers each taking all cores
    (oversubscribed); 1 worker on the threads each of the 2 gets."""
    half = max(1, cores // 2)
    return [
        WorkerSetting(1, cores),
        WorkerSetting(2, half),
        WorkerSetting(2, half, reshuffle=False),
        WorkerSetting(2, cores),
        WorkerSetting(1, half),
    ]


def time_workers(
    config_path: Path, export_dir: Path, work: Path, settings: list[WorkerSetting], repeats: int
) -> tuple[dict[WorkerSetting, list[float]], int, int]:
    """(seconds of the predict step per setting, one entry per round; patches; core pixels)."""
    document = yaml.safe_load(config_path.read_text())
    seconds: dict[WorkerSetting, list[float]] = {s: [] for s in settings}
    patches = pixels = 0
    for round_ in range(repeats):
        for number, setting in enumerate(settings):
            document["runner"] = {"kind": "local", "workers": setting.workers}
            if setting.workers > 1:  # `workers: N` alone runs N threads of this process
                document["runner"]["options"] = {"direct_running_mode": "multi_processing"}
            document["model"]["threads"] = setting.threads
            document["predict"] = {"reshuffle": setting.reshuffle}
            path = work / f"workers-{number}.yaml"
            path.write_text(yaml.safe_dump(document, sort_keys=False))
            out = work / f"predict-workers-{number}-{round_}"
            out.mkdir(parents=True)
            start = time.perf_counter()
            result = run_predict(load_config(path), export_dir, out)
            seconds[setting].append(time.perf_counter() - start)
            patches = result.records
            pixels = result.records * result.grid.patch_width * result.grid.patch_height
    return seconds, patches, pixels


def load_average() -> str:
    """The 1-minute load average, to tell a quiet machine from a busy one."""
    return f"{os.getloadavg()[0]:.2f}"
