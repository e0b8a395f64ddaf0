"""Run folders: unique ids, the latest run of a config, atomic publishing of a step's folder, full disks."""

from __future__ import annotations

import os

import pytest

from terrabeam.errors import WorkspaceError
from terrabeam.workspace import Workspace, new_run_id


def test_new_run_ids_are_unique(tmp_path):
    first = new_run_id(tmp_path)
    (tmp_path / first).mkdir()
    second = new_run_id(tmp_path)
    assert second != first and second.startswith(first[:15])


def test_failed_step_publishes_nothing_and_success_replaces_whole(tmp_path):
    ws = Workspace(tmp_path, "r")
    with ws.staging("export") as staging:
        (staging / "a").write_text("1")
    assert (tmp_path / "r" / "export" / "a").read_text() == "1"
    with pytest.raises(RuntimeError), ws.staging("export") as staging:
        (staging / "b").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["export"]
    assert sorted(p.name for p in (tmp_path / "r" / "export").iterdir()) == ["a"]
    with ws.staging("export") as staging:
        (staging / "c").write_text("2")
    assert sorted(p.name for p in (tmp_path / "r" / "export").iterdir()) == ["c"]


def test_latest_and_missing_step(tmp_path):
    with pytest.raises(WorkspaceError, match="no runs yet"):
        Workspace.latest(tmp_path, "p", "h1")
    Workspace(tmp_path, "b").claim("p", "h1", same_config=True)
    Workspace(tmp_path, "a").claim("p", "h1", same_config=True)
    Workspace(tmp_path, "c").claim("other", "h1", same_config=True)
    Workspace(tmp_path, "d").claim("p", "h2", same_config=True)
    assert Workspace.latest(tmp_path, "p", "h1").run_id == "a"
    with pytest.raises(WorkspaceError, match="no run of pipeline 'q' with this configuration"):
        Workspace.latest(tmp_path, "q", "h1")
    with pytest.raises(WorkspaceError, match="step 'predict' has no finished output in run a"):
        Workspace(tmp_path, "a").require_step("predict")


def test_disk_full_error_names_the_file_and_spares_other_errors(tmp_path, monkeypatch):
    import errno

    from terrabeam import workspace
    from terrabeam.errors import DiskFullError, InputError
    from terrabeam.workspace import disk_full_error

    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "b.tif").write_bytes(b"")
    os.utime(tmp_path / "a.tif", (1, 1))
    full = OSError(errno.ENOSPC, "No space left on device")
    assert str(disk_full_error(full, tmp_path)) == f"no space left on device writing {tmp_path / 'b.tif'}"
    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.tif"))
    assert str(disk_full_error(named, tmp_path)) == f"no space left on device writing {tmp_path / 'a.tif'}"
    # GDAL's write errors carry no errno: they count as a full disk only on a nearly full device
    gdal = OSError("Write failed. See previous exception for details.")
    assert disk_full_error(gdal, tmp_path) is None
    monkeypatch.setattr(workspace, "_free_bytes", lambda folder: 4096)
    assert isinstance(disk_full_error(gdal, tmp_path), DiskFullError)
    assert disk_full_error(KeyError("class"), tmp_path) is None  # a bug, not a write
    assert disk_full_error(InputError("a.tif: band 2 missing"), tmp_path) is None
