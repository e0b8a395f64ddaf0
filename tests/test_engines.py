"""Engine, device and precision selection (predict/engines.py), each refusal's message, GPU batch
padding, and OpenVINO against ONNX Runtime on the real U-Net.

No GPU is reachable here: CUDA selection is tested at the clients' boundary (the providers ONNX
Runtime reports, torch.cuda.is_available), by asking for what this machine lacks and by monkeypatching
what the engine reports.
"""

from __future__ import annotations

import numpy as np
import pytest

from terrabeam.config import ModelConfig
from terrabeam.errors import ModelError
from terrabeam.predict import engines
from terrabeam.predict.engines import Runtime, default_threads, resolve_runtime
from terrabeam.predict.frameworks import load_predictor, padded
from terrabeam.predict.frameworks.onnx_model import providers


def model(**fields) -> ModelConfig:
    return ModelConfig(path="m.onnx", input_bands=["a", "b"], classes=["x", "y"], **fields)


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as it is: ONNX Runtime's CPU provider (asserted, not assumed)."""
    assert "CUDAExecutionProvider" not in engines.onnxruntime_providers()


def test_auto_keeps_fp32_on_the_frameworks_own_engine(cpu_only):
    assert resolve_runtime(model(), 2) == Runtime("onnxruntime", "cpu", "fp32", 2, 0)
    torch_model = model(framework="torch").model_copy(update={"path": "m.pt"})
    assert resolve_runtime(torch_model, 0).engine == "torch"


def test_auto_bf16_on_an_amx_cpu_runs_openvino(cpu_only, monkeypatch):
    monkeypatch.setattr(engines, "cpu_supports_bf16", lambda: True)
    assert resolve_runtime(model(precision="bf16"), 2) == Runtime("openvino", "cpu", "bf16", 2, 0)


def test_bf16_without_bf16_units_is_refused(monkeypatch):
    monkeypatch.setattr(engines, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ModelError, match="no bf16 units .* keep precision fp32"):
        resolve_runtime(model(precision="bf16"), 2)


def test_bf16_without_openvino_names_the_extra(monkeypatch):
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    with pytest.raises(ModelError, match=r"pip install 'terrabeam\[openvino\]'"):
        resolve_runtime(model(precision="bf16"), 2)


def test_refusals_say_what_would_work(cpu_only, monkeypatch):
    monkeypatch.setattr(engines, "cpu_supports_bf16", lambda: True)
    cases = [
        (model(precision="fp16"), "fp16 is for GPUs .* use bf16"),
        (model(engine="onnxruntime", precision="bf16"), "no bf16 on the CPU; use engine openvino"),
        (model(device="cuda"), r"onnxruntime sees no CUDA GPU here \(ONNX Runtime offers .*onnxruntime-gpu"),
        (model(engine="openvino", device="cuda:1"), "engine openvino runs on the CPU only"),
    ]
    for config, message in cases:
        with pytest.raises(ModelError, match=message):
            resolve_runtime(config, 2)
    sk = ModelConfig(
        path="m.joblib", framework="sklearn", kind="per_pixel", input_bands=["a"], classes=["x", "y"]
    )
    with pytest.raises(ModelError, match="sklearn models run at fp32 only"):
        resolve_runtime(sk.model_copy(update={"precision": "bf16"}), 1)


def test_engine_must_run_the_framework():
    with pytest.raises(ValueError, match="engine openvino does not run sklearn models"):
        ModelConfig(
            path="m.joblib", framework="sklearn", engine="openvino", kind="per_pixel", input_bands=["a"],
            classes=["x", "y"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="engine torch does not run onnx models"):
        ModelConfig(path="m.onnx", framework="onnx", engine="torch", input_bands=["a"], classes=["x", "y"])
    with pytest.raises(ValueError, match="device"):
        model(device="gpu")


def test_cuda_when_the_engine_reports_one(monkeypatch):
    """What ONNX Runtime would report with onnxruntime-gpu: auto picks cuda:0, GPU batches are
    padded, and the providers go TensorRT (fp16 asked) → CUDA → CPU."""
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(engines, "onnxruntime_providers", lambda: offered)
    runtime = resolve_runtime(model(batch_size=8), 0)
    assert (runtime.device, runtime.batch_size) == ("cuda:0", 8)
    fp16 = resolve_runtime(model(device="cuda:1", precision="fp16"), 0)
    chosen = providers(fp16, offered)
    assert [p[0] if isinstance(p, tuple) else p for p in chosen] == offered
    assert chosen[0][1]["trt_fp16_enable"] is True and chosen[1][1] == {"device_id": 1}
    monkeypatch.setattr(engines, "onnxruntime_providers", lambda: offered[1:])
    with pytest.raises(ModelError, match="needs its TensorRT provider"):
        resolve_runtime(model(device="cuda", precision="fp16"), 0)


def test_torch_cuda_refused_without_a_gpu():
    pytest.importorskip("torch")
    torch_model = ModelConfig(
        path="m.pt", framework="torch", device="cuda", input_bands=["a"], classes=["x", "y"]
    )
    with pytest.raises(ModelError, match="torch sees no CUDA GPU here; install a CUDA build of torch"):
        resolve_runtime(torch_model, 0)


def test_short_batches_are_padded_to_one_shape():
    """Synthetic: the padded predictor always sees batch_size patches and returns the real ones."""
    shapes = []

    def twice(batch):
        shapes.append(batch.shape)
        return batch * 2

    predict = padded(twice, 4)
    batch = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    np.testing.assert_array_equal(predict(batch), batch * 2)
    np.testing.assert_array_equal(predict(np.concatenate([batch, batch])), np.concatenate([batch, batch]) * 2)
    assert shapes == [(4, 3, 5, 5), (4, 3, 5, 5)]


def test_default_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr(engines.os, "cpu_count", lambda: 8)
    assert default_threads(model(), 1) == 8
    assert default_threads(model(), 2) == 4
    assert default_threads(model(), 16) == 1
    assert default_threads(model(), None) == 0  # remote workers: the engine's own default
    assert default_threads(model(threads=3), 2) == 3


def test_model_placement_follows_the_runner():
    from terrabeam.config import local_workers

    assert local_workers(["--runner=FnApiRunner"]) == 1
    assert local_workers(["--runner=FnApiRunner", "--direct_num_workers=2"]) == 2
    assert local_workers(["--runner=PortableRunner", "--job_endpoint=localhost:1"]) is None


def test_openvino_agrees_with_onnxruntime_on_the_real_unet(demo_data):
    """The real ukis-csmask U-Net on demo-like inputs (random normal values, seeded): OpenVINO fp32
    agrees with ONNX Runtime fp32 on ≥ 99.99 % of pixels' classes, bf16 (on AMX CPUs) ≥ 99 %."""
    pytest.importorskip("openvino")
    from conftest import DEMO_CONFIG

    from terrabeam.config import load_config

    config = load_config(DEMO_CONFIG)
    path = str(config.locate(config.model.path))
    inputs = np.random.default_rng(0).normal(size=(2, 6, 256, 256)).astype(np.float32)
    results = {}
    for engine, precision in [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]:
        if precision == "bf16" and not engines.cpu_supports_bf16():
            continue
        runtime = Runtime(engine, "cpu", precision, 2, 0)
        results[engine, precision] = load_predictor("onnx", path, "classification", runtime)(inputs)
    reference = results["onnxruntime", "fp32"].argmax(axis=1)
    assert (results["openvino", "fp32"].argmax(axis=1) == reference).mean() >= 0.9999
    if ("openvino", "bf16") in results:
        bf16 = results["openvino", "bf16"]
        assert (bf16.argmax(axis=1) == reference).mean() >= 0.99
        assert not np.array_equal(bf16, results["openvino", "fp32"])  # bf16 really ran


def test_compare_precision_on_the_demo_patches(demo_data, capsys):
    """`terrabeam compare-precision` on real patches of the demo scene: one JSON document with the
    agreement and speed ratio of OpenVINO bf16 against ONNX Runtime fp32; fp16 on a CPU is refused."""
    pytest.importorskip("openvino")
    import json

    from conftest import DEMO_CONFIG

    from terrabeam.cli import main

    assert main(["compare-precision", str(DEMO_CONFIG), "--precision", "fp16"]) == 1
    assert "fp16 is for GPUs" in capsys.readouterr().err
    if not engines.cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 units")
    assert main(["compare-precision", str(DEMO_CONFIG), "--patches", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["candidate"] == "openvino bf16 on cpu" and report["reference"] == "onnxruntime fp32 on cpu"
    assert report["patches"] == 4
    assert 0.99 <= report["agreement"] < 1.0  # bf16 really ran, and changed only a few pixels
    assert 0 < report["max_abs_difference"] < 1 and report["speed_ratio"] > 0


def test_dataflow_gpu_workers_are_asked_for_in_the_job_options():
    """runner.gpu_type / gpu_count / nvidia_mps → Dataflow's worker_accelerator service option (the
    Flex launcher submits the job with these flags too)."""
    from terrabeam.config import RunnerConfig

    base = {"kind": "dataflow", "project": "p", "region": "us-central1", "temp_location": "gs://b/t"}
    flags = RunnerConfig(
        **base, machine_type="g2-standard-8", gpu_type="nvidia-l4", nvidia_mps=True
    ).beam_flags()
    assert "--machine_type=g2-standard-8" in flags
    assert (
        "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver;use_nvidia_mps"
        in flags
    )
    assert not any("worker_accelerator" in f for f in RunnerConfig(**base).beam_flags())
    with pytest.raises(ValueError, match="nvidia_mps needs gpu_type and gpu_count 1"):
        RunnerConfig(**base, gpu_type="nvidia-l4", gpu_count=2, nvidia_mps=True)
