"""The installed `terrabeam` command: exit codes, one-line errors, step-by-step runs on the latest run.
Synthetic scene and 1×1-conv model (tiny_pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys


def _terrabeam(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "terrabeam", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_missing_config_exits_non_zero_with_one_line(tmp_path):
    result = _terrabeam("run", tmp_path / "none.yaml")
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"terrabeam: error: {tmp_path / 'none.yaml'}: configuration file not found"
    )


def test_steps_one_by_one_use_the_latest_run(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    config = write()
    first = _terrabeam("export", config, "--run", "older")
    assert first.returncode == 0, first.stderr
    exported = _terrabeam("export", config)
    assert exported.returncode == 0, exported.stderr
    run = json.loads(exported.stdout)["run"]
    for step in ("predict", "deliver"):
        result = _terrabeam(step, config)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["run"] == run
    assert (tmp_path / "ws" / run / "deliver" / "tiny-quicklook.png").exists()
    assert not (tmp_path / "ws" / "older" / "predict").exists()
    # Beam's start-up warnings stay quiet without --verbose; off a terminal, progress is logged
    lines = exported.stderr.splitlines()
    assert lines and all(line.startswith("INFO terrabeam.progress: export: ") for line in lines)


def test_help_explains_every_step():
    result = _terrabeam("--help")
    for word in ("export", "predict", "deliver", "run", "validate", "mixer.json", "Beam"):
        assert word in result.stdout
    assert "--runner=DirectRunner" in _terrabeam("predict", "--help").stdout
