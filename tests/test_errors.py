"""One line per error, whatever Beam did to it: wrapped in the chain, or sent back by a worker in
another process as the text of its traceback."""

from __future__ import annotations

import signal

from terrabeam.errors import InputError, Interrupted, describe, find_cause, signal_number

# What the main process gets from a Beam SDK worker process (runner.workers: 2): a RuntimeError
# whose message is the worker's traceback, the error re-raised with the step appended.
REMOTE = """Traceback (most recent call last):
  File "apache_beam/runners/common.py", line 1512, in apache_beam.runners.common.DoFnRunner.process
  File "/src/terrabeam/predict/io.py", line 75, in process
    raise InputError(f"{where}: {exc}") from None
terrabeam.errors.InputError: a.tfrecord.gz record 0: malformed tf.train.Example: unsupported wire type 7

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "apache_beam/runners/common.py", line 1623, in apache_beam.runners.common.DoFnRunner._reraise_augmented
terrabeam.errors.InputError: a.tfrecord.gz record 0: malformed tf.train.Example: unsupported wire type 7 \
[while running 'DecodePatch']
"""


def test_describe_finds_terrabeams_error_in_the_chain_or_in_a_remote_traceback():
    try:
        try:
            raise InputError("a.tif: band 2 missing")
        except InputError as exc:
            raise RuntimeError("InputError: a.tif: band 2 missing [while running 'Read']") from exc
    except RuntimeError as wrapped:
        assert describe(wrapped) == "a.tif: band 2 missing"
    assert describe(RuntimeError(REMOTE)) == (
        "a.tfrecord.gz record 0: malformed tf.train.Example: unsupported wire type 7 [while running 'DecodePatch']"
    )
    other = REMOTE.replace("terrabeam.errors.InputError", "ValueError")
    assert describe(RuntimeError(other)).startswith("ValueError: a.tfrecord.gz record 0")
    assert describe(ValueError("bad")) == "ValueError: bad"


def test_an_interrupt_keeps_its_signal_through_beams_re_raise():
    original = Interrupted("interrupted by SIGTERM", signal.SIGTERM)
    # Beam's DoFnRunner._reraise_augmented: the same type, the step appended to args[0]
    again = type(original)(original.args[0] + " [while running 'RunInference']", *original.args[1:])
    assert signal_number(again) == signal.SIGTERM and str(again).endswith("[while running 'RunInference']")
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("KeyboardInterrupt [while running 'RunInference']")  # noqa: B904 - as Beam does
    except RuntimeError as wrapped:
        interrupt = find_cause(wrapped, KeyboardInterrupt)
    assert interrupt is not None and signal_number(interrupt) == signal.SIGINT
