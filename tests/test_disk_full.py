"""A full disk: one error naming the file being written, the run recorded as failed even though the
run history lives on the same disk, and a resume that finishes once space is freed.

Real ENOSPC on a 8 MiB tmpfs (mounting needs root; skipped otherwise). Synthetic scene and 1×1-conv
model (tiny_pipeline)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from terrabeam.config import load_config
from terrabeam.errors import DiskFullError, describe
from terrabeam.workflow.runner import Runner
from terrabeam.workflow.state import RunState
from terrabeam.workflow.steps import LOCAL_STEPS

HEADROOM = 16 * 2**10  # left free when a step starts: the step fails part-way through its writes


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/ws`` on a 8 MiB tmpfs of its own."""
    mount = tmp_path / "ws"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 8 MiB tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(ballast: Path, leave: int) -> None:
    """Write ``ballast`` until the disk is full, then give ``leave`` bytes back."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (2**16, 2**12, 2**9, 1):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(ballast, ballast.stat().st_size - leave)


@pytest.mark.parametrize("step", ["map", "export", "predict", "deliver"])
def test_disk_full_fails_with_the_path_records_the_run_and_resumes(
    step, small_disk, tiny_pipeline, monkeypatch
):
    """``map`` is a raster run's one pipeline (tiles written inside Beam); the three steps of the
    interchange-file path run as a run with an Earth Engine-style step list."""
    document, write = tiny_pipeline
    config = load_config(write())
    if step != "map":  # run export → predict → deliver as an Earth Engine source or sink would
        monkeypatch.setattr(
            "terrabeam.workflow.steps.run_steps", lambda config: ["export", "predict", "deliver"]
        )
    ballast = small_disk / "ballast"

    def fill_then_run(config, workspace, beam_args):
        _fill(ballast, HEADROOM)
        return LOCAL_STEPS[step](config, workspace, beam_args)

    with pytest.raises(DiskFullError) as raised:
        Runner(config, small_disk, step_functions={step: fill_then_run}).run("r")
    message = describe(raised.value)
    assert message.startswith(f"no space left on device writing {small_disk}/r/")
    assert "\n" not in message

    state = RunState(small_disk / "terrabeam.db")
    record = state.get_run("r")
    state.close()
    failed = next(s for s in record.steps if s.name == step)
    assert record.status == "failed" and failed.status == "failed"
    assert failed.error.startswith("no space left on device writing")

    ballast.unlink()
    record = Runner(config, small_disk).run("r")
    assert record.status == "done"
    assert (small_disk / "r" / "deliver" / "tiny-classes.tif").exists()
