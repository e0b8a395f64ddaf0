"""Runs with memory: retries, permanent failures, resume after SIGKILL, SIGINT and SIGTERM, concurrent
runs, history. Synthetic scene and 1×1-conv model (tiny_pipeline), except the SIGKILL test (real scene and U-Net)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from terrabeam.cli import main
from terrabeam.config import load_config
from terrabeam.errors import InputError, TransientError
from terrabeam.workflow.runner import Runner, is_transient
from terrabeam.workflow.state import RunState
from terrabeam.workflow.steps import LOCAL_STEPS


def _terrabeam(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "terrabeam", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _flaky(name, failures, exc):
    calls = []

    def step(config, workspace, beam_args):
        calls.append(name)
        if len(calls) <= failures:
            raise exc
        return LOCAL_STEPS[name](config, workspace, beam_args)

    return step, calls


def test_transient_failure_is_retried_and_attempts_recorded(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    config = load_config(write())
    flaky, calls = _flaky("map", 2, TransientError("HTTP 503 from the runner"))
    delays = []
    runner = Runner(config, tmp_path / "ws", sleep=delays.append, step_functions={"map": flaky})
    record = runner.run("r")
    assert record.status == "done"
    assert [(s.name, s.attempts) for s in record.steps] == [("map", 3)]
    assert len(calls) == 3 and len(delays) == 2
    assert 1.0 <= delays[0] <= 3.0 and 2.0 <= delays[1] <= 6.0  # 2 s, then 4 s, ±50 % jitter


def test_permanent_failure_stops_after_one_attempt_with_reason(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = load_config(write())
    broken, calls = _flaky("map", 5, InputError("predictions-00001.tfrecord.gz: band 'class' missing"))
    runner = Runner(config, tmp_path / "ws", sleep=lambda s: None, step_functions={"map": broken})
    with pytest.raises(InputError):
        runner.run("r")
    assert len(calls) == 1
    assert main(["status", "r", "--workspace", str(tmp_path / "ws"), "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    step = next(s for s in status["steps"] if s["name"] == "map")
    assert status["status"] == "failed" and step["attempts"] == 1
    assert "band 'class' missing" in step["error"]
    # resuming runs the failed step again
    record = Runner(config, tmp_path / "ws").run("r")
    assert record.status == "done"
    assert [s.attempts for s in record.steps] == [2]


def test_classification_of_failures():
    assert is_transient(TransientError("x")) and is_transient(ConnectionResetError())
    assert not is_transient(InputError("x")) and not is_transient(ValueError("x"))
    http = type("HttpError", (Exception,), {})()
    http.resp = type("Resp", (), {"status": 429})()
    assert is_transient(http)


def test_rerun_of_delivered_config_does_nothing(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = write()
    assert main(["run", str(config)]) == 0
    first = sorted(p.name for p in (tmp_path / "ws").iterdir() if not p.name.startswith("."))
    assert main(["run", str(config)]) == 0
    assert sorted(p.name for p in (tmp_path / "ws").iterdir() if not p.name.startswith(".")) == first
    capsys.readouterr()
    assert main(["runs", "--workspace", str(tmp_path / "ws"), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "done"
    assert [s["attempts"] for s in runs[0]["steps"]] == [1]


def test_two_concurrent_runs_do_the_work_once(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    config = write()
    processes = [_terrabeam("run", config) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    state = RunState(tmp_path / "ws" / "terrabeam.db")
    runs = state.list_runs()
    state.close()
    assert len(runs) == 1
    assert [s.attempts for s in runs[0].steps] == [1]
    assert sum("already delivered" in err for _, err in results) == 1


def test_sigkill_mid_run_then_resume_keeps_tiles_and_gives_the_same_map(tmp_path, demo_copy):
    """The real U-Net on the demo scene in tiles of one patch: kill -9 once a tile is published,
    run again, compare byte for byte with the same run (same config, run id and workspace: the
    maps' tags record them) made uninterrupted and moved aside."""
    doc = demo_copy.read_text().replace("outputs:\n", "outputs:\n  tile_size: 192\n")
    demo_copy.write_text(doc)
    assert main(["run", str(demo_copy), "--run", "k"]) == 0
    (tmp_path / "ws").rename(tmp_path / "ws-clean")

    process = _terrabeam("run", demo_copy, "--run", "k")
    tiles = tmp_path / "ws" / "k" / ".deliver.work" / "tiles"
    deadline = time.time() + 120
    while (
        not list(tiles.glob("*-probabilities-r*.tif")) and time.time() < deadline and process.poll() is None
    ):
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before a tile appeared"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "ws" / "k" / "deliver").exists()

    assert main(["run", str(demo_copy), "--run", "k"]) == 0
    state = RunState(tmp_path / "ws" / "terrabeam.db")
    record = state.get_run("k")
    state.close()
    step = record.steps[0]
    assert record.status == "done" and step.name == "map"
    assert 1 <= step.outputs["tiles_reused"] < step.outputs["tiles"] == 8
    deliver, clean = tmp_path / "ws" / "k" / "deliver", tmp_path / "ws-clean" / "k" / "deliver"
    names = sorted(p.relative_to(clean) for p in clean.rglob("*.tif"))
    assert len(names) == 2 + 2 * 8
    assert sorted(p.relative_to(deliver) for p in deliver.rglob("*.tif")) == names
    for name in names:
        assert (deliver / name).read_bytes() == (clean / name).read_bytes(), name
    assert Path(tmp_path / "ws" / "k" / "summary.json").exists()


def test_remote_task_is_polled_until_done_and_its_id_recorded(tmp_path, tiny_pipeline):
    """The start → poll protocol with a task that runs elsewhere (a stand-in job, polled 3 times)."""
    from terrabeam.workflow.steps import StepReport

    class RemoteJob:
        polls = 0

        def start(self):
            return "job-42"

        def poll(self):
            RemoteJob.polls += 1
            return StepReport("export", 1.5, {"patches": 3}) if RemoteJob.polls == 3 else None

    document, write = tiny_pipeline
    state = RunState(tmp_path / "state.db")
    state.create_run("r", "tiny", "h", None, ["export"])
    pauses = []
    runner = Runner(load_config(write()), tmp_path / "ws", sleep=pauses.append)
    report = runner._start_and_poll(RemoteJob(), state, "r", "export")
    assert report.details == {"patches": 3} and RemoteJob.polls == 3 and pauses == [1.0, 2.0]
    state.finish_step("r", "export", report.seconds, report.details)
    step = state.get_run("r").steps[0]
    state.close()
    assert step.external_id == "job-42" and step.status == "done"


def test_run_removes_folders_left_by_a_killed_step(tmp_path, tiny_pipeline):
    document, write = tiny_pipeline
    leftover = tmp_path / "ws" / "r" / ".export.staging-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "tiny-00000.tfrecord.gz").write_bytes(b"half")
    assert main(["run", str(write()), "--run", "r"]) == 0
    assert not leftover.exists()
    assert sorted(p.name for p in (tmp_path / "ws" / "r").iterdir()) == [
        "deliver",
        "run.json",
        "summary.json",
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_run_records_the_run_and_resume_keeps_tiles(signum, tmp_path, tiny_pipeline, capsys):
    """Ctrl-C or SIGTERM mid-run: exit 130 / 143 with one line, the run 'interrupted', and a resume
    that says how many map tiles it kept. A 560×400 px scene in tiles of one 32 × 16 patch: 450
    tiles, so that the run is still going when its first tile appears."""
    import numpy as np
    from affine import Affine
    from conftest import write_raster

    document, write = tiny_pipeline
    rng = np.random.default_rng(5)
    for name, band in document["source"]["bands"].items():
        data = rng.integers(0, 10000, (400, 560)).astype(np.uint16)
        band["path"] = str(
            write_raster(tmp_path / f"big-{name}.tif", data, Affine(10, 0, 400000, 0, -10, 5600000))
        )
    document["outputs"]["tile_size"] = 16
    config = write()
    ws = tmp_path / "ws"
    process = subprocess.Popen(
        [sys.executable, "-m", "terrabeam", "run", str(config), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while (
        not list(ws.glob("*/.deliver.work/tiles/*-probabilities-*.tif"))
        and time.time() < deadline
        and process.poll() is None
    ):
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before a tile appeared"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    run = next(p.name for p in ws.iterdir() if (p / ".deliver.work").is_dir())
    assert process.returncode == 128 + signum
    assert stderr.splitlines() == [
        f"terrabeam: interrupted; resume with `terrabeam resume {run} --workspace {ws}`"
    ]

    assert main(["status", run, "--workspace", str(ws), "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "interrupted"
    assert [(s["name"], s["status"]) for s in status["steps"]] == [("map", "interrupted")]
    name = signal.Signals(signum).name
    assert status["steps"][0]["error"] == f"interrupted by {name}"

    # `resume RUN`, or `run` of the same config, continues it
    again = ["resume", run, "--workspace", str(ws)] if signum == signal.SIGTERM else ["run", str(config)]
    resumed = subprocess.run([sys.executable, "-m", "terrabeam", *again], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"^terrabeam: run {run}: [1-9]\d* of 450 map tiles kept", resumed.stderr, re.M), (
        resumed.stderr
    )
    assert main(["runs", "--workspace", str(ws), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["done"]


def test_vrt_overview_levels_stop_where_tile_edges_leave_whole_pixels():
    """Synthetic grids: a VRT-only map exposes halvings down to one 512 px block, but no level where
    a tile's side is no longer a whole number of pixels; other maps expose none."""
    from types import SimpleNamespace

    from affine import Affine

    from terrabeam.grid import Grid
    from terrabeam.tiling import Tiling
    from terrabeam.workflow.maps import vrt_overview_levels

    def levels(width: int, height: int, patch: int, tile_size: int, single_file_max: int = 0) -> int:
        grid = Grid.covering("EPSG:32633", Affine(20, 0, 0, 0, -20, 0), width, height, (patch, patch))
        config = SimpleNamespace(outputs=SimpleNamespace(single_file_max_pixels=single_file_max))
        return vrt_overview_levels(config, Tiling.for_grid(grid, width, height, tile_size))

    assert levels(768, 384, 192, 384) == 1  # 384 × 192 fits a block
    assert levels(100_000, 50_000, 192, 2048) == 7  # 8 to fit a block; tiles of 1920 = 2⁷ × 15 px
    assert levels(100_000, 50_000, 256, 2048) == 8  # tiles of 2048 px: every level whole
    assert levels(100_000, 50_000, 150, 2048) == 0  # 1950 px: 1 whole level, GDAL gives a tile 2
    assert levels(500, 400, 100, 200) == 0  # fits a block at full resolution
    assert levels(3000, 3000, 256, 4096) == 0  # one tile: it is the map's COG, GDAL's own levels
    assert levels(768, 384, 192, 384, single_file_max=10**9) == 0  # the single COG has them


def test_tiles_of_another_tile_format_are_not_kept(tmp_path, tiny_pipeline, monkeypatch):
    """A map's work folder keeps its tiles for a resume by the same terrabeam; one whose tiles
    differ (TILE_FORMAT, e.g. a newer version with more overview levels) starts them again."""
    from terrabeam.sinks import tiles
    from terrabeam.workflow.maps import _match_work, work_identity

    document, write = tiny_pipeline
    config = load_config(write())
    work = tmp_path / "work"
    work.mkdir()
    _match_work(work, work_identity(config, "inputs"))
    (work / "tiles").mkdir()
    (work / "tiles" / "tiny-classes-r0000c0000.tif").write_bytes(b"tile")
    _match_work(work, work_identity(config, "inputs"))
    assert (work / "tiles" / "tiny-classes-r0000c0000.tif").exists()
    monkeypatch.setattr(tiles, "TILE_FORMAT", tiles.TILE_FORMAT + 1)
    _match_work(work, work_identity(config, "inputs"))
    assert sorted(p.name for p in work.iterdir()) == [".source"]
    assert work_identity(config, "inputs") != work_identity(config, "other inputs")


def test_integer_labels_become_the_layer_type_as_rounding_them_would():
    """Synthetic labels (int64, 255 = masked, out-of-range values): the integer path gives what the
    float path (round, clip, NaN → nodata) gives for the same values."""
    import numpy as np

    from terrabeam.sinks.tiles import MapLayer, _as_dtype

    layer = MapLayer("classes", ["class"], "uint8", 255, "mode", ["class"])
    labels = np.random.default_rng(3).integers(-5, 300, (1, 16, 24)).astype(np.int64)
    labels[0, :2] = 255
    fast = _as_dtype(labels, layer)
    assert fast.dtype == np.uint8
    assert np.array_equal(fast, _as_dtype(labels.astype(np.float64), layer))


def test_derived_needed_follows_chains_in_configuration_order():
    from terrabeam.config import derived_needed

    derived = {"ndvi": "(nir - red) / (nir + red)", "a": "red * 2", "b": "a + ndvi", "c": "green + 1"}
    assert derived_needed(derived, ["blue", "b"]) == {
        "ndvi": derived["ndvi"],
        "a": "red * 2",
        "b": "a + ndvi",
    }
    assert derived_needed(derived, ["red"]) == {}


def test_a_map_computes_only_the_derived_bands_the_model_uses(tmp_path, tiny_pipeline, monkeypatch):
    """Synthetic scene: `ratio` is a model input, `ndvi` is not; the map's readers evaluate `ratio`
    alone (the export step, which writes every band, still evaluates both)."""
    from terrabeam.sources import raster

    document, write = tiny_pipeline
    document["source"]["derived"] = {"ndvi": "(nir - red) / (nir + red)", "ratio": "nir / (red + 1)"}
    document["model"]["input_bands"] = ["red", "green", "ratio"]
    evaluated = []
    evaluate = raster.numexpr.evaluate
    monkeypatch.setattr(
        raster.numexpr,
        "evaluate",
        lambda expression, **kw: evaluated.append(expression) or evaluate(expression, **kw),
    )
    assert main(["run", str(write(document)), "--run", "r"]) == 0
    assert evaluated and set(evaluated) == {"nir / (red + 1)"}
    evaluated.clear()
    assert main(["export", str(write(document)), "--run", "e"]) == 0
    assert set(evaluated) == {"nir / (red + 1)", "(nir - red) / (nir + red)"}
