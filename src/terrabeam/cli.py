"""The ``terrabeam`` command: run a whole pipeline, or one step of it, from a YAML config."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from terrabeam import __version__
from terrabeam.config import PipelineConfig, load_config
from terrabeam.errors import Interrupted, WorkspaceError, describe, find_cause, signal_number
from terrabeam.workspace import Workspace, new_run_id, resolve_root

# Commands whose unknown --options go to Apache Beam (checked against Beam's own option parser).
BEAM_COMMANDS = ("run", "predict", "resume", "schedule")

DESCRIPTION = """\
Run a trained model over satellite imagery, patch by patch, on Apache Beam.

A run has three steps, each writing a folder in the run workspace <workspace>/<run>/:
  export   rasters → Earth Engine-layout TFRecord patches + mixer.json   (export/)
  predict  patches → model (Beam RunInference) → prediction patches      (predict/)
  deliver  prediction patches → class + probability COGs, quicklook PNG  (deliver/)
'run' does all three and writes <run>/summary.json. Apache Beam's own options
(e.g. --runner=DataflowRunner --project=…) are passed to Beam; any other option is an error."""


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


def parse_window(text: str) -> tuple[str, str]:
    """``--window START/END``: ISO dates or datetimes (without a zone: UTC), START before END."""
    start, slash, end = text.partition("/")
    if not slash:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START/END, e.g. 2024-01-01/2024-02-01")
    moments = []
    for part in (start, end):
        try:
            moment = datetime.fromisoformat(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} in {text!r} is not an ISO date or datetime (e.g. 2024-01-01 or 2024-01-01T06:00Z)"
            ) from None
        moments.append(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    if moments[0] >= moments[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: START must be before END (END is exclusive)")
    return start, end


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v / -q, before or after the sub-command (a sub-command's default must not undo the top's)."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Beam's INFO logs too, logger names, and tracebacks",
        **default,
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only warnings and errors (no progress or routine lines)",
        **default,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="terrabeam", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"terrabeam {__version__}")
    _verbosity(parser, top=True)
    verbosity = argparse.ArgumentParser(add_help=False)
    _verbosity(verbosity, top=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "export, predict and deliver, recorded in the workspace's run history; a re-run of the "
        "same config and window resumes it (or does nothing if it was delivered)",
        "export": "cut the source rasters into Earth Engine-layout TFRecord patches + mixer",
        "predict": "run the model over an export on Apache Beam (FnApiRunner by default)",
        "deliver": "assemble predictions into COGs and a quicklook PNG",
        "validate": "check the config and probe the model, without doing any work",
        "compare-precision": "run the model at fp32 and at a reduced precision on a sample of the run's "
        "patches: class agreement, largest difference, speed ratio",
        "schedule": "run the pipeline on the config's cron schedule, one run per closed window, "
        "until SIGTERM (see 'schedule:' in the config)",
    }
    beam_epilog = (
        "Apache Beam's own options go to its PipelineOptions and win over the config's runner: section, "
        "e.g. --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing."
    )
    for name, text in helps.items():
        epilog = beam_epilog if name in ("run", "predict") else None
        sub = commands.add_parser(name, help=text, description=text, epilog=epilog, parents=[verbosity])
        sub.set_defaults(command_parser=sub)
        _common(
            sub,
            new_run=name in ("run", "export"),
            with_run=name not in ("schedule", "validate", "compare-precision"),
        )
        _json_flag(sub)
        if name == "compare-precision":
            sub.add_argument(
                "--precision", choices=["bf16", "fp16"], default="bf16", help="the reduced precision"
            )
            sub.add_argument("--patches", type=int, default=16, help="patches in the sample (default 16)")
        if name == "schedule":
            sub.add_argument("--once", action="store_true", help="run the due windows, then exit")
        if name in ("run", "schedule"):
            sub.add_argument(
                "--yes", action="store_true", help="start even if the plan is over the config's limits:"
            )
        if name == "run":
            sub.add_argument(
                "--window",
                type=parse_window,
                help="time window START/END (ISO dates or datetimes, END exclusive) this run covers",
            )
            sub.add_argument("--force", action="store_true", help="start a new run even if one was delivered")
            sub.add_argument(
                "--no-wait",
                action="store_true",
                help="refuse instead of queueing behind a running pipeline of the same name",
            )
    plan = commands.add_parser(
        "plan",
        help="what a run will do and cost, before any work: patches, tiles, shards, bytes, scratch "
        "disk, memory, time on this machine (a short calibration), Dataflow worker-hours and cost",
        description="What a run of CONFIG will do and cost, before any work (see README, 'Plan').",
        parents=[verbosity],
    )
    plan.set_defaults(command_parser=plan)
    plan.add_argument("config", type=Path, help="pipeline YAML file")
    plan.add_argument("--json", action="store_true", help="one JSON document on stdout")
    plan.add_argument(
        "--no-calibrate", action="store_true", help="no calibration: counts and sizes only, no time"
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
        parents=[verbosity],
    )
    gcp.set_defaults(command_parser=gcp)
    gcp.add_argument("config", type=Path, help="pipeline YAML file")
    gcp.add_argument("--out", type=Path, required=True, help="folder to render into (replaced whole)")
    _json_flag(gcp)
    inspect = commands.add_parser(
        "inspect",
        help="validate TFRecord shards + mixer (Earth Engine's or terrabeam's) and COGs",
        description="Validate TFRecord shard sets in Earth Engine's layout (every record's CRC, features, "
        "mixer, shard order, what Earth Engine ingestion needs) and COGs (rio-cogeo's verdict, "
        "TERRABEAM_* tags). Exit 1 on any violation.",
        parents=[verbosity],
    )
    inspect.set_defaults(command_parser=inspect)
    inspect.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="a folder, mixer, shard or GeoTIFF (.tif)"
    )
    _json_flag(inspect)
    history = {
        "resume": "continue run RUN from its first unfinished step (finished prediction shards are kept)",
        "runs": "list the runs of the workspace (status, durations, pixels)",
        "status": "show one run and its steps (status, attempts, seconds, errors, outputs)",
        "open": "where run RUN's map is, and its page in the dashboard ('terrabeam serve')",
    }
    for name, text in history.items():
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=beam_epilog if name == "resume" else None,
            parents=[verbosity],
        )
        sub.set_defaults(command_parser=sub)
        if name != "runs":
            sub.add_argument("run_id", metavar="RUN", help="run id, or 'latest' (the newest run)")
        sub.add_argument(
            "--workspace", default="workspace", help="workspace root: folder or URI (default: ./workspace)"
        )
        _json_flag(sub)
        if name == "open":
            sub.add_argument("--port", type=int, default=8765, help="the dashboard's port (default: 8765)")
            sub.add_argument(
                "--browser", action="store_true", help="open the dashboard's page (else the quicklook) too"
            )
    text = "serve a read-only web dashboard of the workspace: runs, steps, outputs, maps (API under /api)"
    serve = commands.add_parser("serve", help=text, description=text, parents=[verbosity])
    serve.set_defaults(command_parser=serve)
    serve.add_argument(
        "--workspace", default="workspace", help="workspace root: folder or URI (default: ./workspace)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0: a free one)")
    serve.add_argument("--basemap", help="XYZ tile URL template of an online base layer (default: none)")
    text = (
        "write a commented starter config for your own rasters and model (bands, CRS, resolution "
        "and the model's input read from the files)"
    )
    init = commands.add_parser("init", help=text, description=text, parents=[verbosity])
    init.set_defaults(command_parser=init)
    init.add_argument(
        "rasters", nargs="+", type=Path, metavar="RASTER", help="GDAL-readable files, one band or more each"
    )
    init.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the model file (.onnx, .keras, .pt, …) or SavedModel folder",
    )
    init.add_argument(
        "--out", type=Path, default=Path("terrabeam.yaml"), help="config to write (default: terrabeam.yaml)"
    )
    init.add_argument(
        "--name", help="pipeline name (default: the --out file's name, or the model's for the default --out)"
    )
    init.add_argument("--force", action="store_true", help="replace --out if it exists")
    _json_flag(init)
    text = 'print a shell completion script: eval "$(terrabeam completion bash)" (or zsh, tcsh)'
    completion = commands.add_parser("completion", help=text, description=text, parents=[verbosity])
    completion.set_defaults(command_parser=completion)
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell")
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="exactly one JSON document on stdout (any other text on stderr)"
    )


def _emit(args: argparse.Namespace, document: object, text: str) -> None:
    """The command's result: with --json one JSON document on stdout, else ``text``."""
    if args.json:
        print(json.dumps(document, indent=2, default=str))
    else:
        print(text)


def _print_runs(records, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"runs": [r.to_dict() for r in records]}, indent=2, default=str))
        return
    print(f"{'run':<22} {'pipeline':<24} {'status':<11} {'seconds':>8} {'pixels':>10}  window")
    for r in records:
        seconds = sum(s.seconds or 0 for s in r.steps)
        window = f"{r.window_start}/{r.window_end}" if r.window_start else "-"
        print(f"{r.id:<22} {r.pipeline:<24} {r.status:<11} {seconds:>8.1f} {r.pixels or 0:>10}  {window}")


def _print_status(record, as_json: bool) -> None:
    """One run; of its recorded outputs only those still there (a later deliver may have replaced
    them), with a count of the ones gone."""
    present = [o for o in record.outputs if "://" in o or Path(o).exists()]
    gone = [o for o in record.outputs if o not in present]
    if as_json:
        print(
            json.dumps(record.to_dict() | {"outputs": present, "outputs_gone": gone}, indent=2, default=str)
        )
        return
    print(f"run {record.id}  pipeline {record.pipeline}  status {record.status}  config {record.config_hash}")
    print(f"{'step':<10} {'status':<11} {'attempts':>8} {'seconds':>8}  error / outputs")
    for s in record.steps:
        detail = s.error or ", ".join(f"{k}={v}" for k, v in s.outputs.items() if k != "outputs") or ""
        print(f"{s.name:<10} {s.status:<11} {s.attempts:>8} {(s.seconds or 0):>8.1f}  {detail[:100]}")
    for output in present:
        print(f"output  {output}")
    if gone:
        print(f"({len(gone)} recorded output(s) no longer exist)")


def _root(config: PipelineConfig, args: argparse.Namespace) -> tuple[Path, str | None]:
    """(local root, remote URI or None): --workspace (relative to the current folder) or the config's
    'workspace:' (relative to the config file)."""
    if args.workspace:
        return resolve_root(args.workspace)
    return resolve_root(config.workspace, config.base_dir)


def _workspace(config: PipelineConfig, args: argparse.Namespace, new_run: bool) -> Workspace:
    """The run a step alone works on: --run, else a new one (export) or the latest run of this
    pipeline and config. Never a run another pipeline made."""
    root, remote = _root(config, args)
    if args.run_id:
        workspace = Workspace(root, args.run_id, remote)
    elif new_run:
        workspace = Workspace(root, new_run_id(root), remote)
    else:
        recorded = _recorded_runs(root, config)
        workspace = Workspace.latest(root, config.name, config.fingerprint(), remote, recorded)
    workspace.claim(config.name, config.fingerprint(), same_config=False)
    return workspace


def _recorded_runs(root: Path, config: PipelineConfig) -> list[str]:
    """Ids of the runs the workspace's history records for this pipeline and config."""
    from terrabeam.workflow.state import RunState

    if not (root / "terrabeam.db").exists():
        return []
    state = RunState(root / "terrabeam.db")
    try:
        return [r.id for r in state.list_runs(config.name) if r.config_hash == config.fingerprint()]
    finally:
        state.close()


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
        runs = state.list_runs()
        if args.run_id == "latest" and runs:
            args.run_id = max(runs, key=lambda r: r.created).id
        record = state.get_run(args.run_id)
    finally:
        state.close()
    if record is None:
        raise WorkspaceError(f"{root}: no run {args.run_id!r}; see 'terrabeam runs --workspace {root}'")
    if args.command == "status":
        _print_status(record, args.json)
        return 1 if record.status in ("failed", "interrupted") else 0
    if args.command == "open":
        return _open(args, root, record)
    if not record.config_path:
        raise WorkspaceError(f"run {record.id} has no recorded configuration file; run the config again")
    config = load_config(record.config_path)
    record = Runner(config, root, remote=remote).run(record.id, None, beam_args)
    _report_run(args, root, remote, record)
    return 0


def _report_run(args: argparse.Namespace, root: Path, remote: str | None, record) -> None:
    summary = f"{Workspace(root, record.id, remote).location}/summary.json"
    if record.status == "no_data":
        text = f"run {record.id}: no data ({record.error}); nothing delivered"
    else:
        text = "\n".join([*record.outputs, f"run {record.id}: {record.status}; summary: {summary}"])
    _emit(args, record.to_dict() | {"summary": summary}, text)


def _open(args: argparse.Namespace, root: Path, record) -> int:
    """The run's map files and its dashboard page; --browser opens the page (the quicklook if no
    dashboard answers on --port)."""
    import socket
    import webbrowser

    deliver = root / record.id / "deliver"
    maps = sorted(str(p) for p in deliver.glob("*.tif")) + sorted(str(p) for p in deliver.glob("*.vrt"))
    quicklooks = sorted(str(p) for p in deliver.glob("*-quicklook.png"))
    url = f"http://127.0.0.1:{args.port}/#/runs/{record.id}"
    with socket.socket() as probe:
        probe.settimeout(0.5)
        serving = probe.connect_ex(("127.0.0.1", args.port)) == 0
    hint = "" if serving else f" (start it with: terrabeam serve --workspace {root} --port {args.port})"
    document = {
        "run": record.id,
        "status": record.status,
        "maps": maps,
        "quicklooks": quicklooks,
        "dashboard": url,
        "dashboard_running": serving,
    }
    lines = [f"run {record.id}: {record.status}", *(f"map        {m}" for m in maps)]
    lines += [f"quicklook  {q}" for q in quicklooks] + [f"dashboard  {url}{hint}"]
    _emit(args, document, "\n".join(lines))
    if args.browser:
        webbrowser.open(url if serving or not quicklooks else Path(quicklooks[0]).as_uri())
    return 0


def _schedule(
    config: PipelineConfig, root: Path, remote: str | None, args: argparse.Namespace, beam_args: list[str]
) -> int:
    import signal
    import threading

    from terrabeam.workflow.runner import Runner
    from terrabeam.workflow.schedule import Scheduler

    runner = Runner(config, root, remote=remote)
    scheduler = Scheduler(config, root, lambda window: runner.run(None, window, beam_args))
    if args.once:
        ran = scheduler.run_due()
        windows = [list(w) for w in ran]
        text = "\n".join(f"ran window {start}/{end}" for start, end in windows) or "no window due"
        _emit(args, {"windows_run": windows}, text)
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

    try:
        if name != "export":
            steps.check_run_grid(config, workspace, name)
        if name == "predict":  # alone, predict probes the model first (a run did so before export)
            return steps.predict_step(config, workspace, beam_args)
        return start_and_poll(
            task_for(name, config, workspace, beam_args, RunContext(workspace.run_id, created=time.time()))
        )
    except BaseException as exc:
        interrupt = find_cause(exc, KeyboardInterrupt)
        if interrupt is None:
            raise
        raise Interrupted(
            f"interrupted; {name} published nothing; run `terrabeam {name} {config.source_path} --run "
            f"{workspace.run_id}` to continue",
            signal_number(interrupt),
            workspace.run_id,
        ) from exc


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [name for action in parser._actions for name in action.option_strings]


def _beam_option_parser() -> argparse.ArgumentParser:
    """Apache Beam's own option parser, with every option its PipelineOptions classes define (as
    ``PipelineOptions.get_all_options`` builds it)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def check_extra_arguments(args: argparse.Namespace, extra: list[str]) -> None:
    """Arguments the sub-command does not know are errors (exit 2) with a suggestion, except Beam's
    own options where the command runs Beam: a misspelt --force must not pass to Beam silently."""
    own = _option_names(args.command_parser)
    beam: list[str] = []
    unknown = extra
    if extra and args.command in BEAM_COMMANDS:
        beam_parser = _beam_option_parser()
        beam = _option_names(beam_parser)
        _, unknown = beam_parser.parse_known_args(extra)
    for arg in unknown:
        if arg.startswith("-"):
            flag = arg.partition("=")[0]
            close = difflib.get_close_matches(flag, own, cutoff=0.75) or difflib.get_close_matches(
                flag, beam, cutoff=0.75
            )
            hint = f"; did you mean {close[0]}?" if close else ""
            what = (
                "a terrabeam or Apache Beam option" if beam else f"an option of '{args.command_parser.prog}'"
            )
            args.command_parser.error(f"unknown option {flag} (not {what}){hint}")
    if unknown:
        args.command_parser.error(f"unexpected arguments: {' '.join(unknown)}")


class _MessageLines(logging.Formatter):
    """``terrabeam: message`` (``terrabeam: warning: message`` from WARNING up), without -v."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"terrabeam: {level}{record.getMessage()}"


def _configure_logging(args: argparse.Namespace) -> None:
    """Routine messages (resuming, kept, nothing to do) at INFO, shown unless -q; problems at
    WARNING; -v adds Beam's INFO, logger names and tracebacks. One line per error: Beam logs a
    failed bundle's traceback at ERROR and harmless start-up warnings on the root logger; both only
    with --verbose. Configured before Beam is first imported."""
    verbose, quiet = args.verbose, args.quiet and not args.verbose
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _MessageLines()
    )
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, handlers=[handler])
    logging.getLogger("apache_beam").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if not verbose:  # numpy's RankWarning from Beam's batch-size estimator on a few timings
        warnings.filterwarnings("ignore", module=r"apache_beam(\.|$)")
    logging.getLogger("terrabeam").setLevel(logging.WARNING if quiet else logging.INFO)
    # the progress bar's stand-in off a terminal; -q silences it (and the bar: progress.py asks)
    logging.getLogger("terrabeam.progress").setLevel(logging.WARNING if quiet else logging.INFO)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread, so that a run records itself as
    interrupted and the command exits 130 / 143 with one line (SIGTERM would otherwise end the
    process silently, leaving the run 'running')."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    from terrabeam.process_memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any pipeline, model or GDAL thread starts
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    check_extra_arguments(args, extra)
    _configure_logging(args)
    try:
        with _interruptible():
            return _dispatch(args, extra)
    except BaseException as exc:  # the CLI boundary: report the cause in one line, never a traceback
        interrupt = find_cause(exc, KeyboardInterrupt)
        if interrupt is not None:
            message = interrupt if isinstance(interrupt, Interrupted) and interrupt.run_id else "interrupted"
            print(f"terrabeam: {message}", file=sys.stderr)
            return 128 + signal_number(interrupt)
        if not isinstance(exc, Exception) or args.verbose:
            raise
        print(f"terrabeam: error: {describe(exc)}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, beam_args: list[str]) -> int:
    from terrabeam.workflow import steps
    from terrabeam.workflow.runner import Runner

    if args.command == "completion":
        import shtab

        print(shtab.complete(build_parser(), shell=args.shell))
        return 0
    if args.command in ("runs", "status", "resume", "open"):
        return _history_command(args, beam_args)
    if args.command == "init":
        from terrabeam.starter_config import write_starter_config

        made = write_starter_config(args.rasters, args.model, args.out, args.name, args.force)
        text = (
            f"{args.out}: {len(made['bands'])} bands, model {made['model']['framework']}"
            f" ({made['model']['channels'] or '?'} channels, {made['model']['outputs'] or '?'} outputs); "
            f"check the lines marked CHECK, then: terrabeam validate {args.out}"
        )
        _emit(args, made, text)
        return 0
    if args.command == "inspect":
        from terrabeam.inspect import inspect_paths

        inspection = inspect_paths(args.paths)
        _emit(args, inspection.as_dict(), inspection.summary())
        return 0 if inspection.valid else 1
    if args.command == "serve":
        from terrabeam.serve.app import serve

        serve(args.workspace, args.host, args.port, args.basemap, args.verbose)
        return 0
    config = load_config(args.config)
    if args.command == "deploy":
        from terrabeam.deploy.gcp import render_gcp

        files = render_gcp(config, args.out)
        text = f"{args.out}: {len(files)} files; review them, then run {args.out / 'deploy.sh'}"
        _emit(args, {"out": str(args.out), "files": [str(f) for f in files]}, text)
        return 0
    if args.command == "compare-precision":
        from terrabeam.predict.precision import compare_precision

        with steps.gdal_env():
            report = compare_precision(config, args.precision, max(1, args.patches))
        d = report.as_dict()
        text = (
            f"{d['candidate']} vs {d['reference']} on {d['patches']} patches: "
            f"{100 * d['agreement']:.3f} % of pixels in the same class, largest difference "
            f"{d['max_abs_difference']:.4g}, {d['speed_ratio']:.2f}× the speed"
        )
        _emit(args, d, text)
        return 0
    if args.command == "plan":
        from terrabeam.plan import print_plan

        print_plan(config, args.json, calibrate=not args.no_calibrate)
        return 0
    if args.command == "validate":
        steps.validate(config)
        text = f"{args.config}: valid (config hash {config.fingerprint()})"
        _emit(args, {"config": str(args.config), "valid": True, "config_hash": config.fingerprint()}, text)
        return 0
    root, remote = _root(config, args)
    if args.command in ("run", "schedule"):
        from terrabeam.plan import check_limits

        check_limits(config, args.yes)
    if args.command == "schedule":
        return _schedule(config, root, remote, args, beam_args)
    if args.command == "run":
        runner = Runner(config, root, remote=remote)
        record = runner.run(args.run_id, args.window, beam_args, args.force, not args.no_wait)
        _report_run(args, root, remote, record)
        return 0
    if args.command == "predict":
        report_args = beam_args
    else:
        report_args = []
        steps.check_access(config)
    workspace = _workspace(config, args, new_run=args.command == "export")
    report = run_step_alone(args.command, config, workspace, report_args)
    document = {"run": workspace.run_id, "step": report.name, "seconds": round(report.seconds, 3)}
    document |= report.details
    shown = ", ".join(f"{k} {v}" for k, v in report.details.items() if not isinstance(v, list | dict))
    _emit(args, document, f"run {workspace.run_id}: {report.name} done in {report.seconds:.1f} s; {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
