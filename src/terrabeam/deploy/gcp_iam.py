"""The one service account a deployed pipeline runs as, and the roles it needs, each with its reason
and the narrowest scope gcloud can grant it on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from terrabeam.deploy.gcp_target import GcpTarget

Scope = Literal["project", "bucket", "repository", "service_account", "service"]


@dataclass(frozen=True)
class Grant:
    role: str
    scope: Scope
    reason: str


def grants(target: GcpTarget) -> list[Grant]:
    """Roles of ``target.service_account``: Dataflow launcher and workers, the workflow, Cloud Run and
    Cloud Scheduler all run as it. Nothing broader than the job needs (no Owner, Editor or storage.admin)."""
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
        Grant("roles/run.invoker", "service", "the workflow calls the export and deliver service"),
    ]
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
        "run.googleapis.com",
        "storage.googleapis.com",
        "workflowexecutions.googleapis.com",
        "workflows.googleapis.com",
    ]
    if target.cron:
        found.append("cloudscheduler.googleapis.com")
    if target.earth_engine:
        found.append("earthengine.googleapis.com")
    return sorted(found)


def describe(target: GcpTarget) -> str:
    """A plain-text table of the account's roles, for people reviewing the deployment."""
    lines = [
        f"Service account: {target.service_account}",
        "(Dataflow launcher and workers, the workflow, Cloud Run and Cloud Scheduler all run as it)",
        "",
        f"{'role':<42} {'granted on':<16} why",
    ]
    lines += [f"{g.role:<42} {g.scope:<16} {g.reason}" for g in grants(target)]
    lines += ["", "APIs enabled: " + ", ".join(apis(target))]
    return "\n".join(lines) + "\n"
