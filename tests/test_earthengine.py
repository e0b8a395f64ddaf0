"""The Earth Engine loop with the real clients at their HTTP boundary: earthengine-api talks to a
playback of the Earth Engine REST API on 127.0.0.1, google-cloud-storage (through Beam's FileSystems)
to a Cloud Storage emulator, and credentials come from an Application Default Credentials file whose
token endpoint is the playback (tests/earthengine_service.py). What Earth Engine would export is
synthetic: the playback's ``synthetic_pixels`` of the grid cut into patches and written in its layout
(protobuf oracle + Beam's TFRecord codec, gzip, three shards, kernel margin, non-square patches).
Nothing here reached the live services.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import socket
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import yaml
from apache_beam.io.tfrecordio import _TFRecordUtil
from conftest import write_conv_model
from earthengine_service import ACCESS_TOKEN, EarthEnginePlayback, synthetic_pixels, write_adc_file

from terrabeam import earthengine
from terrabeam.cli import main
from terrabeam.config import EarthEngineSource, load_config, parse_config
from terrabeam.errors import ConfigError
from terrabeam.layout import list_shards
from terrabeam.sources.earthengine import composite_window, export_grid
from terrabeam.tfrecord import decode_example, read_records
from terrabeam.workflow.runner import Runner
from terrabeam.workflow.state import RunState

PROJECT = "playback-project"
BUCKET = "terrabeam-test"
W, H, KW, KH = 12, 8, 4, 2
WINDOW = "2025-01-01/2025-02-01"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GRID_ORIGIN = (399990.0, 5599500.0)  # the config's grid: 30 m pixels from this corner
EXPORT_BANDS = ["red", "nir", "ndvi"]


def grid_patches(pw: int, ph: int, kw: int, kh: int) -> list[np.ndarray]:
    """The 4 × 3 patches (bands, ph + kh, pw + kw) of the config's grid, margins included, as the
    playback's Earth Engine computes them: what an export writes and computePixels answers."""
    patches = []
    for index in range(12):
        row, col = divmod(index, 4)
        x, y = GRID_ORIGIN[0] + (col * pw - kw // 2) * 30, GRID_ORIGIN[1] - (row * ph - kh // 2) * 30
        values = synthetic_pixels(EXPORT_BANDS, (30, 0, x, 0, -30, y), pw + kw, ph + kh)
        patches.append(np.stack([values[b] for b in EXPORT_BANDS]))
    return patches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gcs(monkeypatch):
    """The Cloud Storage emulator on 127.0.0.1 with an empty bucket; a google-cloud-storage client."""
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    yield client.bucket(BUCKET)
    server.stop()


@pytest.fixture
def services(tmp_path, monkeypatch, gcs, example_pb2):
    """Playback + emulator + credentials; the playback writes an Earth Engine-layout export into the
    bucket when asked to export (its patches are kept in ``playback.exported``): three numbered
    shards and ``<prefix>-mixer.json``, or with ``playback.single_file`` one ``<prefix>.tfrecord.gz``
    and ``<prefix>.json``."""
    playback = EarthEnginePlayback(PROJECT)
    playback.exported = []
    playback.single_file = False

    def write_export(body):
        options = body["fileExportOptions"]
        prefix = options["cloudStorageDestination"]["filenamePrefix"]
        tile = options["tfRecordOptions"]["tileDimensions"]
        margin = options["tfRecordOptions"]["marginDimensions"]
        patches = grid_patches(tile["width"], tile["height"], margin["width"], margin["height"])
        playback.exported = patches
        chunks = [patches] if playback.single_file else [patches[0:5], patches[5:9], patches[9:12]]
        for number, chunk in enumerate(chunks):
            buffer = io.BytesIO()
            for patch in chunk:
                example = example_pb2.Example()
                for name, band in zip(EXPORT_BANDS, patch, strict=True):
                    example.features.feature[name].float_list.value.extend(band.ravel().tolist())
                _TFRecordUtil.write_record(buffer, example.SerializeToString())
            blob = gcs.blob(
                f"{prefix}.tfrecord.gz" if playback.single_file else f"{prefix}-{number:05d}.tfrecord.gz"
            )
            blob.upload_from_string(gzip.compress(buffer.getvalue()))
        mixer = {
            "projection": {
                "crs": "EPSG:32633",
                "affine": {"doubleMatrix": [30.0, 0.0, *GRID_ORIGIN[:1], 0.0, -30.0, *GRID_ORIGIN[1:]]},
            },
            "patchDimensions": [tile["width"], tile["height"]],
            "patchesPerRow": 4,
            "totalPatches": 12,
        }
        gcs.blob(f"{prefix}.json" if playback.single_file else f"{prefix}-mixer.json").upload_from_string(
            json.dumps(mixer)
        )

    playback.on_export = write_export
    playback.start()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.config/earthengine or gcloud credentials
    adc = tmp_path / "adc.json"
    playback.secret = write_adc_file(adc, playback.url + "/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setattr(earthengine, "_connected", None)
    yield playback
    playback.stop()


def _config(tmp_path, playback, **changes) -> Path:
    write_conv_model(tmp_path / "conv.onnx", channels=3, outputs=2, kernel=3)
    document = {
        "name": "ee-landcover",
        "workspace": str(tmp_path / "ws"),
        "earthengine": {"project": PROJECT, "staging": f"gs://{BUCKET}/staging", "api_url": playback.url},
        "source": {
            "kind": "earthengine",
            "collection": "LANDSAT/LC09/C02/T1_L2",
            "window": {"months_before": 12},
            "cloud_mask": "landsat_c2",
            "bands": {
                "red": {"band": "SR_B4", "scale": 0.0000275, "offset": -0.2},
                "nir": {"band": "SR_B5", "scale": 0.0000275, "offset": -0.2},
            },
            "derived": {"ndvi": "(nir - red) / (nir + red)"},
            "fill_value": -1,
        },
        # 1300 m × 500 m at 30 m → 44 × 17 px → 4 × 3 patches of 12 × 8 (a non-square grid).
        "grid": {
            "crs": "EPSG:32633",
            "resolution": 30,
            "region": {"bbox": [399990, 5599000, 401290, 5599500]},
            "patch_size": [W, H],
            "kernel_size": [KW, KH],
        },
        "export": {"prefix": "ee", "max_file_size": 2000},
        "model": {
            "path": str(tmp_path / "conv.onnx"),
            "input_bands": ["red", "nir", "ndvi"],
            "classes": ["water", "land"],
        },
        "outputs": {
            # TFRecord ingestion here; COG-backed images (the default): test_earthengine_cog.py
            "earthengine": {
                "collection": f"projects/{PROJECT}/assets/terrabeam/landcover",
                "mode": "tfrecord",
            },
            "quicklook": False,
        },
    } | changes
    path = tmp_path / "ee.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_earth_engine_run_end_to_end_at_the_http_boundary(tmp_path, services, gcs, capsys):
    playback = services
    config_path = _config(tmp_path, playback)
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 0

    # Credentials: the ADC file's token endpoint was used, every API call carried its token.
    assert playback.calls("POST", "/token")
    api_calls = [r for r in playback.requests if r.path.startswith("/v1/")]
    assert api_calls and all(r.headers["authorization"] == f"Bearer {ACCESS_TOKEN}" for r in api_calls)

    # The export request: TFRecord patches on Cloud Storage in terrabeam's grid.
    (export,) = playback.calls("POST", "/image:export")
    options = export.body["fileExportOptions"]
    assert options["fileFormat"] == "TF_RECORD_IMAGE"
    assert options["cloudStorageDestination"] == {
        "bucket": BUCKET,
        "filenamePrefix": "staging/ee-landcover/r1/export/ee",
    }
    assert options["tfRecordOptions"] == {
        "tileDimensions": {"width": W, "height": H},
        "marginDimensions": {"width": KW, "height": KH},
        "compress": True,
        "maxSizeBytes": {"value": "2000"},
        "defaultValue": -1,
    }
    expression = json.dumps(export.body["expression"])
    for expected in (
        '"LANDSAT/LC09/C02/T1_L2"',
        '"2024-02-01"',  # 12 months before the run date (the window's end)
        '"2025-02-01"',
        '"Image.bitwiseAnd"',  # the Landsat Collection 2 QA_PIXEL mask
        '"reduce.median"',
        '"Image.parseExpression"',  # the derived ndvi expression
        "[30, 0, 399990, 0, -30, 5599500]",  # crsTransform: terrabeam's grid
        "[0, 0, 48, 24]",  # dimensions: the region padded to 4 × 3 whole patches
    ):
        assert expected in expression.replace(".0,", ",").replace(".0]", "]"), expected
    operations = playback.operations
    export_op = next(o for o in operations.values() if o.kind == "EXPORT_IMAGE")
    assert export_op.state() == "SUCCEEDED" and export_op.polls >= 2  # RUNNING, then SUCCEEDED

    # Predictions: one record per exported patch, in order, at core size, in the export's shards.
    run_dir = tmp_path / "ws" / "r1"
    shards = list_shards(run_dir / "predict", "predictions")
    assert [sum(1 for _ in read_records(s)) for s in shards] == [5, 4, 3]
    records = [decode_example(r) for s in shards for r in read_records(s)]
    assert len(records) == len(playback.exported) == 12
    assert all(r["class"].size == W * H and r["prob_water"].size == W * H for r in records)
    assert all(r["class"].dtype == np.int64 and r["prob_land"].dtype == np.float32 for r in records)

    # The ingestion: every prediction shard, in order, then the mixer; times, properties, pyramiding.
    (collection,) = playback.calls("POST", f"/v1/projects/{PROJECT}/assets")
    assert collection.query["assetId"] == ["terrabeam/landcover"]
    assert collection.body == {"type": "IMAGE_COLLECTION"}
    (ingest,) = playback.calls("POST", "/image:import")
    manifest = ingest.body["imageManifest"]
    folder = f"gs://{BUCKET}/staging/ee-landcover/r1/predict"
    assert manifest["name"] == f"projects/{PROJECT}/assets/terrabeam/landcover/ee-landcover_20250201"
    assert manifest["tilesets"][0]["sources"][0]["uris"] == [
        *(f"{folder}/predictions-{i:05d}.tfrecord.gz" for i in range(3)),
        f"{folder}/predictions-mixer.json",
    ]
    assert manifest["startTime"] == "2024-02-01T00:00:00Z"
    assert manifest["endTime"] == "2025-02-01T00:00:00Z"
    config = load_config(config_path)
    model_hash = hashlib.sha256((tmp_path / "conv.onnx").read_bytes()).hexdigest()[:12]
    assert manifest["properties"] == {
        "pipeline": "ee-landcover",
        "model": "conv.onnx",
        "model_version": model_hash,
        "run_id": "r1",
        "config_hash": config.fingerprint(),
    }
    assert {b["id"]: b["pyramidingPolicy"] for b in manifest["bands"]} == {
        "class": "MODE",
        "prob_water": "MEAN",
        "prob_land": "MEAN",
    }
    assert ingest.body["overwrite"] is False
    # What Earth Engine would read is what predict wrote, byte for byte.
    for shard in shards:
        assert (
            gcs.blob(f"staging/ee-landcover/r1/predict/{shard.name}").download_as_bytes()
            == shard.read_bytes()
        )

    # The run's record: both tasks' ids, the asset among the outputs.
    state = RunState(tmp_path / "ws" / "terrabeam.db")
    record = state.get_run("r1")
    state.close()
    steps = {s.name: s for s in record.steps}
    assert steps["export"].external_id == export_op.name
    assert steps["deliver"].external_id.endswith("INGEST_IMAGE_0002")
    assert f"earthengine://{manifest['name']}" in record.outputs

    # The same run again: nothing is started, no second task or asset.
    before = len(playback.requests)
    assert main(["run", str(config_path), "--window", WINDOW]) == 0
    new = playback.requests[before:]
    assert not [r for r in new if r.method == "POST" and r.path.startswith("/v1/")]

    # No secret of the credentials file in any output, log, state or workspace file.
    output = capsys.readouterr()
    secrets = [playback.secret]  # a line of the throwaway private key made by the fixture
    texts = [output.out, output.err] + [
        p.read_bytes().decode(errors="replace") for p in (tmp_path / "ws").rglob("*") if p.is_file()
    ]
    assert not [s for s in secrets for t in texts if s in t]


def test_a_single_file_export_is_found_by_its_earth_engine_names(tmp_path, services):
    """Earth Engine names a one-shard export ``<prefix>.tfrecord.gz`` + ``<prefix>.json``."""
    services.single_file = True
    config_path = _config(tmp_path, services, export={"prefix": "ee", "max_file_size": 10**6})
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 0
    export = tmp_path / "ws" / "r1" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["ee-manifest.json", "ee.json", "ee.tfrecord.gz"]
    (shard,) = list_shards(tmp_path / "ws" / "r1" / "predict", "predictions")
    assert sum(1 for _ in read_records(shard)) == len(services.exported) == 12


def test_failed_export_is_reported_with_earth_engines_message_and_resume_starts_a_new_task(
    tmp_path, services, capsys
):
    playback = services
    playback.export_script = ["RUNNING", "FAILED"]
    config_path = _config(tmp_path, playback)
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 1
    err = capsys.readouterr().err
    assert "Export too large: specified 1e9 pixels (max: 1e8)." in err
    assert "export task projects/playback-project/operations/EXPORT_IMAGE_0001 failed" in err
    assert main(["status", "r1", "--workspace", str(tmp_path / "ws"), "--json"]) == 1  # a failed run
    status = json.loads(capsys.readouterr().out)
    export = next(s for s in status["steps"] if s["name"] == "export")
    assert export["status"] == "failed" and export["attempts"] == 1  # an Earth Engine failure is final
    assert "Export too large" in export["error"]
    assert not (tmp_path / "ws" / "r1" / "export").exists()

    playback.export_script = ["RUNNING", "SUCCEEDED"]
    assert main(["resume", "r1", "--workspace", str(tmp_path / "ws")]) == 0
    first, second = playback.calls("POST", "/image:export")
    assert first.body["requestId"] != second.body["requestId"]  # a new task, not the failed one again


def test_interrupted_run_adopts_its_recorded_task_instead_of_starting_another(tmp_path, services):
    playback = services
    playback.export_script = ["RUNNING", "RUNNING", "SUCCEEDED"]
    config = load_config(_config(tmp_path, playback))

    def killed(seconds):
        raise KeyboardInterrupt  # the process dies while it waits for Earth Engine

    with pytest.raises(KeyboardInterrupt):
        Runner(config, tmp_path / "ws", sleep=killed).run("r1", tuple(WINDOW.split("/")))
    assert len(playback.calls("POST", "/image:export")) == 1

    import ee  # as in a new process: no initialised client

    ee.Reset()
    earthengine._connected = None

    record = Runner(config, tmp_path / "ws", sleep=lambda s: None).run("r1", tuple(WINDOW.split("/")))
    assert record.status == "done"
    assert len(playback.calls("POST", "/image:export")) == 1  # the recorded task was polled again
    assert len(playback.calls("POST", "/image:import")) == 1


def test_example_without_credentials_fails_clearly_and_does_nothing(tmp_path):
    workspace = tmp_path / "ws"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_", "STORAGE_EMU"))}
    env |= {"HOME": str(home)}  # as on a fresh machine: no stored credentials anywhere
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "terrabeam",
            "run",
            str(EXAMPLES / "earthengine-landcover.yaml"),
            "--workspace",
            str(workspace),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Earth Engine: no credentials found" in result.stderr
    assert "gcloud auth application-default login" in result.stderr
    assert "GOOGLE_APPLICATION_CREDENTIALS" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workspace.exists()  # no run recorded, no folder, no lock


def test_composite_window_absolute_relative_or_the_runs():
    def source(window):
        return EarthEngineSource(
            kind="earthengine", collection="C", bands={"a": {"band": "B1"}}, window=window
        )

    run_date = date(2025, 3, 31)
    assert composite_window(source({"months_before": 1}), None, run_date) == (date(2025, 2, 28), run_date)
    assert composite_window(source({"months_before": 12}), None, run_date) == (date(2024, 3, 31), run_date)
    assert composite_window(source({"days_before": 10}), None, run_date) == (date(2025, 3, 21), run_date)
    absolute = {"start": "2020-06-01", "end": "2020-09-01"}
    assert composite_window(source(absolute), None, run_date) == (date(2020, 6, 1), date(2020, 9, 1))
    assert composite_window(source(None), ("2025-01-01", "2025-02-01"), run_date) == (
        date(2025, 1, 1),
        date(2025, 2, 1),
    )
    with pytest.raises(ConfigError, match="source.window: not set and the run has no window"):
        composite_window(source(None), None, run_date)
    with pytest.raises(ValueError, match="not both"):
        source({"start": "2020-01-01", "end": "2021-01-01", "months_before": 3})


def test_earthengine_config_needs_its_section_and_a_grid(tmp_path):
    document = yaml.safe_load((EXAMPLES / "earthengine-landcover.yaml").read_text())
    config = parse_config(document, EXAMPLES)
    grid, region = export_grid(config)
    assert grid.total_patches == grid.patches_per_row * math.ceil(region.height / grid.patch_height)
    assert grid.width >= region.width and grid.width - region.width < grid.patch_width
    without = {k: v for k, v in document.items() if k != "earthengine"}
    with pytest.raises(ConfigError, match="needs an 'earthengine:' section"):
        parse_config(without, EXAMPLES)
    no_grid = document | {"grid": {"patch_size": [256, 256]}}
    with pytest.raises(ConfigError, match="needs grid.crs, grid.resolution, grid.region"):
        parse_config(no_grid, EXAMPLES)
    bad_staging = document | {"earthengine": document["earthengine"] | {"staging": "/tmp/x"}}
    with pytest.raises(ConfigError, match="earthengine.staging"):
        parse_config(bad_staging, EXAMPLES)


@pytest.mark.parametrize(
    ("source", "expected", "absent"),
    [
        (
            {"collection": "COPERNICUS/S2_SR_HARMONIZED", "cloud_mask": "s2_scl", "reducer": "mean"},
            [
                '"COPERNICUS/S2_SR_HARMONIZED"',
                '"Image.remap"',
                '"SCL"',
                "[0, 1, 3, 8, 9, 10]",
                '"reduce.mean"',
            ],
            ['"QA_PIXEL"'],
        ),
        (
            {"collection": "COPERNICUS/S2_HARMONIZED", "cloud_mask": "s2_qa60", "reducer": "mosaic"},
            ['"QA60"', "3072", '"ImageCollection.mosaic"'],
            ['"SCL"'],
        ),
        (
            {"image": "LANDSAT/LC09/C02/T1_L2/LC09_193023_20240610"},
            ['"Image.load"', '"LANDSAT/LC09/C02/T1_L2/LC09_193023_20240610"'],
            ['"ImageCollection.load"', '"Image.bitwiseAnd"'],
        ),
    ],
)
def test_composite_for_each_collection_family(tmp_path, services, source, expected, absent):
    """The ee.Image terrabeam builds, serialized by the real client as it would be sent."""
    import ee

    from terrabeam.earthengine import connect
    from terrabeam.sources.earthengine import build_image

    document = yaml.safe_load(_config(tmp_path, services).read_text())
    document["source"] = {
        k: v for k, v in document["source"].items() if k not in ("collection", "cloud_mask")
    } | source
    config = parse_config(document, tmp_path)
    connect(config.earthengine)
    image = build_image(ee, config, date(2024, 1, 1), date(2025, 1, 1))
    sent = json.dumps(ee.serializer.encode(image, for_cloud_api=True))
    for text in expected:
        assert text in sent, text
    for text in absent:
        assert text not in sent, text
    assert '"Image.multiply"' in sent and '"Image.add"' in sent  # scale factors and offsets


def test_cancelled_export_fails_the_step_and_says_so(tmp_path, services, capsys):
    services.export_script = ["RUNNING", "CANCELLED"]
    assert main(["run", str(_config(tmp_path, services)), "--run", "r1", "--window", WINDOW]) == 1
    assert "export task projects/playback-project/operations/EXPORT_IMAGE_0001 was cancelled" in (
        capsys.readouterr().err
    )


def test_service_account_from_config_is_impersonated_keylessly(tmp_path, services):
    from google.auth import impersonated_credentials

    from terrabeam.config import EarthEngineConfig
    from terrabeam.earthengine import find_credentials

    sa = "runner@playback-project.iam.gserviceaccount.com"
    config = EarthEngineConfig(project=PROJECT, staging=f"gs://{BUCKET}/x", service_account=sa)
    credentials = find_credentials(config)
    assert isinstance(credentials, impersonated_credentials.Credentials)
    assert credentials.service_account_email == sa


def test_a_remote_run_leaves_the_export_on_cloud_storage(tmp_path, services, gcs, monkeypatch):
    """Workspace on gs:// and the PortableRunner's workers (issue 16, no double transfer): the
    export is copied into the workspace inside the store (a small export's records counted by one
    read here, through a temporary copy outside the workspace); the launching machine writes no
    export shard into its mirror of the workspace, the workers read them all."""
    from test_object_storage import _portable_run
    from test_portable_runner import _traced_env, _traced_opens

    monkeypatch.setenv("TERRABEAM_CACHE", str(tmp_path / "cache"))
    document = yaml.safe_load(_config(tmp_path, services, outputs={"quicklook": False}).read_text())
    document["workspace"] = f"gs://{BUCKET}/ws"

    def write(doc, name):
        (tmp_path / name).write_text(yaml.safe_dump(doc))
        return tmp_path / name

    env = _traced_env(tmp_path) | {"TRACE_ROOT": str(tmp_path / "cache")}
    worker_pool = _portable_run(tmp_path, write, document, env, ["run", "--run", "r1", "--window", WINDOW])

    exported = sorted(b.name for b in gcs.list_blobs(prefix="staging/ee-landcover/r1/export/ee-0"))
    names = [posixpath.basename(n) for n in exported]
    assert names == [f"ee-{i:05d}.tfrecord.gz" for i in range(3)]
    for name in names:  # copied inside the bucket, byte for byte
        there = gcs.blob(f"ws/r1/export/{name}").download_as_bytes()
        assert there == gcs.blob(f"staging/ee-landcover/r1/export/{name}").download_as_bytes()
    manifest = json.loads(gcs.blob("ws/r1/export/ee-manifest.json").download_as_bytes())
    assert manifest["shard_records"] == [5, 4, 3]
    opens = _traced_opens(tmp_path)
    launcher = [o.path.name for o in opens if o.parent != worker_pool]
    assert launcher and not [n for n in launcher if n in names]
    by_workers = {o.path.name for o in opens if o.parent == worker_pool and "r" in o.mode}
    assert set(names) <= by_workers
    assert gcs.blob("ws/r1/deliver/ee-landcover-classes.tif").exists()


def test_shard_records_are_counted_by_the_workers_above_the_size_limit(tmp_path, services, gcs):
    """A large export is counted by a Beam pipeline (here the in-process runner) reading the shards
    from Cloud Storage; below the limit this machine reads them. Both give the export's counts."""
    from terrabeam.sources import shard_counts
    from terrabeam.sources.earthengine import export_folder, reference_export, start_export

    config = load_config(_config(tmp_path, services))
    start_export(config, "r1", tuple(WINDOW.split("/")), None)  # the playback writes the export
    for limit in (0, 10**9):  # over the limit: the workers; under it: here
        out = tmp_path / f"meta-{limit}"
        out.mkdir()

        def count(shards, limit=limit):
            return shard_counts.count_shards(shards, ["--runner=FnApiRunner"], limit)

        _, manifest, shards = reference_export(config, "r1", out, count)
        assert manifest.shard_records == [5, 4, 3]
        assert sorted(p.name for p in out.iterdir()) == ["ee-manifest.json", "ee-mixer.json"]
        folder = export_folder(config, "r1")
        assert list(shards.values()) == [f"{folder}/ee-{i:05d}.tfrecord.gz" for i in range(3)]
    missing = f"{folder}/ee-00009.tfrecord.gz"
    with pytest.raises(Exception, match="ee-00009.tfrecord.gz: not found"):  # named, from the worker
        shard_counts.count_on_workers([*shards.values(), missing], [])
