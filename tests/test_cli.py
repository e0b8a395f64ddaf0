"""The installed `terrabeam` command: exit codes, one-line errors, arguments, step-by-step runs on the
latest run of the config. Synthetic scene and 1×1-conv model (tiny_pipeline)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from terrabeam.cli import build_parser, check_extra_arguments, main, parse_window
from terrabeam.config import load_config


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
    exported = _terrabeam("export", config, "--json")
    assert exported.returncode == 0, exported.stderr
    run = json.loads(exported.stdout)["run"]
    for step in ("predict", "deliver"):
        result = _terrabeam(step, config, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["run"] == run
    assert (tmp_path / "ws" / run / "deliver" / "tiny-quicklook.png").exists()
    assert not (tmp_path / "ws" / "older" / "predict").exists()
    # Beam's start-up warnings stay quiet without --verbose; off a terminal, progress is logged
    lines = exported.stderr.splitlines()
    assert lines and all(PROGRESS.match(line) and line.startswith("terrabeam: export: ") for line in lines)


def test_help_explains_every_step():
    result = _terrabeam("--help")
    for word in ("export", "predict", "deliver", "run", "validate", "mixer.json", "Beam"):
        assert word in result.stdout
    assert "--runner=DirectRunner" in _terrabeam("predict", "--help").stdout


PROGRESS = re.compile(
    r"terrabeam: \w+: \d+/\d+ \w+, [\d.]+/s, ETA \d+ s$"
)  # progress.py's line off a terminal


def _progress_free(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not PROGRESS.match(line)]


def test_error_inside_beam_is_one_line_without_beams_traceback(tmp_path, tiny_pipeline):
    """A record that is not a tf.train.Example fails inside the Beam pipeline (DecodeRecord)."""
    from terrabeam.tfrecord import RecordWriter, read_records

    document, write = tiny_pipeline
    config = write()
    assert _terrabeam("export", config, "--run", "r").returncode == 0
    shard = tmp_path / "ws" / "r" / "export" / "tiny-00001.tfrecord.gz"
    records = list(read_records(shard))
    writer = RecordWriter(shard, 1)
    for payload in [b"\x0a\x05garbage", *records[1:]]:
        writer.write(payload)
    writer.close()
    result = _terrabeam("predict", config, "--run", "r")
    assert result.returncode == 1
    assert _progress_free(result.stderr) == [
        f"terrabeam: error: {shard} record 0: malformed tf.train.Example: invalid wire type 7 at byte 3 "
        "[while running 'DecodeRecord']"
    ]


def test_unknown_options_are_errors_with_a_suggestion(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = str(write())
    cases = [
        (
            ["run", config, "--forse"],
            "unknown option --forse (not a terrabeam or Apache Beam option); did you mean --force?",
        ),
        (["run", config, "--worksapce", "elsewhere"], "did you mean --workspace?"),
        (
            ["run", config, "--jsn"],
            "unknown option --jsn (not a terrabeam or Apache Beam option); did you mean --json?",
        ),
        (
            ["deliver", config, "--runner=DirectRunner"],
            "unknown option --runner (not an option of 'terrabeam deliver')",
        ),
        (["status", "r", "--jsn"], "did you mean --json?"),
        (["run", config, "stray"], "unexpected arguments: stray"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "ws").exists()  # nothing ran
    # Beam's own options still pass, with '=' or as two words
    args, extra = build_parser().parse_known_args(
        ["run", config, "--runner", "DirectRunner", "--direct_num_workers=2"]
    )
    check_extra_arguments(args, extra)


def test_window_must_be_iso_and_ordered(tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = str(write())
    for window, message in [
        ("2024-01-01", "expected START/END"),
        ("2024-01-01/2024-13-01", "'2024-13-01' in '2024-01-01/2024-13-01' is not an ISO date or datetime"),
        ("2024-02-01/2024-01-01", "START must be before END"),
        ("2024-01-01T12:00Z/2024-01-01T06:00", "START must be before END"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["run", config, "--window", window])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert parse_window("2024-01-01T06:00:00Z/2024-01-02") == ("2024-01-01T06:00:00Z", "2024-01-02")


def test_verbose_and_quiet_after_the_sub_command(tiny_pipeline):
    parser = build_parser()
    assert parser.parse_args(["export", "c.yaml", "-v"]).verbose
    assert parser.parse_args(["-v", "export", "c.yaml"]).verbose
    assert not parser.parse_args(["export", "c.yaml"]).verbose
    assert parser.parse_args(["status", "r", "-q"]).quiet
    document, write = tiny_pipeline
    result = _terrabeam("export", write(), "-q")
    assert result.returncode == 0 and result.stderr == ""  # no progress lines


def test_steps_alone_never_touch_another_pipelines_run(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    water = write(document, "water.yaml")
    other = write(document | {"name": "other"}, "other.yaml")
    ws = tmp_path / "ws"
    assert main(["run", str(water), "--run", "w"]) == 0  # one pipeline: no interchange files
    assert main(["export", str(water), "--run", "w"]) == 0  # the steps alone write them
    assert main(["predict", str(water), "--run", "w"]) == 0
    assert main(["export", str(other), "--run", "o"]) == 0  # now the newest run in the workspace
    capsys.readouterr()

    assert main(["deliver", str(water), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == "w"
    assert not (ws / "o" / "deliver").exists() and not (ws / "o" / "predict").exists()
    assert json.loads((ws / "o" / "run.json").read_text()) == {
        "pipeline": "other",
        "config_hash": load_config(other).fingerprint(),
    }

    # a run folder made before run markers existed is found through the run history
    (ws / "w" / "run.json").unlink()
    assert main(["deliver", str(water), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == "w"

    assert main(["deliver", str(water), "--run", "o"]) == 1
    assert "run o belongs to pipeline 'other', not 'tiny'" in capsys.readouterr().err
    third = write(document | {"name": "third"}, "third.yaml")
    assert main(["predict", str(third)]) == 1
    assert "no run of pipeline 'third' with this configuration" in capsys.readouterr().err
    # same pipeline, another grid: not picked by itself, refused when named
    regrid = write(document | {"grid": {"patch_size": [16, 16], "kernel_size": [4, 4]}}, "regrid.yaml")
    assert main(["deliver", str(regrid)]) == 1
    assert "no run of pipeline 'tiny' with this configuration" in capsys.readouterr().err
    assert main(["predict", str(regrid), "--run", "w"]) == 1
    assert "run w is not on this config's grid (patch size [32, 16], grid.patch_size [16, 16])" in (
        capsys.readouterr().err
    )


def test_status_lists_only_outputs_that_still_exist(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    assert main(["run", str(write()), "--run", "r"]) == 0
    quicklook = tmp_path / "ws" / "r" / "deliver" / "tiny-quicklook.png"
    quicklook.unlink()
    capsys.readouterr()
    assert main(["status", "r", "--workspace", str(tmp_path / "ws"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert str(quicklook) not in status["outputs"] and status["outputs_gone"] == [str(quicklook)]
    assert len(status["outputs"]) == 6  # VRT + single COG of classes and probabilities, 2 STAC Items
    assert main(["status", "r", "--workspace", str(tmp_path / "ws")]) == 0
    table = capsys.readouterr().out
    assert str(quicklook) not in table and "(1 recorded output(s) no longer exist)" in table
