"""Bytes the launching machine moves when an Earth Engine export becomes a run's export step, with
the workspace on Cloud Storage and the workers elsewhere (Beam's PortableRunner: job service +
external worker pool on 127.0.0.1): before (the export downloaded into the mirror, then uploaded
into the workspace) and after (copied inside the store; the records of each shard counted by this
machine, one read, or by the workers: a Beam job).

The export is the demo scene tiled N× and exported by terrabeam in Earth Engine's layout, put where
Earth Engine would write it (``<staging>/<pipeline>/<run>/export/``) in the Cloud Storage emulator
(``gcp-storage-emulator`` on 127.0.0.1). Transfers of the launcher are counted as in
``benchmarks.remote_transfer`` (``terrabeam.storage``'s copy/read/write); copies inside the store
move no byte through it.

    python -m benchmarks.earthengine_transfer [--scale 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.remote_transfer import _counting, _free_port, portable_runner, worker_environment
from benchmarks.scenes import scene_config, tiled_scene

BUCKET = "terrabeam-bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.earthengine_transfer")
    parser.add_argument("--scale", type=int, default=4, help="the demo scene tiled N times (a square)")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="terrabeam-ee-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    os.environ |= {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"} | worker_environment(work)
    from terrabeam import storage
    from terrabeam.cli import main as terrabeam

    originals = (storage.copy_file, storage.read_bytes, storage.write_bytes)
    from terrabeam.config import load_config
    from terrabeam.sources.raster import target_region
    from terrabeam.workflow.tasks import EarthEngineExportTask, RunContext
    from terrabeam.workspace import Workspace

    # What Earth Engine would have exported: the scene in its layout, at the export's place.
    raster = scene_config(work / "raster.yaml", tiled_scene(work / "scene", args.scale), work / "local")
    if terrabeam(["-q", "export", str(raster), "--run", "r"]) != 0:
        raise SystemExit("export failed")
    region = target_region(load_config(raster))
    document = yaml.safe_load(raster.read_text())
    name = "ee-bench"
    staging = f"gs://{BUCKET}/staging"
    for path in sorted((work / "local" / "r" / "export").iterdir()):
        if not path.name.endswith("-manifest.json"):  # Earth Engine writes shards and a mixer only
            storage.copy_file(str(path), f"{staging}/{name}/r/export/{path.name}")
    left, top = region.transform.c, region.transform.f
    right, bottom = region.transform * (region.width, region.height)
    document |= {
        "name": name,
        "earthengine": {"project": "bench", "staging": staging},
        "source": {
            "kind": "earthengine",
            "image": "bench/scene",
            "bands": {band: {"band": band} for band in document["source"]["bands"]},
        },
        "grid": document["grid"]
        | {"crs": str(region.crs), "resolution": 20, "region": {"bbox": [left, bottom, right, top]}},
    }
    rows = []
    try:
        with portable_runner(work) as runner:
            document["runner"] = runner
            (work / "ee.yaml").write_text(yaml.safe_dump(document))
            config = load_config(work / "ee.yaml")
            exported = sum(size for _, size in storage.list_files(f"{staging}/{name}/r/export/*"))
            from terrabeam.sources import shard_counts

            for way in (
                "before: downloaded, then uploaded",
                "after: copied in the store, records counted here",
                "after: copied in the store, records counted by the workers",
            ):
                shard_counts.COUNT_HERE_MAX_BYTES = 0 if way.endswith("workers") else 2**30
                workspace = Workspace(work / f"mirror-{len(rows)}", "r", f"gs://{BUCKET}/ws-{len(rows)}")
                task = EarthEngineExportTask(config, workspace, RunContext("r"))
                moved = _counting(storage)
                start = time.perf_counter()
                if way.startswith("before"):
                    from terrabeam.sources.earthengine import download_export

                    with workspace.staging("export") as folder:
                        download_export(config, "r", folder)
                else:
                    task._publish_in_place()
                seconds = time.perf_counter() - start
                there = sum(
                    size for _, size in storage.list_files(f"gs://{BUCKET}/ws-{len(rows)}/r/export/*")
                )
                rows.append((way, moved["down"], moved["up"], there, seconds))
                storage.copy_file, storage.read_bytes, storage.write_bytes = originals
    finally:
        server.stop()
    print(f"{args.scale}× demo scene: the export is {exported:,} bytes on Cloud Storage")
    print(
        "| export step | launcher down (bytes) | launcher up (bytes) | export in the workspace (bytes) | s |"
    )
    print("|---|---:|---:|---:|---:|")
    for way, down, up, there, seconds in rows:
        print(f"| {way} | {down:,} | {up:,} | {there:,} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
