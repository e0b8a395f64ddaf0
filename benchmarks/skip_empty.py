"""Empty patches skip the model: the same 16× scene and U-Net, once with the whole scene as region
and once with a triangle over half of it (its bounding box is the whole scene, so the grid is the
same); the run time should fall with the skipped patches, and the map inside the triangle must be
the whole-scene map's.

    python -m benchmarks.skip_empty [SCALE] [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform_geom

from benchmarks.scenes import run_variant, scene_config, tiled_scene


def _run(config: Path, work: Path, name: str, region: dict | None) -> tuple[dict, np.ndarray]:
    def edit(document: dict) -> None:
        if region is not None:
            document["grid"]["region"] = region

    return run_variant(config, work, name, edit)


def main(argv: list[str]) -> int:
    scale = int(argv[0]) if argv else 16
    work = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="terrabeam-skip-"))
    bands = tiled_scene(work / f"scene-x{scale}", scale)
    config = scene_config(work / f"unet-x{scale}.yaml", bands, work / "ws")
    with rasterio.open(next(iter(bands.values()))) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    triangle = {
        "type": "Polygon",
        "coordinates": [[(left, bottom), (left, top), (right, bottom), (left, bottom)]],
    }
    whole, full_map = _run(config, work, "whole", None)
    half, half_map = _run(config, work, "triangle", {"geojson": transform_geom(crs, "EPSG:4326", triangle)})
    inside = half_map != 255
    same = (
        bool(np.array_equal(half_map[inside], full_map[inside]))
        if half_map.shape == full_map.shape
        else False
    )
    t_whole, t_half = whole["seconds"]["total"], half["seconds"]["total"]
    print(
        f"{scale}x U-Net: whole scene {t_whole:.2f} s ({whole['patches_skipped']} of {whole['patches']} patches "
        f"skipped); triangle over half {t_half:.2f} s ({half['patches_skipped']} skipped); time ratio "
        f"{t_half / t_whole:.2f}, patches run ratio "
        f"{(half['patches'] - half['patches_skipped']) / (whole['patches'] - whole['patches_skipped']):.2f}; "
        f"map inside the triangle identical to the whole scene's: {same} ({inside.mean():.1%} of pixels inside)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
