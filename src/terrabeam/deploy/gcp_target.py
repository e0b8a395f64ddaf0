"""Where and how a pipeline runs on Google Cloud, read from its config: project, region, buckets,
images, service account and names, checked once so every rendered file agrees."""

from __future__ import annotations

import re
from dataclasses import dataclass

from terrabeam.config import PipelineConfig
from terrabeam.deploy.flex_main import template_step
from terrabeam.errors import ConfigError
from terrabeam.sources.earthengine_pixels import uses_compute_pixels
from terrabeam.workflow.steps import run_steps

# schedule.cron is UTC for `terrabeam schedule`; Cloud Scheduler keeps the same meaning.
TIME_ZONE = "Etc/UTC"
# Paths GDAL reads inside a container: its cloud and HTTP virtual file systems.
_REMOTE_PATH = re.compile(r"^(/vsi[a-z0-9_]+/|https?://)")
_GCS_PATH = re.compile(r"^/vsigs(?:_streaming)?/([^/]+)/")
_FRAMEWORK_EXTRAS = {
    "tensorflow": "tensorflow",
    "torch": "torch",
    "sklearn": "sklearn",
    "lightgbm": "lightgbm",
}


def _slug(name: str) -> str:
    """A pipeline name as a Google Cloud resource name: lower case, digits, hyphens, a letter first."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not slug[:1].isalpha():
        slug = f"tb-{slug}".rstrip("-")
    return slug[:40].rstrip("-")


def _bucket(uri: str) -> str:
    return uri.removeprefix("gs://").split("/", 1)[0]


def uses_earth_engine(config: PipelineConfig) -> bool:
    """An Earth Engine source, sink or section (added by issue #6) needs its extra and IAM roles."""
    return getattr(config, "earthengine", None) is not None or config.source.kind == "earthengine"


@dataclass(frozen=True)
class GcpTarget:
    """Every value the rendered files use; nothing else is read from the config."""

    name: str
    slug: str
    project: str
    region: str
    service_account: str
    temp_location: str
    staging_location: str
    machine_type: str | None
    max_workers: int | None
    workspace: str
    repository: str
    service: str
    workflow: str
    memory: str
    cpu: int
    cron: str | None
    image_tag: str
    predict_extras: tuple[str, ...]
    steps_extras: tuple[str, ...]
    earth_engine: bool
    steps: tuple[str, ...]  # the run's steps in order, as `terrabeam run` runs them
    template_step: str  # the one on Dataflow: map (raster source) or predict (Earth Engine)
    source_buckets: tuple[str, ...]  # Cloud Storage buckets of the source bands (/vsigs/BUCKET/…)

    @classmethod
    def from_config(cls, config: PipelineConfig) -> GcpTarget:
        """Raise one ConfigError naming every missing or unusable field."""
        runner = config.runner
        gcp = config.deploy.gcp if config.deploy else None
        problems = []
        if runner.kind != "dataflow":
            problems.append(
                f"runner.kind: dataflow (now {runner.kind!r}) with runner.project, runner.region, "
                "runner.temp_location"
            )
        if runner.service_account is None:
            problems.append("runner.service_account (the email every cloud step runs as)")
        if gcp is None:
            problems.append("deploy.gcp.workspace (a gs:// folder for the runs)")
        for field in ("temp_location", "staging_location"):
            value = getattr(runner, field)
            if value is not None and not value.startswith("gs://"):
                problems.append(f"runner.{field} as a gs:// folder (now {value!r})")
        if config.source.kind == "earthengine" and config.source.window is None:
            problems.append(
                "source.window (the deployed workflow starts runs without a window of their own): "
                "dates, or months_before / days_before counted back from each run's date"
            )
        if runner.max_workers is None and uses_compute_pixels(config):
            problems.append("runner.max_workers (the workers share the computePixels request limits)")
        if config.source.kind == "raster":
            for band, spec in config.source.bands.items():
                if not _REMOTE_PATH.match(spec.path):
                    problems.append(
                        f"source.bands.{band}.path readable in the cloud, e.g. /vsigs/BUCKET/… "
                        f"(now the local file {spec.path!r})"
                    )
        if problems:
            where = config.source_path or "config"
            raise ConfigError(f"{where}: `terrabeam deploy gcp` needs {'; '.join(problems)}")
        assert gcp is not None and runner.project and runner.region and runner.temp_location
        assert runner.service_account
        slug = _slug(config.name)
        earth_engine = uses_earth_engine(config)
        framework = _FRAMEWORK_EXTRAS.get(config.model.framework)
        bands = config.source.bands.values() if config.source.kind == "raster" else []
        source_buckets = [m.group(1) for band in bands if (m := _GCS_PATH.match(band.path))]
        return cls(
            name=config.name,
            slug=slug,
            project=runner.project,
            region=runner.region,
            service_account=runner.service_account,
            temp_location=runner.temp_location.rstrip("/"),
            staging_location=(runner.staging_location or runner.temp_location).rstrip("/"),
            machine_type=runner.machine_type,
            max_workers=runner.max_workers,
            workspace=gcp.workspace.rstrip("/"),
            repository=gcp.repository,
            service=gcp.service or f"{slug}-steps",
            workflow=gcp.workflow or slug,
            memory=gcp.memory,
            cpu=gcp.cpu,
            cron=config.schedule.cron if config.schedule else None,
            image_tag=f"config-{config.fingerprint()}",
            predict_extras=("gcp", framework) if framework else ("gcp",),
            steps_extras=("gcp", "earthengine") if earth_engine else ("gcp",),
            earth_engine=earth_engine,
            steps=tuple(run_steps(config)),
            template_step=template_step(config),
            source_buckets=tuple(dict.fromkeys(source_buckets)),
        )

    @property
    def registry(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}"

    @property
    def predict_image(self) -> str:
        """Flex Template launcher and Dataflow worker image (one image, so workers match the launcher)."""
        return f"{self.registry}/{self.slug}-predict:{self.image_tag}"

    @property
    def steps_image(self) -> str:
        """The Cloud Run image serving the export and deliver steps."""
        return f"{self.registry}/{self.slug}-steps:{self.image_tag}"

    @property
    def template_path(self) -> str:
        return f"{self.workspace}/.deploy/{self.slug}-{self.template_step}.json"

    @property
    def scheduler_job(self) -> str:
        return f"{self.slug}-schedule"

    @property
    def buckets(self) -> list[str]:
        """Buckets the service account writes: workspace, temp and staging (each once)."""
        found = [_bucket(u) for u in (self.workspace, self.temp_location, self.staging_location)]
        return list(dict.fromkeys(found))

    @property
    def service_steps(self) -> tuple[str, ...]:
        """The steps on Cloud Run (the step server): export and deliver; none for the map step."""
        return tuple(step for step in self.steps if step != self.template_step)

    @property
    def read_buckets(self) -> list[str]:
        """Buckets of the source bands the account only reads (those it writes are in ``buckets``)."""
        return [b for b in self.source_buckets if b not in self.buckets]

    @property
    def creates_service_account(self) -> bool:
        """A service account of the project itself is created by deploy.sh; any other must exist."""
        return self.service_account.endswith(f"@{self.project}.iam.gserviceaccount.com")

    @property
    def job_name_prefix(self) -> str:
        return f"{self.slug}-{self.template_step}"
