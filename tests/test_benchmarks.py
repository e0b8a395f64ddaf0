"""The benchmark's baselines do the same work as terrabeam (real scene and U-Net), so its ratios compare
like with like: the naive loop's class map matches the pipeline's, and the I/O loop reads every record."""

from __future__ import annotations

import rasterio

from benchmarks.bounds import io_bound
from benchmarks.naive import naive_run
from benchmarks.scenes import scene_config, tiled_scene
from terrabeam.cli import main
from terrabeam.config import load_config


def test_naive_baseline_computes_the_same_map(tmp_path, demo_data):
    config_path = scene_config(tmp_path / "c.yaml", tiled_scene(tmp_path / "scene", 1), tmp_path / "ws")
    assert main(["run", str(config_path), "--run", "r"]) == 0
    config = load_config(config_path)
    seconds, pixels = naive_run(config, tmp_path / "naive")
    assert pixels == 768 * 384 and seconds > 0
    with (
        rasterio.open(tmp_path / "naive" / "classes.tif") as naive,
        rasterio.open(tmp_path / "ws" / "r" / "deliver" / "sentinel2-cloudmask-classes.tif") as ours,
    ):
        assert naive.transform == ours.transform and naive.shape == ours.shape
        agreement = (naive.read(1) == ours.read(1)).mean()
    assert agreement > 0.99  # resampling at the scene's edge differs slightly between the two readers

    assert main(["export", str(config_path), "--run", "e"]) == 0  # a run writes no interchange files
    io_seconds, records = io_bound(config, tmp_path / "ws" / "e" / "export", tmp_path / "io")
    assert records == 8 and io_seconds > 0
