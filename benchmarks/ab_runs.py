"""The same `terrabeam run` by two checkouts of terrabeam, taking turns: is a change faster or slower?
On a VM whose speed drifts from minute to minute, alternating rounds compare like with like.

    python -m benchmarks.ab_runs CONFIG OLD_SRC NEW_SRC [--rounds 4] [--work DIR]

OLD_SRC / NEW_SRC: the ``src`` folders of two checkouts (``git worktree add /tmp/old <commit>``);
each run has its own workspace under ``--work``. Prints each round's total seconds (validate
included, from the run's summary), the wall seconds (interpreter start and imports included) and the
peak RSS of the run's process tree, and their means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.memory import run_measured


def run_once(config: Path, src: Path, workspace: Path) -> tuple[float, float, int]:
    """(summary seconds, wall seconds, peak RSS bytes of the process tree) of one run."""
    shutil.rmtree(workspace, ignore_errors=True)
    document = yaml.safe_load(config.read_text()) | {"workspace": str(workspace)}
    path = workspace.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    command = [sys.executable, "-m", "terrabeam", "-q", "run", str(path), "--run", "r"]
    wall, peak = run_measured(command, env={**os.environ, "PYTHONPATH": str(src)})
    total = json.loads((workspace / "r" / "summary.json").read_text())["seconds"]["total"]
    return total, wall, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_runs")
    parser.add_argument("config", type=Path)
    parser.add_argument("old", type=Path, help="src folder of the first checkout")
    parser.add_argument("new", type=Path, help="src folder of the second checkout")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="terrabeam-ab-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple[float, float, int]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, src in (("old", args.old), ("new", args.new)):
            results[name].append(run_once(args.config.resolve(), src.resolve(), work / f"ws-{name}"))
    for name, rounds in results.items():
        for label, column, unit, scale in (
            ("run", 0, "s", 1),
            ("wall", 1, "s", 1),
            ("peak RSS", 2, "MiB", 2**-20),
        ):
            values = [r[column] * scale for r in rounds]
            listed = ", ".join(f"{v:.2f}" if unit == "s" else f"{v:.0f}" for v in values)
            print(f"{name} {label}: {listed} (mean {sum(values) / len(values):.2f} {unit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
