"""terrabeam's benchmark suite (``make bench``): every ratio measured side by side in one run.

1. bounds of the predict step (model alone, I/O alone, their serial combination) against
   `terrabeam predict`, for the real U-Net and a light per-pixel model, on the 16× scene;
2. `terrabeam run` against a naive rasterio → model → rasterio loop on the same scene, the two
   taking turns for ``--rounds`` rounds (best of each compared: this VM's speed drifts by ±15 %
   from minute to minute, so one run of each compares the machine's moods, not the code);
3. scaling: `terrabeam run` on 1×, 4× and 16× the real scene's area, ``--rounds`` runs each (time
   per Mpx from the best, peak memory from the median);
4. where the time goes: per-step and per-stage seconds of one profiled run;
5. local worker processes: predict with 1 and 2 worker processes (× ONNX Runtime threads), the
   speed-up (alone: ``python -m benchmarks --only workers --write BENCHMARKS.md``).
6. engines: ONNX Runtime fp32, OpenVINO fp32 and bf16, the model alone and whole runs, with class
   agreement to ONNX Runtime fp32 (``python -m benchmarks --only engines --write BENCHMARKS.md``;
   ``make bench`` runs it after the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import onnxruntime as ort
import yaml
from apache_beam.version import __version__ as beam_version

from benchmarks.bounds import io_bound, keras_pixel_bound, load_patches, model_bound
from benchmarks.memory import run_measured
from benchmarks.naive import naive_run
from benchmarks.scenes import LANDCOVER_CONFIG, keras_pixel_model, pixel_model, scene_config, tiled_scene
from benchmarks.stages import profile_run
from benchmarks.workers import load_average, time_workers, worker_settings
from terrabeam.config import load_config
from terrabeam.predict.pipeline import run_predict

MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"
WORKERS_START, WORKERS_END = "<!-- workers:start -->", "<!-- workers:end -->"
ENGINES_START, ENGINES_END = "<!-- engines:start -->", "<!-- engines:end -->"
ENGINES_SCALE = 16


def _engines_section(work: Path, command: str) -> str:
    """Section 6: the model alone on each engine, then whole runs at 16× (benchmarks/engines.py)."""
    from benchmarks.engines import engine_rows, model_alone, table

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n\n".join(
        [
            f"### 6. Engines ({when}, `{command}`)",
            model_alone(),
            f"Whole `terrabeam run` on the {ENGINES_SCALE}× scene:",
            table(engine_rows(ENGINES_SCALE, work)),
        ]
    )


NAIVE_OUTPUTS = "the naive loop's outputs (tiles + VRT; no single COG, no quicklook)"


def _naive_outputs(config_path: Path) -> Path:
    """The config with the outputs the naive loop makes (a class and a probability raster, here
    as tiles behind a VRT): no single COG per layer, no quicklook."""
    config = yaml.safe_load(config_path.read_text())
    config["outputs"].update(single_file_max_pixels=0, quicklook=False)
    path = config_path.with_name(f"{config_path.stem}-lean.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _mpx(pixels: int, seconds: float) -> float:
    return pixels / seconds / 1e6


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scales", type=int, nargs="+", default=[1, 4, 16], help="scene areas for scaling, square numbers"
    )
    parser.add_argument(
        "--bounds-scale", type=int, default=64, help="scene area for sections 1 and 2 (also run for scaling)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of sections 2 and 3 (runs and naive loops take turns)"
    )
    parser.add_argument("--profile-scale", type=int, default=16, help="scene area of the profiled run")
    parser.add_argument(
        "--workers-scale", type=int, default=16, help="scene area of section 5 (local worker processes)"
    )
    parser.add_argument(
        "--workers-repeats", type=int, default=2, help="rounds of section 5; best is reported"
    )
    parser.add_argument(
        "--only",
        choices=["workers", "engines"],
        help="run one section; --write replaces only its block in the file",
    )
    parser.add_argument("--write", type=Path, help="put the results into this Markdown file")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    if args.only == "engines":
        with tempfile.TemporaryDirectory(prefix="terrabeam-bench-") as tmp:
            text = _engines_section(Path(tmp), command)
        print(text)
        if args.write:
            _write_block(args.write, ENGINES_START, ENGINES_END, text)
        return 0
    if args.only == "workers":
        with tempfile.TemporaryDirectory(prefix="terrabeam-bench-") as tmp:
            text = _workers_section(args, Path(tmp), command)
        print(text)
        if args.write:
            _write_block(args.write, WORKERS_START, WORKERS_END, text)
        return 0
    largest = args.bounds_scale
    scales = sorted({*args.scales, largest})
    terrabeam = [sys.executable, "-m", "terrabeam"]
    lines: list[str] = []
    say = lines.append

    with tempfile.TemporaryDirectory(prefix="terrabeam-bench-") as tmp:
        work = Path(tmp)
        light = pixel_model(work / "pixel.onnx")
        configs = {}
        for scale in scales:
            bands = tiled_scene(work / f"scene-x{scale}", scale)
            configs[scale] = scene_config(work / f"unet-x{scale}.yaml", bands, work / "ws")
        light_config_path = scene_config(
            work / f"pixel-x{largest}.yaml",
            tiled_scene(work / f"scene-x{largest}", largest),
            work / "ws-pixel",
            model=light,
        )

        # 3. scaling (first, so the big run's export can serve the bounds below)
        scaling = []
        rounds = {scale: [] for scale in scales}  # (run s, wall s, peak bytes) per round
        for round_number in range(args.rounds):  # the scales take turns: drift hits them alike
            for scale in scales:
                run_id = f"x{scale}-{round_number}"
                wall, peak = run_measured([*terrabeam, "run", str(configs[scale]), "--run", run_id])
                summary = json.loads((work / "ws" / run_id / "summary.json").read_text())
                rounds[scale].append((summary["seconds"]["total"], wall, peak))
                if round_number < args.rounds - 1:
                    shutil.rmtree(work / "ws" / run_id)
        for scale in scales:
            summary = json.loads((work / "ws" / f"x{scale}-{args.rounds - 1}" / "summary.json").read_text())
            best = min(rounds[scale])
            peaks = [r[2] for r in rounds[scale]]
            scaling.append((scale, summary["pixels"], best[0], best[1], statistics.median(peaks), peaks))

        # a run writes no interchange files: the bounds of the predict step run on an export
        run_measured([*terrabeam, "export", str(configs[largest]), "--run", f"e{largest}"])
        export_dir = work / "ws" / f"e{largest}" / "export"
        big = next(s for s in scaling if s[0] == largest)
        pixels = big[1]

        # 1. bounds vs predict, both models, same export
        models = {
            "U-Net (ukis-csmask, 6 bands)": load_config(configs[largest]),
            "per-pixel linear (1×1 conv)": load_config(light_config_path),
        }
        io_seconds, records = io_bound(models["U-Net (ukis-csmask, 6 bands)"], export_dir, work / "io")
        bound_rows = []
        for label, config in models.items():
            patches = load_patches(config, export_dir)
            model_seconds = model_bound(config, patches)
            del patches
            out = work / f"predict-{len(bound_rows)}"
            out.mkdir()
            start = time.perf_counter()
            run_predict(config, export_dir, out)
            predict_seconds = time.perf_counter() - start
            serial = model_seconds + io_seconds  # = 1 / (1/model + 1/io) as throughput
            bound_rows.append((label, model_seconds, io_seconds, serial, predict_seconds))
        keras_config = load_config(
            scene_config(
                work / "keras.yaml",
                tiled_scene(work / f"scene-x{largest}", largest),
                work / "ws-keras",
                model=keras_pixel_model(work / "dnn.keras"),
                base=LANDCOVER_CONFIG,
            )
        )
        model_seconds = keras_pixel_bound(keras_config, export_dir)
        out = work / "predict-keras"
        out.mkdir()
        start = time.perf_counter()
        run_predict(keras_config, export_dir, out)
        predict_seconds = time.perf_counter() - start
        bound_rows.append(
            (
                "per-pixel Keras DNN (TensorFlow; bound: one model.predict)",
                model_seconds,
                io_seconds,
                model_seconds + io_seconds,
                predict_seconds,
            )
        )

        # 2. run vs naive, both models, at 16× (if measured) and the largest scene; the light model
        # also with deflate COGs (the naive loop writes deflate GeoTIFFs)
        unet_bound = bound_rows[0][1]
        run_rows = []
        for scale in sorted({s for s in (16, largest) if s in configs}):
            bands = tiled_scene(work / f"scene-x{scale}", scale)
            light_path = scene_config(work / f"pixel-x{scale}.yaml", bands, work / "ws-pixel", model=light)
            variants = [("U-Net (ukis-csmask, 6 bands)", configs[scale], f"x{scale}", "ws")]
            variants.append(("per-pixel linear (1×1 conv)", light_path, f"pixel-x{scale}", "ws-pixel"))
            for label, path, ws in (
                ("U-Net", configs[scale], "ws"),
                ("per-pixel linear", light_path, "ws-pixel"),
            ):  # the naive loop's outputs only: what the single COGs and the quicklook cost
                variants.append((f"{label}, {NAIVE_OUTPUTS}", _naive_outputs(path), f"{path.stem}-lean", ws))
            if scale == largest:
                deflate = yaml.safe_load(light_path.read_text())
                deflate["outputs"]["compression"] = "deflate"
                deflate_path = work / f"pixel-deflate-x{scale}.yaml"
                deflate_path.write_text(yaml.safe_dump(deflate, sort_keys=False))
                variants.append(
                    ("per-pixel linear, deflate COGs", deflate_path, f"deflate-x{scale}", "ws-pixel")
                )
            for label, config_path, run_id, ws in variants:
                run_seconds, naive_seconds = [], []
                for round_number in range(args.rounds):  # taking turns with the naive loop
                    name = f"{run_id}-v{round_number}"
                    run_measured([*terrabeam, "run", str(config_path), "--run", name])
                    summary = json.loads((work / ws / name / "summary.json").read_text())
                    shutil.rmtree(work / ws / name)
                    run_seconds.append(summary["seconds"]["total"])
                    seconds, naive_pixels = naive_run(load_config(config_path), work / f"naive-{run_id}")
                    naive_seconds.append(seconds)
                    assert naive_pixels == summary["pixels"]
                bound = unet_bound * naive_pixels / pixels if label.startswith("U-Net") else None
                run_rows.append((f"{label}, {scale}×", naive_pixels, run_seconds, naive_seconds, bound))

        # 4. where the time goes
        profiled = args.profile_scale if args.profile_scale in configs else largest
        steps, stages = profile_run(configs[profiled], work / "ws-profile")

        # 5. local worker processes
        workers_text = _workers_section(args, work, command)

    # ---- report ------------------------------------------------------------------------------
    say(f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    say("")
    say(
        f"`python -m benchmarks --scales {' '.join(map(str, args.scales))} --bounds-scale {largest} "
        f"--rounds {args.rounds}` "
        f"on {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}, onnxruntime {ort.__version__}, "
        f"apache-beam {beam_version}. "
        f"Sections 1–2 on the {largest}× scene = {pixels / 1e6:.2f} Mpx at 20 m, {records} patches "
        "(a full Sentinel-2 tile at 20 m is 30 Mpx)."
    )
    say("")
    say(
        "**1. Predict against its bounds** (same export, same threads, batch 4). Serial combination = "
        "model + I/O seconds, i.e. 1 / (1/model + 1/io) in throughput."
    )
    say("")
    say(
        "| model | model bound Mpx/s | I/O bound Mpx/s | serial combination Mpx/s | terrabeam predict Mpx/s "
        "| predict / model bound | predict / serial (target ≥ 0.8) |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|")
    for label, model_s, io_s, serial_s, predict_s in bound_rows:
        ratio = serial_s / predict_s
        say(
            f"| {label} | {_mpx(pixels, model_s):.2f} | {_mpx(pixels, io_s):.2f} | {_mpx(pixels, serial_s):.2f} "
            f"| {_mpx(pixels, predict_s):.2f} | {model_s / predict_s:.3f} | {ratio:.3f} {_verdict(ratio >= 0.8)} |"
        )
    say("")
    say(
        "**2. terrabeam run against a naive rasterio → model → rasterio loop** (one process, same grid, "
        "margin, model; class + probability GeoTIFFs). The rows marked with the naive loop's outputs "
        "run terrabeam without the single COGs and the quicklook (`outputs.single_file_max_pixels: 0`, "
        "`outputs.quicklook: false`), to show what those cost; the targets are for the default rows."
    )
    say("")
    say(
        "| model, scene | terrabeam run s (best) | naive s (best) | run Mpx/s | naive Mpx/s | run / naive, "
        "best against best (target: U-Net ≥ 1.1, light ≥ 1.5) | run / naive in each round "
        "| run / model bound (U-Net, target ≥ 0.8) |"
    )
    say("|---|---:|---:|---:|---:|---:|---|---:|")
    for label, px, run_rounds, naive_rounds, bound_s in run_rows:
        run_s, naive_s = min(run_rounds), min(naive_rounds)
        ratio = naive_s / run_s
        each = ", ".join(f"{n / r:.2f}" for r, n in zip(run_rounds, naive_rounds, strict=True))
        target = 1.1 if label.startswith("U-Net") else 1.5
        judged = NAIVE_OUTPUTS not in label  # the targets are for a run with its default outputs
        verdict = _verdict(ratio >= target) if judged else "(not a target row)"
        versus_bound = "–"
        if bound_s:
            versus_bound = f"{bound_s / run_s:.3f}" + (
                f" {_verdict(bound_s / run_s >= 0.8)}" if judged else ""
            )
        say(
            f"| {label} | {run_s:.2f} | {naive_s:.2f} | {_mpx(px, run_s):.2f} | {_mpx(px, naive_s):.2f} "
            f"| {ratio:.3f} {verdict} | {each} | {versus_bound} |"
        )
    say("")
    say(
        f"**3. Scaling** (U-Net, {args.rounds} runs of each scene, the scenes taking turns; run seconds "
        "from the run's summary, best round; wall includes interpreter start; peak RSS of the whole "
        "process tree, median of the rounds)."
    )
    say("")
    say("| area | Mpx | run s | wall s | s per Mpx | peak RSS MiB (median) | peak RSS MiB, every round |")
    say("|---|---:|---:|---:|---:|---:|---|")
    for scale, px, run_s, wall, peak, peaks in scaling:
        each = ", ".join(f"{p / 2**20:.0f}" for p in peaks)
        say(
            f"| {scale}× | {px / 1e6:.2f} | {run_s:.2f} | {wall:.2f} | {run_s / (px / 1e6):.2f} "
            f"| {peak / 2**20:.0f} | {each} |"
        )
    first, last = scaling[0], next(row for row in scaling if row[0] == max(args.scales))
    time_ratio = (last[2] / last[1]) / (first[2] / first[1])
    memory_ratio = last[4] / first[4]
    say("")
    say(
        f"Time per Mpx at {last[0]}× / {first[0]}×: {time_ratio:.2f} (target ≤ 1.2: {_verdict(time_ratio <= 1.2)}); "
        f"peak memory {last[0]}× / {first[0]}×: {memory_ratio:.2f} (target ≤ 1.25: {_verdict(memory_ratio <= 1.25)}); "
        f"at {scaling[-1][0]}×: time per Mpx {(scaling[-1][2] / scaling[-1][1]) / (first[2] / first[1]):.2f}, "
        f"peak memory {scaling[-1][4] / first[4]:.2f} × the 1× run's."
    )
    say("")
    say(
        f"**4. Where the time goes** (one cProfile'd U-Net run on the {profiled}× scene; profiling slows "
        "Python-heavy parts; stages in other threads are wall seconds summed over their calls and "
        "overlap the model or each other, so the stages add up to more than the run)."
    )
    say("")
    say("| step | seconds |")
    say("|---|---:|")
    for step, seconds in steps.items():
        say(f"| {step} | {seconds:.2f} |")
    say("")
    say("| stage (whole run) | seconds |")
    say("|---|---:|")
    for stage, seconds in sorted(stages.items(), key=lambda item: -item[1]):
        say(f"| {stage} | {seconds:.2f} |")
    say("")
    text = "\n".join(lines)
    print(text)
    print(workers_text)
    if args.write:
        _write_block(args.write, MARK_START, MARK_END, text)
        _write_block(args.write, WORKERS_START, WORKERS_END, workers_text)
    return 0


def _workers_section(args: argparse.Namespace, work: Path, command: str) -> str:
    """Section 5 on the export of the ``--workers-scale`` scene (made here unless a run left one)."""
    scale = args.workers_scale
    config = work / f"unet-x{scale}.yaml"
    export_dir = work / "ws" / f"x{scale}" / "export"
    if not export_dir.exists():
        scene_config(config, tiled_scene(work / f"scene-x{scale}", scale), work / "ws")
        run_measured([sys.executable, "-m", "terrabeam", "export", str(config), "--run", f"x{scale}"])
    cores = os.cpu_count() or 1
    settings = worker_settings(cores)
    load_before = load_average()
    seconds, patches, pixels = time_workers(config, export_dir, work, settings, args.workers_repeats)
    load_after = load_average()
    best = {setting: min(times) for setting, times in seconds.items()}
    default = best[settings[0]]
    lines = [
        f"### 5. Local worker processes ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}` on {cores} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, apache-beam {beam_version}. U-Net on the {scale}× scene "
        f"({patches} patches, {pixels / 1e6:.2f} Mpx of patch cores); the whole predict step in "
        f"process (probe, pipeline, worker start-up), best of {args.workers_repeats} rounds, settings "
        f"taking turns; 1-minute load average {load_before} before, {load_after} after.",
        "",
        "| workers × ONNX threads each | runner | predict s (best) | every round s | Mpx/s "
        f"| speed-up vs {settings[0].label} |",
        "|---|---|---:|---|---:|---:|",
    ]
    for setting in settings:
        rounds = ", ".join(f"{t:.2f}" for t in seconds[setting])
        lines.append(
            f"| {setting.label} | {setting.runner} | {best[setting]:.2f} | {rounds} "
            f"| {_mpx(pixels, best[setting]):.2f} | {default / best[setting]:.2f} |"
        )
    one, two = (min(t for setting, t in best.items() if setting.workers == n) for n in (1, 2))
    lines += ["", f"Speed-up of 2 worker processes over 1 (best setting of each): {one / two:.2f}.", ""]
    return "\n".join(lines)


def _write_block(path: Path, start: str, end: str, text: str) -> None:
    """Replace the text between the ``start`` and ``end`` markers of ``path`` (appended if absent)."""
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in document:
        document = f"{document.rstrip()}\n\n{start}\n{end}\n"
    head, _, rest = document.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
