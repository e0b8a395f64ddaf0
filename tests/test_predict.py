"""The Beam predict step: order survives parallel workers and reshuffling; options pass through.
Synthetic scene and 1×1-conv model (tiny_pipeline)."""

from __future__ import annotations

import numpy as np
import pytest

from terrabeam.cli import main
from terrabeam.config import PredictConfig, RunnerConfig
from terrabeam.layout import list_shards
from terrabeam.predict.io import PostProcess
from terrabeam.tfrecord import decode_example, encode_example, read_records


def _records(run_dir):
    shards = list_shards(run_dir / "predict", "predictions")
    return [p.name for p in shards], [r for s in shards for r in read_records(s)]


@pytest.mark.parametrize("mode", ["in_memory", "multi_threading"])
def test_parallel_reshuffled_run_writes_the_same_shards(tmp_path, tiny_pipeline, mode):
    """Two worker threads: FnApiRunner's in-memory workers (what `workers: 2` runs) or its gRPC ones."""
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    assert main(["predict", str(config), "--run", "r"]) == 0
    names, serial = _records(tmp_path / "ws" / "r")
    assert len(names) > 2, "the test needs several shards"
    args = ["--direct_num_workers=2", f"--direct_running_mode={mode}"]
    assert main(["predict", str(config), "--run", "r", *args]) == 0
    parallel_names, parallel = _records(tmp_path / "ws" / "r")
    assert parallel_names == names
    assert parallel == serial  # byte for byte, in order


def test_reshuffle_defaults_to_multi_worker_runners_only():
    assert not PredictConfig().should_reshuffle(["--runner=FnApiRunner"])
    assert PredictConfig().should_reshuffle(["--runner=FnApiRunner", "--direct_num_workers=2"])
    assert PredictConfig().should_reshuffle(["--runner=DataflowRunner"])
    assert not PredictConfig(reshuffle=False).should_reshuffle(["--runner=DataflowRunner"])
    assert PredictConfig().should_reshuffle(RunnerConfig(workers=2).beam_flags())
    assert PredictConfig().should_reshuffle(RunnerConfig(kind="portable", job_endpoint="h:1").beam_flags())


def test_runner_section_becomes_beam_flags_and_command_line_wins():
    assert RunnerConfig().beam_flags() == ["--runner=FnApiRunner"]
    assert RunnerConfig(workers=2).beam_flags() == ["--runner=FnApiRunner", "--direct_num_workers=2"]
    dataflow = RunnerConfig(
        kind="dataflow",
        project="p",
        region="europe-west1",
        temp_location="gs://b/tmp",
        machine_type="n2-standard-4",
        max_workers=8,
        options={"save_main_session": True, "x": False},
    )
    assert dataflow.beam_flags() == [
        "--runner=DataflowRunner",
        "--project=p",
        "--region=europe-west1",
        "--temp_location=gs://b/tmp",
        "--machine_type=n2-standard-4",
        "--max_num_workers=8",
        "--save_main_session",
    ]
    portable = RunnerConfig(
        kind="portable",
        job_endpoint="127.0.0.1:8099",
        environment_type="EXTERNAL",
        environment_config="127.0.0.1:50000",
    )
    assert portable.beam_flags() == [
        "--runner=PortableRunner",
        "--job_endpoint=127.0.0.1:8099",
        "--environment_type=EXTERNAL",
        "--environment_config=127.0.0.1:50000",
    ]
    with pytest.raises(ValueError, match="needs project, region, temp_location"):
        RunnerConfig(kind="dataflow")
    with pytest.raises(ValueError, match="needs job_endpoint"):
        RunnerConfig(kind="portable")


def test_postprocess_softmax_argmax_and_crop():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 12, 10)).astype(np.float32)
    features = PostProcess(["a", "b", "c"], core=(10, 6), output="logits").features(logits)
    core = logits[:, 1:-1, 2:-2]
    expected = np.exp(core) / np.exp(core).sum(axis=0)
    np.testing.assert_allclose(np.stack([features[f"prob_{c}"] for c in "abc"]), expected, rtol=1e-5)
    np.testing.assert_array_equal(features["class"], core.argmax(axis=0))
    assert features["class"].dtype == np.int64
    decoded = decode_example(encode_example(features))
    np.testing.assert_array_equal(decoded["class"], features["class"].ravel())


def test_earth_engine_export_without_manifest(tmp_path, tiny_pipeline):
    """Earth Engine writes shards + mixer only: the margin comes from the config, the map covers the grid."""
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    export = tmp_path / "ws" / "r" / "export"
    with_manifest = [r for s in list_shards(export, "tiny") for r in read_records(s)]
    (export / "tiny-manifest.json").unlink()
    assert main(["predict", str(config), "--run", "r"]) == 0
    assert main(["deliver", str(config), "--run", "r"]) == 0
    names, records = _records(tmp_path / "ws" / "r")
    assert len(records) == len(with_manifest) == 12  # 70×50 px in 32×16 patches: 3 per row, 4 rows
    import rasterio

    with rasterio.open(tmp_path / "ws" / "r" / "deliver" / "tiny-classes.tif") as ds:
        assert (ds.width, ds.height) == (96, 64)  # the whole padded grid: the true region is unknown


def test_dataflow_needs_a_way_to_ship_terrabeam_and_a_cloud_workspace(tmp_path, tiny_pipeline):
    from terrabeam.config import load_config
    from terrabeam.errors import ConfigError
    from terrabeam.predict.pipeline import pipeline_flags
    from terrabeam.workflow.steps import remote_io
    from terrabeam.workspace import Workspace

    document, write = tiny_pipeline
    dataflow = {"kind": "dataflow", "project": "p", "region": "r", "temp_location": "gs://b/t"}
    config = load_config(write(document | {"runner": dataflow}))
    with pytest.raises(ConfigError, match="workers need terrabeam installed"):
        pipeline_flags(config)
    assert "--sdk_container_image=img" in pipeline_flags(config, ["--sdk_container_image=img"])
    with pytest.raises(ConfigError, match="set 'workspace:' .* to a gs:// folder"):
        remote_io(config, Workspace(tmp_path / "ws", "r"))
