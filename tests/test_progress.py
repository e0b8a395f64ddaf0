"""Progress: a tqdm bar on a terminal, log lines at each 10 % elsewhere."""

from __future__ import annotations

import io
import logging

from terrabeam.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="terrabeam.progress")
    with Progress("predict", 40, stream=io.StringIO()) as progress:
        for _ in range(40):
            progress.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("predict: 4/40 patches") and lines[-1].startswith("predict: 40/40 patches")
    assert "ETA" in lines[0]


def test_bar_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="terrabeam.progress")
    terminal = _Terminal()
    with Progress("export", 5, stream=terminal) as progress:
        progress.advance(5)
    assert "export" in terminal.getvalue() and "5/5" in terminal.getvalue()
    assert caplog.records == []


def test_quiet_shows_neither_bar_nor_lines(caplog):
    """terrabeam -q sets the progress logger to WARNING."""
    logger = logging.getLogger("terrabeam.progress")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        terminal = _Terminal()
        with Progress("export", 5, stream=terminal) as progress:
            progress.advance(5)
    finally:
        logger.setLevel(before)
    assert terminal.getvalue() == "" and caplog.records == []
