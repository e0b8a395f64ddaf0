"""The Dataflow Flex Template launcher's entry point: run the predict step of one run.

    python -m terrabeam.deploy.flex_main --workspace gs://BUCKET/ROOT --run ID [--config FILE] [beam options…]

The parameters are the ones metadata.json declares (PARAMETERS); every other option (the ones the
Dataflow launcher adds: --runner, --project, --region, --temp_location, …) goes to Beam after the
config's runner flags, so it wins. The workspace is a gs:// (or s3://) URI, mirrored locally as
every command does (terrabeam.workspace), or a local folder; any runner works, e.g. FnApiRunner.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

from terrabeam.config import load_config
from terrabeam.errors import WorkspaceError
from terrabeam.workflow import steps
from terrabeam.workspace import Workspace, resolve_root

# The image bakes the pipeline config in here (see the rendered predict.Dockerfile).
CONFIG_ENV = "TERRABEAM_CONFIG"
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
WORKSPACE_PATTERN = r"^((gs|s3)://[a-z0-9][a-z0-9._-]+[a-z0-9](/.*)?|/.+)$"

# name → (label, help text, optional, regex); metadata.json is rendered from this, and the parser below
# reads exactly these, so the two cannot drift apart.
PARAMETERS: dict[str, tuple[str, str, bool, str | None]] = {
    "workspace": (
        "Workspace root",
        "gs:// folder holding the runs: <workspace>/<run>/export is read, <run>/predict is written.",
        False,
        WORKSPACE_PATTERN,
    ),
    "run": ("Run id", "The run whose export to predict (a folder in the workspace).", False, RUN_ID_PATTERN),
    "config": (
        "Pipeline config",
        f"Pipeline YAML file inside the image (default: the one baked in, ${CONFIG_ENV}).",
        True,
        None,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m terrabeam.deploy.flex_main", description="Run the predict step of one run."
    )
    for name, (_, text, optional, _) in PARAMETERS.items():
        parser.add_argument(f"--{name}", required=not optional, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
        root, remote = resolve_root(args.workspace)
        workspace = Workspace(root, args.run, remote)
        workspace.ensure_writable()
        report = steps.predict_step(config, workspace, beam_args)
    except Exception as exc:  # the launcher's log shows this one line as the job's error
        print(f"terrabeam: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"run": args.run, "step": report.name, "seconds": round(report.seconds, 3)}
            | {"location": workspace.step_location("predict")}
            | report.details
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
