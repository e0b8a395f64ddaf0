"""Predict-step throughput against a plain ONNX Runtime loop, measured side by side in one run.

The demo scene's export (8 real patches) is tiled ``--tiles`` times at the shard level into one
larger export (64 tiles = 512 patches, about 60 % of one full Sentinel-2 tile at 20 m), so fixed
start-up costs weigh as they would on a real scene. The baseline loads the same model with the same
threads and runs it with the same batch size over the same patches, already decoded and normalised
in memory: the model bound, the most a pipeline could reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
from isal import isal_zlib

from terrabeam.config import load_config
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, list_shards, manifest_path, mixer_path, shard_name
from terrabeam.predict.pipeline import run_predict
from terrabeam.sources.raster import export_rasters
from terrabeam.tfrecord import decode_example, read_records

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "examples" / "sentinel2-cloudmask.yaml"


def tiled_export(config, work: Path, tiles: int) -> Path:
    """Export the demo scene once, then repeat its shards ``tiles`` times as one export."""
    single = work / "single"
    single.mkdir()
    result = export_rasters(config, single)
    prefix = config.export.prefix
    out = work / "export"
    out.mkdir()
    shards = list_shards(single, prefix)
    number = 0
    for _ in range(tiles):
        for shard in shards:
            shutil.copyfile(shard, out / shard_name(prefix, number))
            number += 1
    grid = result.grid
    tiled = Grid(
        grid.crs,
        grid.transform,
        grid.patch_width,
        grid.patch_height,
        grid.patches_per_row,
        grid.total_patches * tiles,
    )
    tiled.write_mixer(mixer_path(out, prefix))
    manifest = result.manifest
    ExportManifest(
        manifest.kernel_size,
        manifest.region_width,
        manifest.region_height * tiles,
        manifest.bands,
        manifest.shard_records * tiles,
    ).write(manifest_path(out, prefix))
    return out


def plain_onnx_loop(config, export_dir: Path) -> tuple[float, int]:
    """Seconds to load the model and run it over all patches, batched as the pipeline does.

    The patches are decoded and normalised in memory beforehand (not timed).
    """
    model = config.model
    norm = model.normalization
    mean = np.asarray(norm.mean, np.float32)[:, None, None]
    std = np.asarray(norm.std, np.float32)[:, None, None]
    grid = Grid.read_mixer(mixer_path(export_dir, config.export.prefix))
    kw, kh = config.grid.kernel_size
    shape = (grid.patch_height + kh, grid.patch_width + kw)
    patches = []
    for shard in list_shards(export_dir, config.export.prefix):
        for record in read_records(shard):
            features = decode_example(record)
            patch = np.stack([np.reshape(features[b], shape) for b in model.input_bands])
            patches.append((patch - mean) / std)
    start = time.perf_counter()  # loading the model is part of any loop, as of the pipeline
    options = ort.SessionOptions()
    options.intra_op_num_threads = model.threads
    session = ort.InferenceSession(
        str(config.resolve(model.path)), options, providers=ort.get_available_providers()
    )
    name = session.get_inputs()[0].name
    for i in range(0, len(patches), model.batch_size):
        session.run(None, {name: np.stack(patches[i : i + model.batch_size])})
    return time.perf_counter() - start, len(patches)


def gzip_codecs(export_dir: Path, prefix: str, records: int = 32) -> tuple[float, float]:
    """Seconds to gzip the same serialized patches at level 1 with zlib and with ISA-L (isal)."""
    payloads = []
    for shard in list_shards(export_dir, prefix):
        payloads.extend(read_records(shard))
        if len(payloads) >= records:
            break
    timings = []
    for compress in (lambda d: zlib.compress(d, 1), lambda d: isal_zlib.compress(d, 1)):
        start = time.perf_counter()
        for payload in payloads[:records]:
            compress(payload)
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--tiles", type=int, default=64, help="repeat the demo scene's patches this often")
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args(argv)

    config = load_config(DEMO_CONFIG)
    with tempfile.TemporaryDirectory(prefix="terrabeam-bench-") as tmp:
        work = Path(tmp)
        export_dir = tiled_export(config, work, args.tiles)
        baseline_seconds, patches = plain_onnx_loop(config, export_dir)
        zlib_seconds, isal_seconds = gzip_codecs(export_dir, config.export.prefix)
        out = work / "predict"
        out.mkdir()
        start = time.perf_counter()
        result = run_predict(config, export_dir, out)
        predict_seconds = time.perf_counter() - start
    assert result.records == patches
    baseline_rate = patches / baseline_seconds
    predict_rate = patches / predict_seconds
    ratio = predict_rate / baseline_rate
    verdict = "met" if ratio >= 0.8 else "MISSED"
    rows = [
        ("plain ONNX Runtime loop (model bound)", baseline_seconds, baseline_rate, 1.0),
        ("terrabeam predict (Beam FnApiRunner)", predict_seconds, predict_rate, ratio),
    ]
    lines = [
        f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — U-Net (ukis-csmask 6-band), {patches} patches "
        f"of 256×256 (demo scene × {args.tiles})",
        "",
        f"`python -m benchmarks --tiles {args.tiles}` on {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}, onnxruntime {ort.__version__}",
        "",
        "| pipeline | seconds | patches/s | ratio to model bound |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {sec:.2f} | {rate:.2f} | {r:.3f} |" for name, sec, rate, r in rows),
        "",
        f"Target predict ≥ 0.8 × model bound: **{verdict}** ({ratio:.3f}).",
        "",
        f"gzip level 1 of 32 export records (1.8 MB each): zlib {zlib_seconds * 1000 / 32:.1f} ms/record, "
        f"ISA-L {isal_seconds * 1000 / 32:.1f} ms/record: ISA-L is {zlib_seconds / isal_seconds:.1f}× faster.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(
        json.dumps(
            {"patches": patches, "baseline_s": baseline_seconds, "predict_s": predict_seconds, "ratio": ratio}
        )
    )
    if args.write:
        if not args.write.exists():
            args.write.write_text("# Benchmarks\n\n")
        with args.write.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
