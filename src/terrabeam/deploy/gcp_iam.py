"""The one service account a deployed pipeline runs as, and the roles it needs, each with its reason
and the narrowest scope gcloud can grant it on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from terrabeam.deploy.gcp_target import GcpTarget

Scope = Literal["project", "bucket", "source_bucket", "repository", "service_account", "service"]


@dataclass(frozen=True)
class Grant:
    role: str
    scope: Scope
    reason: str


def runs_as(target: GcpTarget) -> str:
    """Who runs as the account, for people reading service-account.txt."""
    services = ["Dataflow launcher and workers", "the workflow"]
    services += ["Cloud Run"] if target.service_steps else []
    services += ["Cloud Scheduler"] if target.cron else []
    return ", ".join(services[:-1]) + " and " + services[-1]


def grants(target: GcpTarget) -> list[Grant]:
    """Roles of ``target.service_account``: everything deployed runs as it (see runs_as). Nothing
    broader than the job needs (no Owner, Editor or storage.admin)."""
    found = [
        Grant("roles/dataflow.worker", "project", "Dataflow launcher and worker VMs run as the account"),
        Grant(
            "roles/dataflow.developer", "project", "the workflow launches the Flex Template, reads job state"
        ),
        Grant(
            "roles/storage.objectAdmin",
            "bucket",
            "run step folders, _COMPLETE.json markers and step status (written, replaced, deleted), "
            "Dataflow temp/staging files, the template spec",
        ),
        Grant("roles/artifactregistry.reader", "repository", "launcher and workers pull the predict image"),
        Grant("roles/iam.serviceAccountUser", "service_account", "the Dataflow job it launches runs as it"),
    ]
    if target.read_buckets:
        readers = (
            "the map step's launcher and workers" if target.template_step == "map" else "the export step"
        )
        found.append(
            Grant(
                "roles/storage.objectViewer",
                "source_bucket",
                f"{readers} read the source bands through GDAL's /vsigs/",
            )
        )
    if target.service_steps:
        found.append(
            Grant(
                "roles/run.invoker",
                "service",
                f"the workflow calls the {' and '.join(target.service_steps)} service",
            )
        )
    if target.cron:
        found.append(Grant("roles/workflows.invoker", "project", "Cloud Scheduler starts the workflow as it"))
    if target.earth_engine:
        found += [
            Grant("roles/earthengine.writer", "project", "Earth Engine exports and asset ingestion"),
            Grant(
                "roles/serviceusage.serviceUsageConsumer",
                "project",
                "Earth Engine API calls are billed to the project",
            ),
        ]
    return found


def apis(target: GcpTarget) -> list[str]:
    """Google Cloud APIs the deployment uses."""
    found = [
        "artifactregistry.googleapis.com",
        "cloudbuild.googleapis.com",
        "compute.googleapis.com",
        "dataflow.googleapis.com",
        "iam.googleapis.com",
        "storage.googleapis.com",
        "workflowexecutions.googleapis.com",
        "workflows.googleapis.com",
    ]
    if target.service_steps:
        found.append("run.googleapis.com")
    if target.cron:
        found.append("cloudscheduler.googleapis.com")
    if target.earth_engine:
        found.append("earthengine.googleapis.com")
    return sorted(found)


def describe(target: GcpTarget) -> str:
    """A plain-text table of the account's roles, for people reviewing the deployment."""
    lines = [
        f"Service account: {target.service_account}",
        f"({runs_as(target)} run as it)",
        "",
        f"{'role':<42} {'granted on':<16} why",
    ]
    lines += [f"{g.role:<42} {g.scope:<16} {g.reason}" for g in grants(target)]
    lines += ["", "APIs enabled: " + ", ".join(apis(target))]
    return "\n".join(lines) + "\n"
