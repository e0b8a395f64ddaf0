"""`terrabeam plan` against the run it plans: predicted vs measured seconds and patches, on the demo
scene (its own JPEG2000 bands) and on tiled copies of it, one invocation, this machine.

    python -m benchmarks.plan [--scales 1 64] [--work DIR]

Scale 1 is the demo config itself; N > 1 is the scene tiled N times (benchmarks/scenes.py), as in
`make bench`. Measured = the run's own summary (seconds.total, validate included); the plan and the
run are separate processes, one after the other. Target: patches exact, time within a factor of 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.scenes import DEMO_CONFIG, DEMO_DATA, scene_config, tiled_scene


def demo_config(path: Path, workspace: Path) -> Path:
    """The demo config with absolute data paths and its own workspace."""
    document = yaml.safe_load(DEMO_CONFIG.read_text().replace("../data/demo", str(DEMO_DATA)))
    document["workspace"] = str(workspace)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def plan_and_run(config: Path, workspace: Path) -> tuple[dict, dict]:
    """(the plan's JSON document, the run's summary), each from its own `terrabeam` process."""
    planned = subprocess.run(
        [sys.executable, "-m", "terrabeam", "plan", str(config), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(workspace, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "terrabeam", "-q", "run", str(config), "--run", "r"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(planned.stdout), json.loads((workspace / "r" / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 64], help="1: the demo; square numbers")
    parser.add_argument(
        "--work", type=Path, help="folder for scenes and workspaces (default: a new temp folder)"
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="terrabeam-plan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in args.scales:
        workspace = work / f"ws-x{scale}"
        if scale == 1:
            config = demo_config(work / "demo.yaml", workspace)
        else:
            config = scene_config(
                work / f"unet-x{scale}.yaml", tiled_scene(work / f"scene-x{scale}", scale), workspace
            )
        plan, summary = plan_and_run(config, workspace)
        measured = summary["seconds"]["total"]
        rows.append(
            f"| {'demo' if scale == 1 else f'{scale}×'} | {plan['patches']} | {summary['patches']} | "
            f"{plan['seconds']:.2f} | {measured:.2f} | {plan['seconds'] / measured:.2f} | "
            f"{plan['calibration']['patches']} |"
        )
        exact = plan["patches"] == summary["patches"]
        within = 0.5 <= plan["seconds"] / measured <= 2
        print(
            f"{scale}x: patches planned {plan['patches']} / run {summary['patches']} "
            f"({'exact' if exact else 'DIFFER'}); seconds planned {plan['seconds']:.2f} / run "
            f"{measured:.2f}, ratio {plan['seconds'] / measured:.2f} ({'within 2x' if within else 'OUTSIDE 2x'})",
            file=sys.stderr,
        )
    print(
        "| scene | planned patches | run patches | planned s | run s | planned / run | calibration patches |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
