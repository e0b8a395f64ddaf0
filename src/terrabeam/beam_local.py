"""Beam's local runner kept to this machine: the gRPC servers it opens listen on loopback only, and
the SDK worker processes it starts die with the process that started them.

Beam's Fn API servers (``worker_handlers.GrpcServer``: control, data, state, logging; a logging
server per subprocess worker; the LOOPBACK worker pool; a job service's artifact server) bind
``[::]:0`` with nothing to configure it and no authentication, and hand their workers
``localhost:PORT``. ``bind_loopback`` makes those modules bind ``localhost`` instead; nothing else
changes. Beam's ``multi_processing`` mode starts each worker as ``sh -c "python -m …sdk_worker_main"``:
a shell in between, and no link to the runner's life, so a worker started just before the runner is
killed waits for minutes. ``pipeline`` gives that mode a worker command that ``exec``s this module,
which asks Linux to kill the worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

Beam's state sampler (``statesampler.StateSampler``: the thread that samples which step a bundle is
in, for its per-step time counters) sleeps up to 200 ms between samples, and a bundle cannot end
before that sleep does: every stage of a local run waited 0–200 ms after its last element (light
model, 16× demo scene: up to a tenth of the run; BENCHMARKS.md). ``prompt_state_sampler`` caps the
sleep at ``STATE_SAMPLING_PERIOD_MS`` here and in the worker processes started here.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import sys
from typing import Any

import apache_beam as beam
import grpc
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.portability import abstract_job_service, local_job_service
from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers
from apache_beam.runners.worker import statesampler, worker_pool_main
from apache_beam.transforms.environments import SubprocessSDKEnvironment

# Every Beam module that opens a gRPC server on a wildcard address.
_SERVER_MODULES = (worker_handlers, local_job_service, abstract_job_service, worker_pool_main)
_WILDCARD_HOSTS = ("[::]", "0.0.0.0", "")
_LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STATE_SAMPLING_PERIOD_MS = 10  # Beam: 200; the sampler thread wakes without the GIL


def loopback_address(address: str) -> str:
    """``[::]:PORT`` / ``0.0.0.0:PORT`` → ``localhost:PORT``; any other address as it is."""
    host, _, port = address.rpartition(":")
    return f"localhost:{port}" if host in _WILDCARD_HOSTS else address


class _LoopbackGrpc:
    """The ``grpc`` module as Beam's server modules see it: the same, except that the servers they
    create bind loopback where they ask for every interface."""

    def __getattr__(self, name: str) -> Any:
        return getattr(grpc, name)

    @staticmethod
    def server(*args: Any, **kwargs: Any) -> grpc.Server:
        server = grpc.server(*args, **kwargs)
        bind = server.add_insecure_port
        server.add_insecure_port = lambda address: bind(loopback_address(address))
        return server


def bind_loopback() -> None:
    """Make every gRPC server Beam's Python runners open in this process listen on loopback only."""
    for module in _SERVER_MODULES:
        if not isinstance(module.grpc, _LoopbackGrpc):
            module.grpc = _LoopbackGrpc()


class _PromptStateSampler(statesampler.StateSampler):
    """Beam's state sampler with a short sampling period, so a bundle ends soon after its last
    element (``StateSampler.stop`` joins the sampling thread, which may be asleep for a period)."""

    def __init__(self, prefix: str, counter_factory: Any, sampling_period_ms: int = STATE_SAMPLING_PERIOD_MS):
        super().__init__(prefix, counter_factory, min(sampling_period_ms, STATE_SAMPLING_PERIOD_MS))


def prompt_state_sampler() -> None:
    """Make the bundles Beam's Python SDK runs in this process use ``_PromptStateSampler`` (its
    bundle processor looks ``statesampler.StateSampler`` up when it builds one)."""
    statesampler.StateSampler = _PromptStateSampler  # type: ignore[misc]


def worker_command() -> str:
    """The shell command of a local SDK worker process that dies with this process."""
    return f"exec {shlex.quote(sys.executable)} -m terrabeam.beam_local {os.getpid()}"


def pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A Beam pipeline for ``options`` whose local servers bind loopback; on the local runner in
    ``multi_processing`` mode its worker processes are started with ``worker_command``. Bundles
    run in this process end promptly (``prompt_state_sampler``)."""
    bind_loopback()
    prompt_state_sampler()
    direct = options.view_as(DirectOptions)
    local = options.view_as(StandardOptions).runner in _LOCAL_RUNNERS
    if not (local and direct.direct_running_mode == "multi_processing"):
        return beam.Pipeline(options=options)
    # FnApiRunner replaces its default environment with Beam's own worker command in this mode; in
    # the default mode it keeps the one given here, and runs direct_num_workers of them all the same.
    direct.direct_running_mode = "in_memory"
    environment = SubprocessSDKEnvironment.from_command_string(worker_command())
    return beam.Pipeline(runner=FnApiRunner(default_environment=environment), options=options)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (Linux); exit now if it has."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(f"terrabeam worker: the runner (pid {parent}) is gone")


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[1]))
    prompt_state_sampler()
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)
