"""The Dataflow Flex Template launcher's entry point: run the Dataflow step of one run, the one
``terrabeam run`` would run on Beam: ``map`` for a raster source with file outputs (the workers read
the rasters, run the model and write map tiles; here the grid is planned and the mosaic made),
``predict`` when Earth Engine is the source or sink (export and deliver are the step server's).

    python -m terrabeam.deploy.flex_main --workspace gs://BUCKET/ROOT --run ID [--config FILE] [beam options…]

The parameters are the ones metadata.json declares (PARAMETERS); every other option (the ones the
Dataflow launcher adds: --runner, --project, --region, --temp_location, …) goes to Beam after the
config's runner flags, so it wins. The workspace is a gs:// (or s3://) URI, mirrored locally as
every command does (terrabeam.workspace), or a local folder; any runner works, e.g. FnApiRunner.
The step is claimed and its status recorded in ``<run>/.status/<step>.json`` as the step server
does, so a run's record in the workspace names its steps whichever service ran them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

from terrabeam.config import PipelineConfig, load_config
from terrabeam.deploy.step_server import RUN_ID_PATTERN, StepService
from terrabeam.errors import WorkspaceError
from terrabeam.process_memory import limit_malloc_arenas
from terrabeam.workflow import steps, tasks
from terrabeam.workspace import Workspace, resolve_root

# The image bakes the pipeline config in here (see the rendered predict.Dockerfile).
CONFIG_ENV = "TERRABEAM_CONFIG"
# The steps that run on Dataflow (one per run); the others run on the step server (Cloud Run).
TEMPLATE_STEPS = ("map", "predict")
WORKSPACE_PATTERN = r"^((gs|s3)://[a-z0-9][a-z0-9._-]+[a-z0-9](/.*)?|/.+)$"

# name → (label, help text, optional, regex); metadata.json is rendered from this, and the parser below
# reads exactly these, so the two cannot drift apart.
PARAMETERS: dict[str, tuple[str, str, bool, str | None]] = {
    "workspace": (
        "Workspace root",
        "gs:// folder holding the runs. Raster source: the map step writes <workspace>/<run>/deliver "
        "(map tiles, mosaic); Earth Engine source or sink: predict reads <run>/export, writes <run>/predict.",
        False,
        WORKSPACE_PATTERN,
    ),
    "run": (
        "Run id",
        "The run to do the step of (a folder in the workspace; a raster source's run starts here).",
        False,
        RUN_ID_PATTERN,
    ),
    "config": (
        "Pipeline config",
        f"Pipeline YAML file inside the image (default: the one baked in, ${CONFIG_ENV}).",
        True,
        None,
    ),
}


def template_step(config: PipelineConfig) -> str:
    """The step of ``config``'s run that the Flex Template runs: of the steps ``terrabeam run`` would
    run (steps.run_steps), the one on Beam workers."""
    (step,) = (name for name in steps.run_steps(config) if name in TEMPLATE_STEPS)
    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m terrabeam.deploy.flex_main",
        description="Run the Dataflow step of one run: map (raster source) or predict (Earth Engine).",
    )
    for name, (_, text, optional, _) in PARAMETERS.items():
        parser.add_argument(f"--{name}", required=not optional, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()  # as the CLI does: before any pipeline or GDAL thread starts
    args, beam_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for name in ("workspace", "run"):
            if not re.fullmatch(PARAMETERS[name][3] or "", getattr(args, name)):
                raise WorkspaceError(f"--{name} {getattr(args, name)!r} must match {PARAMETERS[name][3]}")
        config_path = args.config or os.environ.get(CONFIG_ENV)
        if not config_path:
            raise WorkspaceError(f"no pipeline config: give --config or set ${CONFIG_ENV}")
        config = load_config(config_path)
        step = template_step(config)
        root, remote = resolve_root(args.workspace)

        def run(config: PipelineConfig, workspace: Workspace) -> steps.StepReport:
            steps.validate_before_run(config, beam_args)  # as `terrabeam run` does before its first step
            task = tasks.task_for(step, config, workspace, beam_args, tasks.RunContext(workspace.run_id))
            return tasks.start_and_poll(task)

        code, record = StepService(config, root, remote, {step: run}).start(step, args.run)
    except Exception as exc:  # the launcher's log shows this one line as the job's error
        print(f"terrabeam: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    if record["status"] != "done":
        error = record.get("error") or f"attempt {record.get('attempt')} is running elsewhere (HTTP {code})"
        print(f"terrabeam: error: step {step} of run {args.run}: {error}".splitlines()[0], file=sys.stderr)
        return 1
    location = Workspace(root, args.run, remote).step_location(step)
    print(
        json.dumps(
            {"run": args.run, "step": step, "seconds": record["seconds"], "location": location}
            | record["details"]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
