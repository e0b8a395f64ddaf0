"""Exceptions a caller can act on: each names the file, field or record at fault."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class TerrabeamError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(TerrabeamError):
    """The pipeline configuration is invalid (field path, value and expectation in the message)."""


class InputError(TerrabeamError):
    """An input file is missing, unreadable or lacks a band."""


class GridMismatchError(TerrabeamError):
    """Inputs and the target grid (CRS, extent, patch size) do not fit together."""


class CorruptRecordError(TerrabeamError):
    """A TFRecord file fails its framing or CRC check (file and byte offset in the message)."""


class RecordCountError(TerrabeamError):
    """The number of records disagrees with the mixer's totalPatches."""


class ModelError(TerrabeamError):
    """The model cannot be loaded or does not fit the configured bands or patch size."""


class WorkspaceError(TerrabeamError):
    """The run workspace cannot be created or written."""


class NoDataError(TerrabeamError):
    """The run's window has no imagery (a STAC search found no Items): nothing to predict. The run is
    recorded as ``no_data``, not as failed; a schedule looks again if ``schedule.wait_for_data``."""


class TransientError(TerrabeamError):
    """A failure worth retrying: network trouble, HTTP 429/5xx, a lost worker."""


class DeployError(TerrabeamError):
    """A deployment cannot be rendered: the output folder or the files to bundle are not usable."""


class ServeError(TerrabeamError):
    """`terrabeam serve` cannot listen on the host and port asked for (in use, or not this machine's)."""


class DiskFullError(TerrabeamError):
    """No space left on the device being written (the path in the message): free space, then resume."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. ``signum`` makes the exit status (128 + signum); ``run_id`` names
    the run to resume, once the runner has recorded it as interrupted.

    All three values live in ``args``: Beam re-raises an error from a DoFn as ``type(exc)(args[0] +
    " [while running …]", *args[1:])``, which keeps them."""

    def __init__(
        self, message: str = "interrupted", signum: int = signal.SIGINT, run_id: str | None = None
    ) -> None:
        super().__init__(message, signum, run_id)

    @property
    def signum(self) -> int:
        return self.args[1]

    @property
    def run_id(self) -> str | None:
        return self.args[2]

    def __str__(self) -> str:
        return self.args[0]


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def find_cause(exc: BaseException | None, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s chain (Beam re-raises worker errors wrapped, or
    as a RuntimeError whose context is the original)."""
    return next((e for e in chain(exc) if isinstance(e, kind)), None)


def signal_number(interrupt: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: SIGINT for Python's own KeyboardInterrupt."""
    return interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT


# A Beam SDK worker in another process sends its error back as traceback text inside a RuntimeError.
_REMOTE_TRACEBACK = "Traceback (most recent call last)"
_REMOTE_OWN_ERROR = re.compile(r"^terrabeam\.errors\.\w+: (.+)$", re.MULTILINE)


def describe(exc: BaseException) -> str:
    """What went wrong, for a person: terrabeam's own error wherever it is in the chain or in a
    traceback a remote worker sent back; else the last line of such a traceback; else type and message."""
    cause = find_cause(exc, TerrabeamError)
    if cause is not None:
        return str(cause)
    text = str(exc)
    if _REMOTE_TRACEBACK in text:
        own = _REMOTE_OWN_ERROR.findall(text)
        return own[-1] if own else [line for line in text.splitlines() if line.strip()][-1].strip()
    return f"{type(exc).__name__}: {text}"
