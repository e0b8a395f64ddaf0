"""The ``terrabeam`` command: run a whole pipeline, or one step of it, from a YAML config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from terrabeam import __version__
from terrabeam.config import PipelineConfig, load_config
from terrabeam.errors import ConfigError, TerrabeamError, WorkspaceError
from terrabeam.workspace import Workspace, new_run_id, resolve_root

DESCRIPTION = """\
Run a trained model over satellite imagery, patch by patch, on Apache Beam.

A run has three steps, each writing a folder in the run workspace <workspace>/<run>/:
  export   rasters → Earth Engine-layout TFRecord patches + mixer.json   (export/)
  predict  patches → model (Beam RunInference) → prediction patches      (predict/)
  deliver  prediction patches → class + probability COGs, quicklook PNG  (deliver/)
'run' does all three and writes <run>/summary.json. Options terrabeam does not know
(e.g. --runner=DataflowRunner --project=…) are passed to Beam."""


def _common(parser: argparse.ArgumentParser, new_run: bool, with_run: bool = True) -> None:
    parser.add_argument("config", type=Path, help="pipeline YAML file")
    parser.add_argument(
        "--workspace",
        help="workspace root: a folder, gs://… or s3://… (default: 'workspace:' from the config)",
    )
    if not with_run:
        parser.set_defaults(run_id=None)
        return
    parser.add_argument(
        "--run",
        dest="run_id",
        help="run id: a folder in the workspace "
        + ("(default: a new id from the current UTC time)" if new_run else "(default: the latest run)"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="terrabeam", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"terrabeam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (and Beam's) at INFO")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "export, predict and deliver, recorded in the workspace's run history; a re-run of the "
        "same config and window resumes it (or does nothing if it was delivered)",
        "export": "cut the source rasters into Earth Engine-layout TFRecord patches + mixer",
        "predict": "run the model over an export on Apache Beam (FnApiRunner by default)",
        "deliver": "assemble predictions into COGs and a quicklook PNG",
        "validate": "check the config and probe the model, without doing any work",
        "schedule": "run the pipeline on the config's cron schedule, one run per closed window, "
        "until SIGTERM (see 'schedule:' in the config)",
    }
    beam_epilog = (
        "Other --options go to Apache Beam's PipelineOptions and win over the config's runner: section, "
        "e.g. --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing."
    )
    for name, text in helps.items():
        epilog = beam_epilog if name in ("run", "predict") else None
        sub = commands.add_parser(name, help=text, description=text, epilog=epilog)
        _common(sub, new_run=name in ("run", "export"), with_run=name not in ("schedule", "validate"))
        if name == "schedule":
            sub.add_argument("--once", action="store_true", help="run the due windows, then exit")
        if name == "run":
            sub.add_argument("--window", help="time window START/END (ISO dates) this run covers")
            sub.add_argument("--force", action="store_true", help="start a new run even if one was delivered")
            sub.add_argument(
                "--no-wait",
                action="store_true",
                help="refuse instead of queueing behind a running pipeline of the same name",
            )
    deploy = commands.add_parser(
        "deploy",
        help="render what runs the pipeline in the cloud (images, templates, workflow, schedule, script)",
        description="Render what runs the pipeline in the cloud; nothing is deployed until you run the "
        "rendered deploy.sh.",
    )
    targets = deploy.add_subparsers(dest="target", required=True, metavar="TARGET")
    gcp = targets.add_parser(
        "gcp",
        help="Google Cloud: Dataflow Flex Template (predict), Cloud Run (export, deliver), Workflows, "
        "Cloud Scheduler, a service account, deploy.sh",
        description="Render the Google Cloud deployment of CONFIG into DIR (see README, 'Deploy to "
        "Google Cloud'). Needs runner.kind: dataflow, runner.service_account and deploy.gcp.workspace.",
    )
    gcp.add_argument("config", type=Path, help="pipeline YAML file")
    gcp.add_argument("--out", type=Path, required=True, help="folder to render into (replaced whole)")
    history = {
        "resume": "continue run RUN from its first unfinished step (finished prediction shards are kept)",
        "runs": "list the runs of the workspace (status, durations, pixels)",
        "status": "show one run and its steps (status, attempts, seconds, errors, outputs)",
    }
    for name, text in history.items():
        sub = commands.add_parser(
            name, help=text, description=text, epilog=beam_epilog if name == "resume" else None
        )
        if name != "runs":
            sub.add_argument("run_id", metavar="RUN", help="run id")
        sub.add_argument(
            "--workspace", default="workspace", help="workspace root: folder or URI (default: ./workspace)"
        )
        if name != "resume":
            sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _print_runs(records, as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.to_dict() for r in records], indent=2, default=str))
        return
    print(f"{'run':<22} {'pipeline':<24} {'status':<8} {'seconds':>8} {'pixels':>10}  window")
    for r in records:
        seconds = sum(s.seconds or 0 for s in r.steps)
        window = f"{r.window_start}/{r.window_end}" if r.window_start else "-"
        print(f"{r.id:<22} {r.pipeline:<24} {r.status:<8} {seconds:>8.1f} {r.pixels or 0:>10}  {window}")


def _print_status(record, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record.to_dict(), indent=2, default=str))
        return
    print(f"run {record.id}  pipeline {record.pipeline}  status {record.status}  config {record.config_hash}")
    print(f"{'step':<10} {'status':<8} {'attempts':>8} {'seconds':>8}  error / outputs")
    for s in record.steps:
        detail = s.error or ", ".join(f"{k}={v}" for k, v in s.outputs.items() if k != "outputs") or ""
        print(f"{s.name:<10} {s.status:<8} {s.attempts:>8} {(s.seconds or 0):>8.1f}  {detail[:100]}")
    for output in record.outputs:
        print(f"output  {output}")


def _root(config: PipelineConfig, args: argparse.Namespace) -> tuple[Path, str | None]:
    """(local root, remote URI or None): --workspace (relative to the current folder) or the config's
    'workspace:' (relative to the config file)."""
    if args.workspace:
        return resolve_root(args.workspace)
    return resolve_root(config.workspace, config.base_dir)


def _workspace(config: PipelineConfig, args: argparse.Namespace, new_run: bool) -> Workspace:
    root, remote = _root(config, args)
    if args.run_id:
        return Workspace(root, args.run_id, remote)
    return Workspace(root, new_run_id(root), remote) if new_run else Workspace.latest(root, remote)


def _history_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from terrabeam.workflow.runner import Runner, pull_history
    from terrabeam.workflow.state import RunState

    root, remote = resolve_root(args.workspace)
    pull_history(root, remote)
    if not (root / "terrabeam.db").exists():
        raise WorkspaceError(f"{root}: no run history here (terrabeam.db); give --workspace")
    state = RunState(root / "terrabeam.db")
    try:
        if args.command == "runs":
            _print_runs(state.list_runs(), args.json)
            return 0
        record = state.get_run(args.run_id)
    finally:
        state.close()
    if record is None:
        raise WorkspaceError(f"{root}: no run {args.run_id!r}; see 'terrabeam runs --workspace {root}'")
    if args.command == "status":
        _print_status(record, args.json)
        return 0 if record.status != "failed" else 1
    if not record.config_path:
        raise WorkspaceError(f"run {record.id} has no recorded configuration file; run the config again")
    config = load_config(record.config_path)
    record = Runner(config, root, remote=remote).run(record.id, None, beam_args)
    print(
        f"run {record.id}: {record.status}; summary: {Workspace(root, record.id, remote).location}/summary.json"
    )
    return 0


def _schedule(
    config: PipelineConfig, root: Path, remote: str | None, once: bool, beam_args: list[str]
) -> int:
    import signal
    import threading

    from terrabeam.workflow.runner import Runner
    from terrabeam.workflow.schedule import Scheduler

    runner = Runner(config, root, remote=remote)
    scheduler = Scheduler(config, root, lambda window: runner.run(None, window, beam_args))
    if once:
        ran = scheduler.run_due()
        print(json.dumps({"windows_run": [list(w) for w in ran]}, indent=2))
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"terrabeam: scheduling {config.name} on '{config.schedule.cron}' (UTC); SIGTERM stops",
        file=sys.stderr,
    )
    scheduler.serve(stop)
    print("terrabeam: scheduler stopped", file=sys.stderr)
    return 0


def run_step_alone(name: str, config: PipelineConfig, workspace: Workspace, beam_args: list[str]):
    """One step outside the run history: start its task and poll until it reports."""
    import time

    from terrabeam.workflow import steps
    from terrabeam.workflow.tasks import RunContext, start_and_poll, task_for

    if name == "predict":  # alone, predict probes the model first (a run did so before export)
        return steps.predict_step(config, workspace, beam_args)
    return start_and_poll(
        task_for(name, config, workspace, beam_args, RunContext(workspace.run_id, created=time.time()))
    )


def _root_cause(exc: BaseException) -> TerrabeamError | None:
    """Beam re-raises worker errors wrapped or with extra text; find terrabeam's own error inside."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TerrabeamError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    unknown = [a for a in beam_args if not a.startswith("--")]
    if unknown:
        parser.error(f"unexpected arguments: {' '.join(unknown)}")
    if beam_args and args.command not in ("run", "predict", "resume", "schedule"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    # Beam logs harmless start-up warnings on the root logger (missing optional GCP clients, no
    # resource module): quiet unless --verbose. Configured before Beam is first imported.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("terrabeam").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("terrabeam.progress").setLevel(logging.INFO)  # the bar's stand-in off a terminal
    from terrabeam.workflow import steps
    from terrabeam.workflow.runner import Runner

    try:
        if args.command in ("runs", "status", "resume"):
            return _history_command(args, beam_args)
        config = load_config(args.config)
        if args.command == "deploy":
            from terrabeam.deploy.gcp import render_gcp

            files = render_gcp(config, args.out)
            print(f"{args.out}: {len(files)} files; review them, then run {args.out / 'deploy.sh'}")
            return 0
        if args.command == "validate":
            steps.validate(config)
            print(f"{args.config}: valid (config hash {config.fingerprint()})")
            return 0
        root, remote = _root(config, args)
        if args.command == "schedule":
            return _schedule(config, root, remote, args.once, beam_args)
        if args.command == "run":
            window = tuple(args.window.split("/", 1)) if args.window else None
            if window is not None and len(window) != 2:
                raise ConfigError(f"--window {args.window!r}: expected START/END")
            runner = Runner(config, root, remote=remote)
            record = runner.run(args.run_id, window, beam_args, args.force, not args.no_wait)
            print(json.dumps(record.outputs, indent=2))
            summary = f"{Workspace(root, record.id, remote).location}/summary.json"
            print(f"run {record.id}: {record.status}; summary: {summary}")
            return 0
        if args.command == "predict":
            report_args = beam_args
        else:
            report_args = []
            steps.check_access(config)
        workspace = _workspace(config, args, new_run=args.command == "export")
        workspace.ensure_writable()
        report = run_step_alone(args.command, config, workspace, report_args)
        print(
            json.dumps(
                {"run": workspace.run_id, "step": report.name, "seconds": round(report.seconds, 3)}
                | report.details,
                indent=2,
            )
        )
        return 0
    except KeyboardInterrupt:
        print("terrabeam: interrupted; no step folder was published for the unfinished step", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI boundary: report the cause in one line, never a traceback
        cause = _root_cause(exc)
        if cause is None:
            if args.verbose:
                raise
            print(f"terrabeam: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"terrabeam: error: {cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
