"""One side-by-side ratio: `terrabeam run` (summary seconds, validate included) vs the naive loop,
same scene, grid, margin and model, in one invocation.

    python -m benchmarks.quick_ratio SCALE unet|light [WORKDIR]

Quicker than the full `python -m benchmarks` (one scene, one model); prints one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.naive import naive_run
from benchmarks.scenes import pixel_model, scene_config, tiled_scene
from terrabeam.config import load_config


def main(argv: list[str]) -> int:
    scale, which = int(argv[0]), argv[1]
    work = Path(argv[2]) if len(argv) > 2 else Path(tempfile.mkdtemp(prefix="terrabeam-ratio-"))
    bands = tiled_scene(work / f"scene-x{scale}", scale)
    model = pixel_model(work / "pixel.onnx") if which == "light" else None
    config = scene_config(work / f"{which}-x{scale}.yaml", bands, work / f"ws-{which}", model=model)
    shutil.rmtree(work / f"ws-{which}", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "terrabeam", "run", str(config), "--run", "r"], check=True)
    run = json.loads((work / f"ws-{which}" / "r" / "summary.json").read_text())["seconds"]["total"]
    naive, _ = naive_run(load_config(config), work / f"naive-{which}")
    print(f"{which} {scale}x: run {run:.2f} s, naive {naive:.2f} s, run/naive speed {naive / run:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
