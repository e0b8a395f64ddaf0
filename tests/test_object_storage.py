"""A whole run with everything on s3://: the workspace, the source rasters and the model, against an
S3-compatible server (moto) started here on 127.0.0.1. Beam's FileSystems (boto3) move the step
folders and the model, GDAL reads the rasters with /vsis3/. The maps must equal a local run's.
Synthetic scene and model (tiny_pipeline)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import boto3
import numpy as np
import pytest
import rasterio
from conftest import assert_same_map

from terrabeam.cli import main
from terrabeam.workspace import COMPLETE

pytestmark = pytest.mark.integration

BUCKET = "terrabeam-s3-test"


@pytest.fixture
def s3(monkeypatch, tmp_path):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # boto3 (and so Beam's S3 file system)
        "AWS_S3_ENDPOINT": f"127.0.0.1:{port}",  # GDAL's /vsis3/
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "TERRABEAM_CACHE": str(tmp_path / "cache"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # moto keeps its buckets in process-wide memory across servers: start every test empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _read(path):
    with rasterio.open(path) as dataset:
        return dataset.read(), dataset.profile


def test_run_with_workspace_inputs_and_model_on_s3_equals_the_local_run(
    tmp_path, tiny_pipeline, s3, monkeypatch, capsys
):
    document, write = tiny_pipeline
    assert main(["run", str(write()), "--run", "local"]) == 0
    local_deliver = tmp_path / "ws" / "local" / "deliver"

    remote = dict(document)
    remote["source"] = {"bands": {}}
    for name, band in document["source"]["bands"].items():
        key = f"inputs/{name}.tif"
        s3.upload_file(band["path"], BUCKET, key)
        remote["source"]["bands"][name] = band | {"path": f"s3://{BUCKET}/{key}"}
    s3.upload_file(document["model"]["path"], BUCKET, "models/model.onnx")
    remote["model"] = document["model"] | {"path": f"s3://{BUCKET}/models/model.onnx"}
    remote["workspace"] = f"s3://{BUCKET}/ws"
    assert main(["run", str(write(remote, "remote.yaml")), "--run", "r1"]) == 0

    objects = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ws/")["Contents"]}
    for step in ("deliver",):  # one pipeline: rasters → model → map, no interchange files
        listing = json.loads(s3.get_object(Bucket=BUCKET, Key=f"ws/r1/{step}/{COMPLETE}")["Body"].read())
        assert listing["files"], step
        for name, size in listing["files"].items():
            assert objects[f"ws/r1/{step}/{name}"] == size
    assert "ws/r1/summary.json" in objects
    for output in sorted(local_deliver.glob("*.tif")):
        key = f"ws/r1/deliver/{output.name}"
        assert key in objects, key
        remote_copy = tmp_path / "downloaded" / output.name
        remote_copy.parent.mkdir(exist_ok=True)
        s3.download_file(BUCKET, key, str(remote_copy))
        local_pixels, local_profile = _read(output)
        remote_pixels, remote_profile = _read(remote_copy)
        np.testing.assert_array_equal(remote_pixels, local_pixels)
        np.testing.assert_equal(remote_profile.pop("nodata"), local_profile.pop("nodata"))  # NaN-aware
        assert remote_profile == local_profile

    # Another machine (an empty mirror) sees the run history kept beside the runs, and a re-run of
    # the delivered run does nothing there either.
    assert "ws/terrabeam.db" in objects
    monkeypatch.setenv("TERRABEAM_CACHE", str(tmp_path / "other-machine"))
    capsys.readouterr()
    assert main(["runs", "--workspace", f"s3://{BUCKET}/ws", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["id"], r["status"]) for r in runs] == [("r1", "done")]
    before = {
        o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ws/r1/")["Contents"]
    }
    assert main(["run", str(tmp_path / "remote.yaml"), "--run", "r1"]) == 0
    after = {
        o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ws/r1/")["Contents"]
    }
    assert after == before


def test_a_step_downloads_its_input_from_the_remote_workspace(tmp_path, tiny_pipeline, s3):
    """Another machine (an empty local mirror) delivers from the predictions a first one uploaded."""
    document, write = tiny_pipeline
    config = write(document | {"workspace": f"s3://{BUCKET}/ws"})
    assert main(["export", str(config), "--run", "r1"]) == 0
    assert main(["predict", str(config), "--run", "r1"]) == 0
    mirror = tmp_path / "cache" / "workspaces" / "s3" / BUCKET / "ws"

    shutil.rmtree(mirror)
    assert main(["deliver", str(config), "--run", "r1"]) == 0
    assert (mirror / "r1" / "predict" / "predictions-mixer.json").exists()  # downloaded
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ws/r1/deliver/")["Contents"]]
    assert "ws/r1/deliver/tiny-classes.tif" in keys and f"ws/r1/deliver/{COMPLETE}" in keys

    # A folder without its marker is unfinished: nothing downloads it.
    s3.delete_object(Bucket=BUCKET, Key=f"ws/r1/predict/{COMPLETE}")
    shutil.rmtree(mirror)
    assert main(["deliver", str(config), "--run", "r1"]) == 1


def _written_then_deleted(s3, prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix`` that were written and are deleted now (the bucket keeps
    versions: ``_versioned``): key → the bytes of its last version."""
    listed = s3.list_object_versions(Bucket=BUCKET, Prefix=prefix)
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents"), f"{prefix} is left"
    deleted = {marker["Key"] for marker in listed.get("DeleteMarkers", []) if marker["IsLatest"]}
    last = {}
    for version in sorted(listed.get("Versions", []), key=lambda v: v["LastModified"]):
        last[version["Key"]] = version["VersionId"]
    assert set(last) == deleted, "every object written there is deleted"
    return {
        key: s3.get_object(Bucket=BUCKET, Key=key, VersionId=version)["Body"].read()
        for key, version in last.items()
    }


def _versioned(s3) -> None:
    """Keep every version of the bucket's objects, deleted ones too (for ``_written_then_deleted``)."""
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})


def _portable_run(tmp_path, write, document, env, args):
    """`terrabeam ARGS…` with ``document`` on the PortableRunner (Beam's job service + worker pool)."""
    from test_portable_runner import beam_service

    with (
        beam_service("job-service", tmp_path, env) as (_, job_port),
        beam_service("worker-pool", tmp_path, env) as (worker_pool, pool_port),
    ):
        remote = document | {
            "runner": {
                "kind": "portable",
                "job_endpoint": f"127.0.0.1:{job_port}",
                "environment_type": "EXTERNAL",
                "environment_config": f"127.0.0.1:{pool_port}",
            },
        }
        config = write(remote, "remote.yaml")
        done = subprocess.run(
            [sys.executable, "-m", "terrabeam", args[0], str(config), *args[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return worker_pool


def test_portable_workers_read_shards_and_model_from_the_s3_workspace(tmp_path, tiny_pipeline, s3):
    """`terrabeam predict` on the PortableRunner with the workspace on s3://: the workers fetch the
    export shards and the model (copied into <run>/model/) from the bucket and write prediction
    shards there (into <run>/.predict.work/, deleted once the step is published); the result equals
    the in-process predict's."""
    from test_portable_runner import _traced_env, _traced_opens

    _versioned(s3)
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "local"]) == 0
    assert main(["predict", str(config), "--run", "local"]) == 0
    local = tmp_path / "ws" / "local" / "predict"
    remote = document | {"workspace": f"s3://{BUCKET}/ws"}
    assert main(["export", str(write(remote, "export.yaml")), "--run", "r1"]) == 0
    mirror = tmp_path / "cache" / "workspaces" / "s3" / BUCKET / "ws" / "r1"
    shutil.rmtree(mirror / "export")  # as on another machine: the export is only in the bucket
    env = _traced_env(tmp_path) | {"TRACE_ROOT": str(tmp_path / "cache")}
    worker_pool = _portable_run(tmp_path, write, remote, env, ["predict", "--run", "r1"])
    # No shard passed through the launcher (issue 16, no double transfer): it read the export's mixer
    # and manifest only, and published the workers' shards by copies inside the bucket.
    launcher = [o for o in _traced_opens(tmp_path) if o.parent == os.getpid()]
    assert launcher and [o.path.name for o in launcher if ".tfrecord" in o.path.name] == []
    assert sorted(p.name for p in (mirror / ".export.metadata").iterdir()) == [
        "tiny-manifest.json",
        "tiny-mixer.json",
    ]
    assert not (mirror / "predict").exists()  # fetched by whichever step needs it here
    listing = json.loads(s3.get_object(Bucket=BUCKET, Key=f"ws/r1/predict/{COMPLETE}")["Body"].read())[
        "files"
    ]
    assert {"predictions-mixer.json", "predictions-manifest.json"} <= set(listing)

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ws/r1/")["Contents"]}
    assert "ws/r1/model/model.onnx" in keys
    shards = sorted(local.glob("predictions-*.tfrecord.gz"))
    assert len(shards) > 2
    work = _written_then_deleted(s3, "ws/r1/.predict.work/")
    for shard in shards:
        assert work[f"ws/r1/.predict.work/{shard.name}"] == shard.read_bytes()  # by the workers
        body = s3.get_object(Bucket=BUCKET, Key=f"ws/r1/predict/{shard.name}")["Body"].read()
        assert body == shard.read_bytes()
    # The pool's workers read their own copies of every export shard.
    by_workers = [o for o in _traced_opens(tmp_path) if o.parent == worker_pool]
    read = {o.path.name for o in by_workers if "r" in o.mode}
    exported = {p.name for p in (tmp_path / "ws" / "local" / "export").glob("tiny-*.tfrecord.gz")}
    assert exported and exported <= read


def test_whole_run_on_portable_workers_with_rasters_and_workspace_on_s3(tmp_path, tiny_pipeline, s3):
    """`terrabeam run` (one pipeline) with rasters, model and workspace on s3://: the workers read the
    rasters through /vsis3/ and write the map tiles straight into the bucket (<run>/.deliver.work/,
    deleted once deliver/ is published); the maps equal a local run's (pixels, profile and tags
    but the run's own)."""
    from test_portable_runner import _traced_env, _traced_opens

    _versioned(s3)
    document, write = tiny_pipeline
    document["outputs"]["tile_size"] = 32
    assert main(["run", str(write()), "--run", "local"]) == 0
    local = tmp_path / "ws" / "local" / "deliver"
    remote = document | {"workspace": f"s3://{BUCKET}/ws", "source": {"bands": {}}}
    for name, band in document["source"]["bands"].items():
        s3.upload_file(band["path"], BUCKET, f"inputs/{name}.tif")
        remote["source"]["bands"][name] = band | {"path": f"s3://{BUCKET}/inputs/{name}.tif"}
    env = _traced_env(tmp_path) | {"TRACE_ROOT": str(tmp_path / "cache")}
    worker_pool = _portable_run(tmp_path, write, remote, env, ["run", "--run", "r1"])
    # The launcher probed the local model; the workers fetched the copy in <run>/model/ themselves.
    by_workers = [o for o in _traced_opens(tmp_path) if o.parent == worker_pool]
    assert any(o.path.name == ".model.onnx.partial" and "w" in o.mode for o in by_workers)

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ws/r1/")["Contents"]}
    tiles = sorted(p.name for p in (local / "tiles").glob("*.tif"))
    assert len(tiles) == 2 * 6
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    work = _written_then_deleted(s3, "ws/r1/.deliver.work/")
    assert "ws/r1/.deliver.work/tiles/.source" in work  # the stamp of a resume, gone with the tiles
    for name in tiles:
        (fetched / name).write_bytes(work[f"ws/r1/.deliver.work/tiles/{name}"])  # by the workers
        assert_same_map(fetched / name, local / "tiles" / name)
        assert f"ws/r1/deliver/tiles/{name}" in keys
    for output in local.glob("*.tif"):
        body = s3.get_object(Bucket=BUCKET, Key=f"ws/r1/deliver/{output.name}")["Body"].read()
        (fetched / output.name).write_bytes(body)
        assert_same_map(fetched / output.name, output)


def test_workers_tiles_are_kept_only_under_this_runs_stamp(s3):
    """The map's tiles the workers left in the bucket are reused by a resumed run only under the
    same stamp (config, inputs, tile format); tiles without one, or under another, are deleted."""
    from terrabeam.workflow.maps import _match_remote_tiles

    folder = f"s3://{BUCKET}/ws/r/.deliver.work/tiles"
    prefix = "ws/r/.deliver.work/tiles/"

    def put(name):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}{name}", Body=b"tile")

    def names():
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"].removeprefix(prefix) for o in listed)

    put("m-classes-r0000c0000.tif")  # written before stamps (an older terrabeam)
    assert _match_remote_tiles(folder, "one") == []
    assert names() == [".source"]
    put("m-classes-r0000c0000.tif")
    assert _match_remote_tiles(folder, "one") == ["m-classes-r0000c0000.tif"]  # resumed: kept
    assert names() == [".source", "m-classes-r0000c0000.tif"]
    assert _match_remote_tiles(folder, "two") == []  # another config, input or tile format
    assert names() == [".source"]


def test_a_work_folder_that_cannot_be_deleted_is_a_warning_naming_it(monkeypatch, caplog):
    """The step is published before its remote work folder goes: a store that refuses the listing
    (or the deletion) leaves a warning naming the folder, not a failed run. No server needed."""
    from terrabeam import storage
    from terrabeam.errors import InputError

    def refuse(pattern):
        raise InputError(f"cannot list {pattern}: AccessDenied")

    monkeypatch.setattr(storage, "list_files", refuse)
    with caplog.at_level("WARNING", logger="terrabeam.storage"):
        storage.discard_work_folder(f"s3://{BUCKET}/ws/r1/.deliver.work")
    assert f"s3://{BUCKET}/ws/r1/.deliver.work" in caplog.text and "AccessDenied" in caplog.text
