"""decode_example and read_records against independent implementations on random inputs.

Examples come from tests/example_wire.py (every legal encoding) and are checked against the
protoc-generated classes: valid ones must decode to protobuf's answer, mutated ones (bit flips,
truncations, insertions, deletions) to protobuf's answer or, where protobuf rejects them, our
ValueError. TFRecord files (plain or gzip, forged length fields, then mutated) are checked against
Apache Beam's TFRecord codec over zlib. Sizes: ``make test`` runs 1 000 of each kind
(seeded, ~25 s), ``make test-slow`` 20 000 (random), ``make fuzz`` random ones for five minutes.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable

import pytest
from apache_beam.io.tfrecordio import _TFRecordUtil
from example_wire import EXAMPLE, mutated, protobuf_view, same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from terrabeam.errors import CorruptRecordError
from terrabeam.tfrecord import decode_example, masked_crc32c, read_records

CI_EXAMPLES, SLOW_EXAMPLES = 1_000, 20_000


def check_valid(pb2, data: bytes) -> None:
    theirs = protobuf_view(pb2, data)
    assert theirs is not None, f"the generator wrote an Example protobuf rejects: {data.hex()}"
    assert same(decode_example(data), theirs), data.hex()
    names = frozenset(list(theirs)[:1])
    assert same(decode_example(data, names), {n: v for n, v in theirs.items() if n in names}), data.hex()


def check_mutated(pb2, data: bytes) -> None:
    theirs = protobuf_view(pb2, data)
    if theirs is not None:
        assert same(decode_example(data), theirs), data.hex()
        return
    with pytest.raises(ValueError, match=r"^malformed tf\.train\.Example: .* at byte \d+$"):
        decode_example(data)


@st.composite
def record_files(draw) -> bytes:
    """A TFRecord file: Examples and random payloads framed, a length field perhaps forged with a
    valid CRC, perhaps gzip-compressed, then perhaps mutated."""
    payloads = draw(st.lists(EXAMPLE | st.binary(max_size=40), max_size=4))
    frames = [_frame(p) for p in payloads]
    if frames and draw(st.booleans()):
        at = draw(st.integers(0, len(frames) - 1))
        length = draw(st.sampled_from([2**40, 2**63, 2**64 - 1]) | st.integers(0, 200))
        length_bytes = struct.pack("<Q", length)
        frames[at] = length_bytes + struct.pack("<I", masked_crc32c(length_bytes)) + frames[at][12:]
    data = b"".join(frames)
    if draw(st.booleans()):
        data = gzip.compress(data, compresslevel=draw(st.sampled_from([1, 6, 9])), mtime=0)
    return draw(mutated(data)) if draw(st.booleans()) else data


def _frame(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    _TFRecordUtil.write_record(buffer, payload)
    return buffer.getvalue()


def _gunzip(data: bytes) -> bytes:
    """The gzip members in ``data`` decoded by zlib itself, which checks the optional header CRC as
    ISA-L does (Python's gzip module skips it). As ISA-L and gzip.GzipFile do, reserved header flag
    bits (zlib rejects them) and zero padding after a member are ignored: the data CRC still holds."""
    members = []
    while data:
        member = zlib.decompressobj(wbits=31)
        members.append(
            member.decompress(data[:3] + bytes([data[3] & 0x1F]) + data[4:] if len(data) > 3 else data)
        )
        if not member.eof:
            raise EOFError("gzip member cut short")
        data = member.unused_data.lstrip(b"\x00")
    return b"".join(members)


def _reference_records(data: bytes) -> list[bytes] | None:
    """Beam's codec over the bytes (gunzipped by zlib when they start with gzip's magic); None where
    either rejects them."""
    try:
        plain = _gunzip(data) if data[:2] == b"\x1f\x8b" else data
    except (EOFError, zlib.error):
        return None
    stream, records = io.BytesIO(plain), []
    while True:
        try:
            record = _TFRecordUtil.read_record(stream)
        except (ValueError, struct.error, OverflowError):  # OverflowError: a length of 2^63 or more
            return None
        if record is None:
            return records
        records.append(record)


def check_file(pb2, path, data: bytes) -> None:
    path.write_bytes(data)
    expected, records = _reference_records(data), []
    try:
        records.extend(read_records(path))
    except CorruptRecordError as exc:
        assert expected is None, f"{exc} for a file Beam reads: {data.hex()}"
        assert str(exc).startswith(f"{path}: ") and "at byte" in str(exc), exc
        return
    assert records == expected, data.hex()
    for record in records:
        check_mutated(pb2, record)


def run_property(strategy, check: Callable[[bytes], None], examples: int, seeded: bool) -> None:
    """``check`` on ``examples`` inputs drawn from ``strategy``; ``seeded`` makes them the same each run."""

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=seeded,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def holds(data: bytes) -> None:
        check(data)

    holds()


_SIZES = [
    pytest.param(CI_EXAMPLES, True, id=f"{CI_EXAMPLES}-seeded"),
    pytest.param(SLOW_EXAMPLES, False, id=f"{SLOW_EXAMPLES}", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("examples", "seeded"), _SIZES)
def test_valid_examples_decode_as_protobuf_parses_them(example_pb2, examples, seeded):
    run_property(EXAMPLE, lambda data: check_valid(example_pb2, data), examples, seeded)


@pytest.mark.parametrize(("examples", "seeded"), _SIZES)
def test_mutated_examples_decode_as_protobuf_or_raise(example_pb2, examples, seeded):
    run_property(EXAMPLE.flatmap(mutated), lambda data: check_mutated(example_pb2, data), examples, seeded)


@pytest.mark.parametrize(("examples", "seeded"), _SIZES)
def test_record_files_read_as_beam_reads_them_or_raise(example_pb2, tmp_path, examples, seeded):
    path = tmp_path / "fuzz.tfrecord"
    run_property(record_files(), lambda data: check_file(example_pb2, path, data), examples, seeded)


@pytest.mark.fuzz
def test_fuzz_framing_and_decoder(example_pb2, tmp_path):
    """``make fuzz``: the three properties in turn, random inputs, for TERRABEAM_FUZZ_SECONDS (300)."""
    seconds = float(os.environ.get("TERRABEAM_FUZZ_SECONDS", "300"))
    path, counts = tmp_path / "fuzz.tfrecord", Counter()

    def counted(kind: str, check: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def run(data: bytes) -> None:
            counts[kind] += 1
            check(data)

        return run

    properties = [
        (EXAMPLE, counted("valid Examples", lambda data: check_valid(example_pb2, data))),
        (
            EXAMPLE.flatmap(mutated),
            counted("mutated Examples", lambda data: check_mutated(example_pb2, data)),
        ),
        (record_files(), counted("TFRecord files", lambda data: check_file(example_pb2, path, data))),
    ]
    start = time.monotonic()
    for strategy, check in itertools.cycle(properties):
        if time.monotonic() - start >= seconds:
            break
        run_property(strategy, check, 500, seeded=False)
    elapsed = time.monotonic() - start
    print(
        f"\nfuzz: {', '.join(f'{n} {kind}' for kind, n in counts.items())} in {elapsed:.0f} s; no disagreement"
    )
