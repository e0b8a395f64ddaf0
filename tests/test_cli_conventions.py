"""The command line's conventions, command by command on the synthetic tiny scene: ``--json`` is
exactly one JSON document on stdout (``json.load`` reads it whole), ``latest`` names the newest
run, times are ISO 8601, routine messages are INFO lines that -q silences, config errors are one
plain line, and the shell completion script completes sub-commands in a real bash."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from terrabeam.cli import main


def _json(capsys, argv: list[str], code: int = 0) -> object:
    capsys.readouterr()
    assert main(argv) == code, capsys.readouterr().err
    return json.load(io.StringIO(capsys.readouterr().out))


def test_every_command_json_is_one_document(tiny_pipeline, tmp_path, capsys):
    document, write = tiny_pipeline
    document["schedule"] = {"cron": "0 0 1 * *", "start": "2024-01-01T00:00:00Z"}
    config = str(write(document))
    ws = str(tmp_path / "ws")
    assert _json(capsys, ["validate", config, "--json"])["valid"] is True
    record = _json(capsys, ["run", config, "--json", "--run", "r1", "--window", "2024-01-01/2024-02-01"])
    assert record["id"] == "r1" and record["status"] == "done" and record["summary"].endswith("summary.json")
    assert any(o.endswith("tiny-classes.tif") for o in record["outputs"])
    for step in ("export", "predict", "deliver"):
        assert _json(capsys, [step, config, "--run", "alone", "--json"])["step"] == step
    runs = _json(capsys, ["runs", "--workspace", ws, "--json"])["runs"]
    assert [r["id"] for r in runs] == ["r1"]
    status = _json(capsys, ["status", "latest", "--workspace", ws, "--json"])
    assert status["id"] == "r1" and len(status["steps"]) >= 1
    for moment in (status["created"], status["finished"]):  # ISO 8601, UTC
        assert moment.endswith("Z") and datetime.fromisoformat(moment).tzinfo is not None
    opened = _json(capsys, ["open", "latest", "--workspace", ws, "--json", "--port", "9"])
    assert opened["run"] == "r1" and opened["dashboard"].endswith("/#/runs/r1")
    assert any(Path(m).name == "tiny-classes.tif" and Path(m).exists() for m in opened["maps"])
    assert _json(capsys, ["resume", "latest", "--workspace", ws, "--json"])["status"] == "done"
    windows = _json(capsys, ["schedule", config, "--once", "--json"])["windows_run"]
    assert len(windows) == 1 and all(datetime.fromisoformat(t) for t in windows[0])  # catch_up: latest
    assert _json(capsys, ["plan", config, "--json", "--no-calibrate"])["region_pixels"] == [70, 50]


def test_without_json_the_text_and_routine_messages(tiny_pipeline, tmp_path, capsys):
    _, write = tiny_pipeline
    config = str(write())
    assert main(["run", config, "--run", "r1"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("run r1: done; summary: ")
    again = [sys.executable, "-m", "terrabeam", "run", config, "--run", "r1"]  # delivered already
    for flags, shown in (([], True), (["-q"], False)):  # a process of its own: its logging as a user sees it
        result = subprocess.run(again + flags, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert ("terrabeam: run r1 already delivered; nothing to do" in result.stderr) is shown, result.stderr
        assert "warning" not in result.stderr.lower() and result.stdout.splitlines()[-1].startswith(
            "run r1: done"
        )
    assert main(["status", "latest", "--workspace", str(tmp_path / "ws")]) == 0
    assert capsys.readouterr().out.startswith("run r1  pipeline tiny  status done")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["grid"].update(patch_size=[32, 16, 3]),
            "grid.patch_size = [32, 16, 3]: give [width, height] or one number",
        ),
        (
            lambda d: d["grid"].update(kernel_size="wide"),
            'grid.kernel_size = "wide": give [kw, kh] or one number',
        ),
        (lambda d: d.pop("model"), "tiny.yaml: model: missing (required)"),
    ],
)
def test_config_errors_in_plain_words(tiny_pipeline, capsys, change, message):
    document, write = tiny_pipeline
    change(document)
    assert main(["validate", str(write(document))]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_scalar_patch_size_and_file_problems(tiny_pipeline, tmp_path, capsys):
    document, write = tiny_pipeline
    document["grid"] = {"patch_size": 16, "kernel_size": 4}
    assert _json(capsys, ["validate", str(write(document)), "--json"])["valid"] is True
    from terrabeam.config import load_config

    assert load_config(write(document)).grid.patch_size == (16, 16)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n  bad: [\n")
    for path, message in (
        (empty, "empty.yaml: the file is empty"),
        (broken, "broken.yaml, line 2, column 6: not valid YAML"),
    ):
        assert main(["validate", str(path)]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands(tmp_path):
    script = subprocess.run(
        [sys.executable, "-m", "terrabeam", "completion", "bash"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "complete.sh").write_text(script)
    probe = (
        f"source {tmp_path / 'complete.sh'}; COMP_WORDS=(terrabeam ins); COMP_CWORD=1; COMP_LINE='terrabeam ins';"
        " COMP_POINT=${#COMP_LINE}; $(complete -p terrabeam | sed -E 's/.*-F ([^ ]+).*/\\1/') terrabeam ins terrabeam;"
        " echo ${COMPREPLY[@]}"
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["inspect"]
