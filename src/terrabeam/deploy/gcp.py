"""`terrabeam deploy gcp`: render, from a pipeline config, everything that runs it on Google Cloud.

The output folder is also the Cloud Build context:

    deploy.sh               gcloud commands in order (APIs, account, roles, images, template, service,
                            workflow, schedule); safe to re-run
    cloudbuild.yaml         builds the images
    predict.Dockerfile      Dataflow Flex Template launcher + worker image (the map or predict step)
    steps.Dockerfile        Cloud Run image serving export and deliver over HTTP (Earth Engine only)
    flex/metadata.json      Flex Template parameters;  flex/launcher.py its Python entry point
    workflow.yaml           Cloud Workflows: map, or export → predict → deliver; polled, retried
    scheduler.json          the Cloud Scheduler job (schedule.cron), as the API's Job resource
    service-account.txt     the roles of the one service account, and why
    pipeline/               the config as the images see it, and the model
    terrabeam/              terrabeam's source, installed into the images with the pinned versions

A raster source with file outputs is one Beam pipeline (the map step) on Dataflow, so nothing runs
on Cloud Run; an Earth Engine source or sink keeps export and deliver there (flex_main.template_step).
Output is written into a temporary folder and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

import terrabeam
from terrabeam.config import PipelineConfig
from terrabeam.deploy import flex_main
from terrabeam.deploy.gcp_iam import apis, describe, grants
from terrabeam.deploy.gcp_target import TIME_ZONE, GcpTarget
from terrabeam.deploy.gcp_workflow import render_workflow
from terrabeam.errors import DeployError
from terrabeam.workspace import replace_folder

PYTHON_VERSION = "3.11"
LAUNCHER_BASE = (
    f"gcr.io/dataflow-templates-base/python{PYTHON_VERSION.replace('.', '')}-template-launcher-base"
)
MARKER = ".terrabeam-deploy"
SOURCE_FILES = ("pyproject.toml", "README.md", "constraints.txt")
# GDAL's /vsigs/ takes the service account's token from the metadata server only where it knows it
# runs on Google Cloud; inside a container it cannot tell, so the images say so.
GDAL_ON_GCE = "CPL_MACHINE_IS_GCE=YES"
# Cloud Run ends a request after this; a longer export or deliver needs a Cloud Run job instead.
REQUEST_TIMEOUT_SECONDS = 3600


def render_gcp(config: PipelineConfig, out: Path) -> list[Path]:
    """Render the deployment of ``config`` into ``out`` (replacing an earlier rendering there)."""
    target = GcpTarget.from_config(config)
    out = out.resolve()
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()):
        raise DeployError(f"{out}: exists and is not a terrabeam deployment; give an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.rendering-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _render_into(config, target, staging)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(p for p in out.rglob("*") if p.is_file())


def _render_into(config: PipelineConfig, target: GcpTarget, folder: Path) -> None:
    _copy_source(folder / "terrabeam")
    model_name = _copy_model(config, folder / "pipeline" / "model")
    files = {
        "pipeline/pipeline.yaml": render_pipeline_config(config, target, f"model/{model_name}"),
        "predict.Dockerfile": render_predict_dockerfile(target),
        "cloudbuild.yaml": render_cloudbuild(target),
        "flex/metadata.json": json.dumps(flex_metadata(target), indent=2) + "\n",
        "flex/launcher.py": LAUNCHER,
        "workflow.yaml": render_workflow(target, config.workflow),
        "service-account.txt": describe(target),
        "deploy.sh": render_deploy_script(target, config),
        MARKER: f"rendered by terrabeam {terrabeam.__version__} from {config.source_path or 'a config'}\n",
    }
    if target.service_steps:
        files["steps.Dockerfile"] = render_steps_dockerfile(target)
    if target.cron:
        files["scheduler.json"] = json.dumps(scheduler_job(target), indent=2) + "\n"
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / "deploy.sh").chmod(0o755)


def _copy_source(destination: Path) -> None:
    """terrabeam's source tree (the package's checkout), so the images install this very code."""
    root = Path(terrabeam.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists() or not (root / "src" / "terrabeam").is_dir():
        raise DeployError(
            f"{root}: terrabeam's source tree (pyproject.toml, src/terrabeam) is not here; "
            "run `terrabeam deploy` from a source checkout (pip install -e)"
        )
    missing = [name for name in SOURCE_FILES if not (root / name).exists()]
    if missing:
        raise DeployError(f"{root}: {', '.join(missing)} missing from terrabeam's source tree")
    destination.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy2(root / name, destination / name)
    shutil.copytree(
        root / "src" / "terrabeam",
        destination / "src" / "terrabeam",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )


def _copy_model(config: PipelineConfig, destination: Path) -> str:
    model = config.resolve(config.model.path)
    if not model.exists():
        raise DeployError(f"model.path: {model} not found; the predict image needs the model")
    destination.mkdir(parents=True)
    if model.is_dir():
        shutil.copytree(model, destination / model.name)
    else:
        shutil.copy2(model, destination / model.name)
    return model.name


def render_pipeline_config(config: PipelineConfig, target: GcpTarget, model_path: str) -> str:
    """The config as the images read it: the model beside it, the workspace the gs:// URI of
    deploy.gcp.workspace, a GeoJSON region file inlined. Every other setting is the validated config."""
    document = config.model_dump(mode="json")
    document["workspace"] = target.workspace
    document["model"]["path"] = model_path
    region = config.grid.region.geojson
    if isinstance(region, str):
        document["grid"]["region"]["geojson"] = json.loads(config.resolve(region).read_text())
    header = (
        f"# Pipeline {config.name!r} as the deployed images see it; rendered by `terrabeam deploy gcp`\n"
        f"# from {config.source_path or 'a config'}. Edit that file and render again, not this one.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _pip_install(source: str, extras: tuple[str, ...]) -> str:
    """terrabeam with the versions pinned in its constraints.txt (the ones the tests ran with)."""
    return f'RUN pip install --no-cache-dir -c {source}/constraints.txt "{source}[{",".join(extras)}]"'


def render_predict_dockerfile(target: GcpTarget) -> str:
    """One image as Flex Template launcher and as Dataflow worker (sdkContainerImage): Beam's SDK
    image, with the launcher binary copied in from Google's Python launcher base image. The workers
    of the map step read the source bands with GDAL (rasterio's wheel, /vsigs/) and write tiles to
    the gs:// workspace (Beam's GCS file system, the gcp extra)."""
    import apache_beam

    return f"""\
# Dataflow Flex Template launcher and worker image of pipeline {target.name!r}
# (rendered by `terrabeam deploy gcp`; built by cloudbuild.yaml).
FROM {LAUNCHER_BASE}:latest AS launcher

FROM apache/beam_python{PYTHON_VERSION}_sdk:{apache_beam.__version__}
COPY --from=launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
WORKDIR /template
COPY terrabeam /template/terrabeam
{_pip_install("/template/terrabeam", target.predict_extras)}
COPY pipeline /template/pipeline
COPY flex/launcher.py /template/launcher.py
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/launcher.py \\
    {flex_main.CONFIG_ENV}=/template/pipeline/pipeline.yaml \\
    {GDAL_ON_GCE}
# Workers start through Beam's boot program; the Flex Template launcher runs launcher.py.
ENTRYPOINT ["/opt/apache/beam/boot"]
"""


def render_steps_dockerfile(target: GcpTarget) -> str:
    return f"""\
# Cloud Run image of pipeline {target.name!r}: the export and deliver steps over HTTP
# (rendered by `terrabeam deploy gcp`; built by cloudbuild.yaml). Cloud Run sets $PORT; the server
# listens on it, on all interfaces. The workspace is the config's gs:// URI, reached through the
# Cloud Storage API; a local mirror of what a step reads and writes lives under $TERRABEAM_CACHE.
FROM python:{PYTHON_VERSION}-slim
WORKDIR /app
COPY terrabeam /app/terrabeam
{_pip_install("/app/terrabeam", target.steps_extras)}
COPY pipeline/pipeline.yaml /app/pipeline/pipeline.yaml
ENV PYTHONUNBUFFERED=1 {GDAL_ON_GCE}
CMD ["python", "-m", "terrabeam.deploy.step_server", "--config", "/app/pipeline/pipeline.yaml", "--host", "0.0.0.0"]
"""


def _images(target: GcpTarget) -> dict[str, str]:
    """Dockerfile stem → image: the Dataflow image, and the Cloud Run one if a step runs there."""
    images = {"predict": target.predict_image}
    return images | ({"steps": target.steps_image} if target.service_steps else {})


def render_cloudbuild(target: GcpTarget) -> str:
    """The images, built side by side."""
    images = _images(target)
    document = {
        "steps": [
            {
                "id": name,
                "name": "gcr.io/cloud-builders/docker",
                "args": ["build", "-f", f"{name}.Dockerfile", "-t", image, "."],
                "waitFor": ["-"],
            }
            for name, image in images.items()
        ],
        "images": list(images.values()),
        "timeout": "3600s",
    }
    header = f"# Cloud Build: the images of pipeline {target.name!r} (rendered by `terrabeam deploy gcp`).\n"
    return header + yaml.safe_dump(document, sort_keys=False)


def flex_metadata(target: GcpTarget) -> dict[str, Any]:
    """metadata.json of the Flex Template, from the parameters the launcher reads."""
    parameters = []
    for name, (label, text, optional, regex) in flex_main.PARAMETERS.items():
        parameter: dict[str, Any] = {"name": name, "label": label, "helpText": text, "isOptional": optional}
        if regex:
            parameter["regexes"] = [regex]
        parameters.append(parameter)
    what = {
        "map": "raster windows read by the workers, the model, map tiles and the mosaic (VRT, COG, "
        "quicklook) into <workspace>/<run>/deliver",
        "predict": "the model over one run's export, prediction shards into <workspace>/<run>/predict",
    }
    return {
        "name": f"{target.slug}-{target.template_step}",
        "description": f"terrabeam {target.template_step} step of pipeline {target.name!r}: "
        f"{what[target.template_step]}.",
        "streaming": False,
        "parameters": parameters,
    }


LAUNCHER = '''\
"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE): terrabeam's Dataflow step (map or
predict) of one run."""

import sys

from terrabeam.deploy.flex_main import main

if __name__ == "__main__":
    sys.exit(main())
'''


def _executions_uri(target: GcpTarget) -> str:
    return (
        f"https://workflowexecutions.googleapis.com/v1/projects/{target.project}/locations/{target.region}"
        f"/workflows/{target.workflow}/executions"
    )


# Cloud Scheduler posts this to the Workflows executions API: no arguments, the run id is the
# execution id.
SCHEDULER_BODY = json.dumps({"argument": "{}"})


def scheduler_job(target: GcpTarget) -> dict[str, Any]:
    """The Cloud Scheduler Job resource (REST form) deploy.sh creates: the workflow on schedule.cron."""
    return {
        "name": f"projects/{target.project}/locations/{target.region}/jobs/{target.scheduler_job}",
        "schedule": target.cron,
        "timeZone": TIME_ZONE,
        "httpTarget": {
            "uri": _executions_uri(target),
            "httpMethod": "POST",
            "headers": {"Content-Type": "application/json"},
            "body": base64.b64encode(SCHEDULER_BODY.encode()).decode(),
            "oauthToken": {
                "serviceAccountEmail": target.service_account,
                "scope": "https://www.googleapis.com/auth/cloud-platform",
            },
        },
    }


def _grant_command(scope: str, role: str) -> str:
    member = '--member="serviceAccount:$SERVICE_ACCOUNT"'
    commands = {
        "project": f'gcloud projects add-iam-policy-binding "$PROJECT" {member} --role={role} --condition=None',
        "repository": (
            f'gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" --location="$REGION" '
            f'--project="$PROJECT" {member} --role={role}'
        ),
        "service_account": (
            f'gcloud iam service-accounts add-iam-policy-binding "$SERVICE_ACCOUNT" --project="$PROJECT" '
            f"{member} --role={role}"
        ),
        "service": (
            f'gcloud run services add-iam-policy-binding "$SERVICE" --region="$REGION" --project="$PROJECT" '
            f"{member} --role={role}"
        ),
    }
    if scope in ("bucket", "source_bucket"):
        array = "BUCKETS" if scope == "bucket" else "SOURCE_BUCKETS"
        return (
            f'for bucket in "${{{array}[@]}}"; do\n'
            f'  gcloud storage buckets add-iam-policy-binding "gs://$bucket" {member} --role={role} >/dev/null\n'
            "done"
        )
    return f"{commands[scope]} >/dev/null"


def render_deploy_script(target: GcpTarget, config: PipelineConfig) -> str:
    q = shlex.quote
    roles = grants(target)
    grants_now = "\n".join(
        f"# {g.role}: {g.reason}\n{_grant_command(g.scope, g.role)}" for g in roles if g.scope != "service"
    )
    grants_service = "\n".join(
        f"# {g.role}: {g.reason}\n{_grant_command(g.scope, g.role)}" for g in roles if g.scope == "service"
    )
    account_id = target.service_account.split("@", 1)[0]
    if target.creates_service_account:
        account = f"""\
if ! gcloud iam service-accounts describe "$SERVICE_ACCOUNT" --project="$PROJECT" >/dev/null 2>&1; then
  gcloud iam service-accounts create {q(account_id)} --project="$PROJECT" \\
    --display-name={q(f"terrabeam {target.name}")}
fi"""
    else:
        account = """\
gcloud iam service-accounts describe "$SERVICE_ACCOUNT" --project="$PROJECT" >/dev/null \\
  || { echo "deploy.sh: service account $SERVICE_ACCOUNT not found; create it first" >&2; exit 1; }"""
    if target.cron:
        schedule = f"""\
step "Cloud Scheduler job $SCHEDULER_JOB: '$CRON' ($TIME_ZONE)"
schedule_flags=(--location="$REGION" --project="$PROJECT" --schedule="$CRON" --time-zone="$TIME_ZONE"
  --uri={q(_executions_uri(target))} --http-method=POST
  --message-body={q(SCHEDULER_BODY)}
  --oauth-service-account-email="$SERVICE_ACCOUNT")
if gcloud scheduler jobs describe "$SCHEDULER_JOB" --location="$REGION" --project="$PROJECT" >/dev/null 2>&1; then
  gcloud scheduler jobs update http "$SCHEDULER_JOB" "${{schedule_flags[@]}}" \\
    --update-headers=Content-Type=application/json
else
  gcloud scheduler jobs create http "$SCHEDULER_JOB" "${{schedule_flags[@]}}" \\
    --headers=Content-Type=application/json
fi"""
    else:
        schedule = 'step "no schedule: section in the config, so no Cloud Scheduler job"'
    if target.service_steps:
        served = " and ".join(target.service_steps)
        service = f"""\
step "Cloud Run service $SERVICE ({served})"
gcloud run deploy "$SERVICE" --image="$STEPS_IMAGE" --region="$REGION" --project="$PROJECT" \\
  --service-account="$SERVICE_ACCOUNT" --no-allow-unauthenticated --execution-environment=gen2 \\
  --memory={q(target.memory)} --cpu={target.cpu} --concurrency=4 --timeout={REQUEST_TIMEOUT_SECONDS} \\
  --min-instances=0 --max-instances=4
{grants_service}
STEPS_URL="$(gcloud run services describe "$SERVICE" --region="$REGION" --project="$PROJECT" \\
  --format='value(status.url)')"
"""
        workflow_env = ' \\\n  --set-env-vars="STEPS_URL=$STEPS_URL"'
    else:
        service = f'step "no Cloud Run service: the {target.template_step} step runs whole on Dataflow"\n'
        workflow_env = ""
    images = " ".join(f"${name.upper()}_IMAGE" for name in _images(target))
    variables = {
        "PROJECT": target.project,
        "REGION": target.region,
        "SERVICE_ACCOUNT": target.service_account,
        "REPOSITORY": target.repository,
        "PREDICT_IMAGE": target.predict_image,
        "TEMPLATE": target.template_path,
        "WORKFLOW": target.workflow,
    }
    if target.service_steps:
        variables |= {"STEPS_IMAGE": target.steps_image, "SERVICE": target.service}
    if target.cron:
        variables |= {"SCHEDULER_JOB": target.scheduler_job, "CRON": target.cron, "TIME_ZONE": TIME_ZONE}
    assignments = "\n".join(f"{name}={q(value)}" for name, value in variables.items())
    buckets = " ".join(q(b) for b in target.buckets)
    source_buckets = ""
    if target.read_buckets:
        listed = " ".join(q(b) for b in target.read_buckets)
        source_buckets = f"# read only (the source bands), never created here\nSOURCE_BUCKETS=({listed})\n"
    return f"""\
#!/usr/bin/env bash
# Deploy pipeline {target.name!r} to Google Cloud (rendered by `terrabeam deploy gcp` from
# {config.source_path or "a config"}). Every value below comes from that config; re-render after changing it.
#
# Needs gcloud, signed in as someone who may enable APIs, create service accounts, grant roles and
# act as the service account. Safe to run again: what exists is kept or updated.
# Nothing secret is written: every service runs as the service account, without keys.
set -euo pipefail
cd "$(dirname "$0")"

{assignments}
BUCKETS=({buckets})
{source_buckets}
step() {{ printf '\\n==> %s\\n' "$*"; }}

step "enabling APIs"
gcloud services enable {" ".join(apis(target))} --project="$PROJECT"

step "service account $SERVICE_ACCOUNT"
{account}

step "buckets: ${{BUCKETS[*]}}"
for bucket in "${{BUCKETS[@]}}"; do
  if ! gcloud storage buckets describe "gs://$bucket" --project="$PROJECT" >/dev/null 2>&1; then
    gcloud storage buckets create "gs://$bucket" --project="$PROJECT" --location="$REGION" \\
      --uniform-bucket-level-access
  fi
done

step "Artifact Registry repository $REPOSITORY"
if ! gcloud artifacts repositories describe "$REPOSITORY" --location="$REGION" --project="$PROJECT" \\
  >/dev/null 2>&1; then
  gcloud artifacts repositories create "$REPOSITORY" --repository-format=docker --location="$REGION" \\
    --project="$PROJECT"
fi

step "roles of the service account (see service-account.txt)"
{grants_now}

step "images (Cloud Build): {images}"
gcloud builds submit . --config=cloudbuild.yaml --project="$PROJECT"

step "Dataflow Flex Template $TEMPLATE"
gcloud dataflow flex-template build "$TEMPLATE" --image="$PREDICT_IMAGE" --sdk-language=PYTHON \\
  --metadata-file=flex/metadata.json --project="$PROJECT"

{service}
step "workflow $WORKFLOW"
gcloud workflows deploy "$WORKFLOW" --source=workflow.yaml --location="$REGION" --project="$PROJECT" \\
  --service-account="$SERVICE_ACCOUNT"{workflow_env}

{schedule}

step "done"
echo "run once now: gcloud workflows run $WORKFLOW --location=$REGION --project=$PROJECT"
"""
