"""The Google Cloud Workflows definition of a run, the steps `terrabeam run` would run: for a raster
source with file outputs the map step alone (Dataflow Flex Template); with Earth Engine export
(Cloud Run) → predict (Dataflow) → deliver (Cloud Run). Each step is started and then polled until it
ends; transient HTTP errors are retried with exponential backoff, and a failed step raises its error.

Built as data and dumped as YAML, so quoting is never hand-written. The Cloud Run URL is only known
after the service is deployed: deploy.sh passes it as the workflow environment variable STEPS_URL.
"""

from __future__ import annotations

from typing import Any

import yaml

from terrabeam.config import WorkflowConfig
from terrabeam.deploy.gcp_target import GcpTarget

# Workflows caps an HTTP call at 1800 s; a longer step is polled until its status file says it ended.
HTTP_TIMEOUT_SECONDS = 1800
POLL_SECONDS = 60
# A step still "running" after this many polls is given up on (the Cloud Run request limit is 1 h).
MAX_STEP_POLLS = 90


def _retry(workflow: WorkflowConfig) -> dict[str, Any]:
    return {
        "predicate": "${transient}",
        "max_retries": max(workflow.retries - 1, 0),
        "backoff": {
            "initial_delay": max(int(workflow.backoff_seconds), 1),
            "max_delay": max(int(workflow.max_backoff_seconds), 1),
            "multiplier": 2,
        },
    }


def _fail(step: str) -> dict[str, Any]:
    return {"raise": {"step": step, "run": "${run}", "error": "${e}"}}


def _dataflow_step(target: GcpTarget, workflow: WorkflowConfig, then: str) -> list[dict[str, Any]]:
    """Launch the Flex Template (the run's step on Dataflow), poll the job until it ends; ``then``
    is the step after a job that is done."""
    step = target.template_step
    environment: dict[str, Any] = {
        "serviceAccountEmail": target.service_account,
        "tempLocation": target.temp_location,
        "stagingLocation": target.staging_location,
        "sdkContainerImage": target.predict_image,
    }
    if target.machine_type:
        environment["machineType"] = target.machine_type
    if target.max_workers:
        environment["maxWorkers"] = target.max_workers
    return [
        {
            f"launch_{step}": {
                "try": {
                    "call": "http.post",
                    "args": {
                        "url": '${dataflow_api + "/flexTemplates:launch"}',
                        "auth": {"type": "OAuth2"},
                        "body": {
                            "launchParameter": {
                                "jobName": "${job_name}",
                                "containerSpecGcsPath": "${template}",
                                "parameters": {"workspace": "${workspace}", "run": "${run}"},
                                "environment": environment,
                            }
                        },
                    },
                    "result": "launch",
                },
                "retry": _retry(workflow),
                "except": {"as": "e", "steps": [{"launch_failed": _fail(step)}]},
            }
        },
        {
            f"poll_{step}": {
                "try": {
                    "call": "http.get",
                    "args": {
                        "url": '${dataflow_api + "/jobs/" + launch.body.job.id}',
                        "auth": {"type": "OAuth2"},
                    },
                    "result": "job",
                },
                "retry": _retry(workflow),
                "except": {"as": "e", "steps": [{"poll_failed": _fail(step)}]},
            }
        },
        {
            f"check_{step}": {
                "switch": [
                    {"condition": '${job.body.currentState == "JOB_STATE_DONE"}', "next": then},
                    {
                        "condition": (
                            '${job.body.currentState == "JOB_STATE_FAILED" or '
                            'job.body.currentState == "JOB_STATE_CANCELLED" or '
                            'job.body.currentState == "JOB_STATE_DRAINED"}'
                        ),
                        "raise": {
                            "step": step,
                            "run": "${run}",
                            "job": "${launch.body.job.id}",
                            "error": '${"Dataflow job ended in " + job.body.currentState + "; see its logs"}',
                        },
                    },
                ]
            }
        },
        {
            f"wait_{step}": {
                "call": "sys.sleep",
                "args": {"seconds": POLL_SECONDS},
                "next": f"poll_{step}",
            }
        },
    ]


def _service_step(step: str) -> dict[str, Any]:
    """A step of the Cloud Run step server, started and polled by the run_step subworkflow."""
    return {
        step: {
            "call": "run_step",
            "args": {"step": step, "run": "${run}", "url": "${steps_url}"},
            "result": f"{step}_report",
        }
    }


def _main(target: GcpTarget, workflow: WorkflowConfig) -> dict[str, Any]:
    dataflow = '${"https://dataflow.googleapis.com/v1b3/projects/" + project + "/locations/" + region}'
    variables: list[dict[str, Any]] = [
        {"project": target.project},
        {"region": target.region},
        {"workspace": target.workspace},
        {"template": target.template_path},
    ]
    if target.service_steps:
        variables.append({"steps_url": '${sys.get_env("STEPS_URL")}'})
    variables += [
        {"dataflow_api": dataflow},
        {"input": {}},
        {"run": '${sys.get_env("GOOGLE_CLOUD_WORKFLOW_EXECUTION_ID")}'},
    ]
    run_steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"run": "${run}", "workspace": "${workspace}"}
    for position, step in enumerate(target.steps):
        if step == target.template_step:
            then = target.steps[position + 1] if position + 1 < len(target.steps) else "done"
            run_steps += _dataflow_step(target, workflow, then)
            result[f"{step}_job"] = "${launch.body.job.id}"
        else:
            run_steps.append(_service_step(step))
            result[step] = f"${{{step}_report}}"
    return {
        "params": ["args"],
        "steps": [
            {"init": {"assign": variables}},
            {
                "read_args": {
                    "switch": [
                        {
                            "condition": "${args != null}",
                            "steps": [{"take_args": {"assign": [{"input": "${args}"}]}}],
                        }
                    ]
                }
            },
            {
                "read_run": {
                    "switch": [
                        {
                            "condition": '${"run" in input}',
                            "steps": [{"take_run": {"assign": [{"run": "${input.run}"}]}}],
                        }
                    ]
                }
            },
            {
                "name_job": {
                    "assign": [
                        {
                            "job_name": (
                                f'${{"{target.job_name_prefix}-" + '
                                'text.replace_all_regex(text.to_lower(run), "[^a-z0-9-]", "-")}'
                            )
                        }
                    ]
                }
            },
            *run_steps,
            {"done": {"return": result}},
        ],
    }


def _run_step(workflow: WorkflowConfig) -> dict[str, Any]:
    """POST starts the step (and usually finishes it); on a timeout or 202, GET polls its status."""
    status_url = '${url + "/steps/" + step + "?run=" + text.url_encode(run)}'
    return {
        "params": ["step", "run", "url"],
        "steps": [
            {"init_polls": {"assign": [{"polls": 0}]}},
            {
                "start": {
                    "try": {
                        "call": "http.post",
                        "args": {
                            "url": '${url + "/steps/" + step}',
                            "auth": {"type": "OIDC", "audience": "${url}"},
                            "body": {"run": "${run}"},
                            "timeout": HTTP_TIMEOUT_SECONDS,
                        },
                        "result": "response",
                    },
                    "retry": _retry(workflow),
                    "except": {
                        "as": "e",
                        "steps": [
                            {
                                "timed_out": {
                                    "switch": [{"condition": '${"TimeoutError" in e.tags}', "next": "wait"}]
                                }
                            },
                            {"start_failed": _fail("${step}")},
                        ],
                    },
                }
            },
            {
                "started": {
                    "switch": [
                        {"condition": '${response.body.status == "done"}', "return": "${response.body}"}
                    ],
                    "next": "wait",
                }
            },
            {
                "wait": {
                    "call": "sys.sleep",
                    "args": {"seconds": POLL_SECONDS},
                }
            },
            {
                "poll": {
                    "try": {
                        "call": "http.get",
                        "args": {"url": status_url, "auth": {"type": "OIDC", "audience": "${url}"}},
                        "result": "status",
                    },
                    "retry": _retry(workflow),
                    "except": {"as": "e", "steps": [{"poll_failed": _fail("${step}")}]},
                }
            },
            {"count_poll": {"assign": [{"polls": "${polls + 1}"}]}},
            {
                "check": {
                    "switch": [
                        {"condition": '${status.body.status == "done"}', "return": "${status.body}"},
                        {
                            "condition": '${status.body.status == "failed"}',
                            "raise": {"step": "${step}", "run": "${run}", "error": "${status.body.error}"},
                        },
                        {
                            "condition": f"${{polls >= {MAX_STEP_POLLS}}}",
                            "raise": {
                                "step": "${step}",
                                "run": "${run}",
                                "error": f"still running after {MAX_STEP_POLLS} polls of {POLL_SECONDS} s",
                            },
                        },
                    ],
                    "next": "wait",
                }
            },
        ],
    }


def _transient() -> dict[str, Any]:
    """Retry predicate: connection errors and HTTP 429/502/503/504 (not timeouts: those are polled)."""
    return {
        "params": ["e"],
        "steps": [
            {
                "kind": {
                    "switch": [
                        {"condition": '${"ConnectionError" in e.tags}', "return": True},
                        {"condition": '${"HttpError" in e.tags}', "next": "status"},
                    ],
                    "next": "permanent",
                }
            },
            {
                "status": {
                    "switch": [
                        {
                            "condition": "${e.code == 429 or e.code == 502 or e.code == 503 or e.code == 504}",
                            "return": True,
                        }
                    ]
                }
            },
            {"permanent": {"return": False}},
        ],
    }


def workflow_definition(target: GcpTarget, workflow: WorkflowConfig) -> dict[str, Any]:
    """The workflow as data: ``main`` and its subworkflows ``transient`` and, if a step runs on Cloud
    Run, ``run_step``."""
    definition = {"main": _main(target, workflow)}
    if target.service_steps:
        definition["run_step"] = _run_step(workflow)
    return definition | {"transient": _transient()}


def render_workflow(target: GcpTarget, workflow: WorkflowConfig) -> str:
    url = " with STEPS_URL set to the Cloud Run URL" if target.service_steps else ""
    header = (
        f"# Cloud Workflows: one run of pipeline {target.name!r} ({' → '.join(target.steps)}).\n"
        f"# Rendered by `terrabeam deploy gcp`; deploy.sh deploys it{url}.\n"
        '# Run by hand: gcloud workflows run NAME --data=\'{"run": "RUN_ID"}\' (run id optional).\n'
    )
    return header + yaml.safe_dump(
        workflow_definition(target, workflow), sort_keys=False, width=1000, allow_unicode=True
    )
