"""The computePixels source against its bounds: every block of a grid fetched by the reader
(`ComputePixelsPatchReader`, blocks read ahead as the map step reads them) from the Earth Engine
playback of the tests (tests/earthengine_service.py, on 127.0.0.1) answering each request after a
fixed latency, as Earth Engine computing a composite would. Side by side in one run: one request
at a time, and the configured concurrency and rate, each against its bound — requests × latency /
concurrency, or requests / rate, whichever is larger.

    python -m benchmarks.compute_pixels [--latency 0.5] [--rate 10] [--work DIR]

The playback's pixels are synthetic (a field of map coordinates); what is measured is the fetching:
requests in flight, the gate, NPY decoding and cutting blocks into patches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _config(work: Path, url: str, concurrent: int, rate: float):
    from terrabeam.config import parse_config

    bands = ["blue", "green", "red", "nir", "swir16", "swir22"]
    document = {
        "name": "bench-pixels",
        "workspace": str(work / "ws"),
        "earthengine": {
            "project": "playback-project",
            "staging": "gs://bench/staging",
            "api_url": url,
            "max_requests_per_second": rate,
            "max_concurrent": concurrent,
            "max_request_bytes": 8 * 2**20,  # a block (a patch row) in 4 requests
        },
        "source": {
            "kind": "earthengine",
            "image": "bench/image",
            "bands": {name: {"band": name} for name in bands},
            "fetch": "compute_pixels",
        },
        # the demo's patches (256 + 64 px margin) over 16× the demo scene's area at 20 m
        "grid": {
            "crs": "EPSG:32633",
            "resolution": 20,
            "region": {"bbox": [300000, 5800000, 361440, 5830720]},
            "patch_size": [256, 256],
            "kernel_size": [64, 64],
        },
        "model": {"path": str(work / "unused.onnx"), "input_bands": bands, "classes": ["a", "b"]},
    }
    return parse_config(document, work)


def _fetch_all(config, window) -> tuple[float, int]:
    """(seconds, patches) to read every block of the grid as the map step does."""
    from terrabeam.region import stated_grid
    from terrabeam.sources.earthengine_pixels import pixels_reader
    from terrabeam.sources.raster import read_ahead
    from terrabeam.tiling import Tiling

    grid, region = stated_grid(config)
    tiling = Tiling.for_grid(grid, region.width, region.height, config.outputs.tile_size)
    reader = pixels_reader(config, grid, window, [])()
    blocks = [block for tile in range(tiling.count) for block in tiling.patch_rows(tile)]
    patches = 0
    start = time.perf_counter()
    with reader, ThreadPoolExecutor(max_workers=reader.read_ahead) as pool:
        for block in read_ahead(pool, reader, blocks, reader.read_ahead):
            patches += len(block)
    return time.perf_counter() - start, patches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compute_pixels")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the playback takes per answer")
    parser.add_argument("--rate", type=float, default=10.0, help="earthengine.max_requests_per_second")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="terrabeam-pixels-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(TESTS))
    from earthengine_service import EarthEnginePlayback, write_adc_file

    from terrabeam import earthengine

    playback = EarthEnginePlayback("playback-project", compute_seconds=args.latency).start()
    (work / "home").mkdir(exist_ok=True)
    write_adc_file(work / "adc.json", playback.url + "/token")
    os.environ |= {
        "HOME": str(work / "home"),
        "GOOGLE_APPLICATION_CREDENTIALS": str(work / "adc.json"),
        "NO_GCE_CHECK": "true",
    }
    earthengine._connected = None
    window = (date(2024, 1, 1), date(2025, 1, 1))
    rows = []
    try:
        for concurrent in (1, 4, 16):
            config = _config(work, playback.url, concurrent, args.rate)
            before = len(playback.calls("POST", "/image:computePixels"))
            seconds, patches = _fetch_all(config, window)
            requests = len(playback.calls("POST", "/image:computePixels")) - before
            bound = max(requests * args.latency / concurrent, requests / args.rate)
            rows.append((concurrent, requests, patches, seconds, bound, playback.max_in_flight))
            playback.max_in_flight = 0
    finally:
        playback.stop()
    megabytes = patches * 6 * 320 * 320 * 4 / 1e6
    print(
        f"computePixels: {patches} patches of 6 bands × 320² px ({megabytes:.0f} MB of float32), latency "
        f"{args.latency} s per answer, at most {args.rate:g} requests/s, 2 cores"
    )
    print(
        "| max_concurrent | requests | seconds | bound s | bound / seconds | MB/s | speed vs 1 at a time "
        "| most in flight |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    serial = rows[0][3]
    for concurrent, requests, _, seconds, bound, most in rows:
        print(
            f"| {concurrent} | {requests} | {seconds:.2f} | {bound:.2f} | {bound / seconds:.2f} | "
            f"{megabytes / seconds:.1f} | {serial / seconds:.2f} | {most} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
