"""tf.train.Example bytes written with every legal encoding, and protobuf's parse of any bytes.

The encoder is independent of terrabeam's: it writes values unpacked or packed (mixed in one list),
repeats and merges messages, pads varints to non-minimal lengths and adds unknown fields, including
known field numbers with an unexpected wire type. Hypothesis strategies build valid Examples and
TFRecord files from it, and mutate them. ``protobuf_view`` turns protoc-generated classes' parse
into decode_example's terms, so the tests compare the two directly.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
from hypothesis import strategies as st

VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = range(6)
KEYS = ["a", "b", "B2", "", "é", "名前", "prob_water"]  # few, so that entries repeat keys


def varint(value: int, pad: int = 0) -> bytes:
    """``value`` as a varint, made ``pad`` bytes longer than needed (protobuf accepts that)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value and not pad:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)
        if not value:
            pad -= 1


def tag(field: int, wire: int, pad: int = 0) -> bytes:
    return varint(field << 3 | wire, pad)


def length_delimited(field: int, payload: bytes, pad: int = 0) -> bytes:
    return tag(field, LEN) + varint(len(payload), pad) + payload


# Strategies are built once and reused: Hypothesis validates each new strategy object, which
# would otherwise cost more than the tests themselves.
_COUNT = [st.integers(0, n) for n in range(11)]
_PAD = [st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, n)) for n in range(10)]
_UINT64 = st.integers(0, 2**64 - 1)
_FLOAT32 = st.floats(width=32)


@functools.cache
def unknown_field(field: int | None = None, known: tuple[int, ...] = (), depth: int = 2):
    """A well-formed field the message does not declare: a new number, or ``field`` with a wire type
    other than its ``known`` ones; groups nest ``depth`` deep."""
    numbers = st.just(field) if field is not None else st.integers(4, 2**29 - 1) | st.integers(4, 40)
    wires = st.sampled_from(
        [w for w in (VARINT, FIXED64, LEN, FIXED32, START_GROUP)[: 5 if depth else 4] if w not in known]
    )
    inner = st.lists(unknown_field(depth=depth - 1), max_size=2) if depth else st.nothing()

    @st.composite
    def draw_field(draw) -> bytes:
        number, wire = draw(numbers), draw(wires)
        head = tag(number, wire)
        if wire == VARINT:
            value = draw(_UINT64)
            return head + varint(value, draw(_PAD[10 - len(varint(value))]))
        if wire in (FIXED64, FIXED32):
            return head + draw(
                st.binary(min_size=8 if wire == FIXED64 else 4, max_size=8 if wire == FIXED64 else 4)
            )
        if wire == LEN:
            body = draw(st.binary(max_size=6))
            return head + varint(len(body)) + body
        return head + b"".join(draw(inner)) + tag(number, END_GROUP)

    return draw_field()


@functools.cache
def stray_field(numbers: tuple[int, ...], declared: tuple[tuple[int, tuple[int, ...]], ...]):
    """An unknown field numbered from ``numbers``; a ``declared`` number gets another wire type."""
    known = dict(declared)
    return st.one_of([unknown_field(field=n, known=known.get(n, ())) for n in numbers])


@functools.cache
def value_list(kind: int):
    """A BytesList (kind 1), FloatList (2) or Int64List (3): value fields in any mix of encodings."""
    stray = stray_field((1, 2, 7), ((1, (LEN, {1: LEN, 2: FIXED32, 3: VARINT}[kind])),))
    byte_strings = st.binary(max_size=5)
    floats = st.lists(_FLOAT32, max_size=5)
    wide = st.integers(0, 2**70 - 1)  # an unpacked int64 of up to 10 bytes, taken mod 2^64
    int64s = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5)

    @st.composite
    def draw_list(draw) -> bytes:
        parts = []
        for _ in range(draw(_COUNT[4])):
            choice = draw(_COUNT[4])
            if choice == 0:
                parts.append(draw(stray))
            elif kind == 1:
                parts.append(length_delimited(1, draw(byte_strings), draw(_PAD[2])))
            elif kind == 2 and choice == 1:
                parts.append(tag(1, FIXED32, draw(_PAD[2])) + struct.pack("<f", draw(_FLOAT32)))
            elif kind == 2:
                packed = b"".join(struct.pack("<f", v) for v in draw(floats))
                parts.append(length_delimited(1, packed, draw(_PAD[2])))
            elif choice == 1:
                parts.append(tag(1, VARINT) + varint(draw(wide)))
            else:
                packed = b"".join(
                    varint(n % 2**64, draw(_PAD[10 - len(varint(n % 2**64))])) for n in draw(int64s)
                )
                parts.append(length_delimited(1, packed))
        return b"".join(parts)

    return draw_list()


@st.composite
def _feature(draw) -> bytes:
    """A Feature: oneof members in any order and number (same kind merges, another kind replaces)."""
    parts = []
    for _ in range(draw(_COUNT[3])):
        if draw(_COUNT[5]) == 0:
            parts.append(draw(stray_field((1, 2, 3, 9), ((1, (LEN,)), (2, (LEN,)), (3, (LEN,))))))
        else:
            kind = draw(_KIND)
            parts.append(length_delimited(kind, draw(value_list(kind)), draw(_PAD[2])))
    return b"".join(parts)


_KIND = st.sampled_from([1, 2, 3])
_KEY = st.sampled_from(KEYS)
FEATURE = _feature()


@st.composite
def _map_entry(draw) -> bytes:
    """A Features map entry: key and value each absent, once or repeated; rarely an unknown field,
    which makes protobuf drop the entry."""
    parts = [length_delimited(1, draw(_KEY).encode()) for _ in range(draw(_COUNT[2]))]
    parts += [length_delimited(2, draw(FEATURE)) for _ in range(draw(_COUNT[2]))]
    if draw(_COUNT[9]) == 0:
        parts.append(draw(stray_field((1, 2, 3), ((1, (LEN,)), (2, (LEN,))))))
    return b"".join(draw(st.permutations(parts)))


MAP_ENTRY = _map_entry()


@st.composite
def _example(draw) -> bytes:
    """A serialized Example protobuf parses: Features given once or more, unknown fields anywhere."""
    parts = []
    for _ in range(draw(_COUNT[2])):
        entries = [length_delimited(1, draw(MAP_ENTRY), draw(_PAD[2])) for _ in range(draw(_COUNT[4]))]
        if draw(st.booleans()):
            entries.append(draw(stray_field((1, 2), ((1, (LEN,)),))))
        parts.append(length_delimited(1, b"".join(draw(st.permutations(entries)))))
    if draw(_COUNT[3]) == 0:
        parts.append(draw(stray_field((1, 2, 5), ((1, (LEN,)),))))
    return b"".join(draw(st.permutations(parts)))


EXAMPLE = _example()


# --- mutations -----------------------------------------------------------------------------------

_INTERESTING = [0x00, 0x01, 0x07, 0x0A, 0x0B, 0x0C, 0x0D, 0x12, 0x1A, 0x7F, 0x80, 0xFF]


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` after one to three bit flips, truncations, insertions, deletions or overwrites."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and out:
            bit = draw(st.integers(0, 8 * len(out) - 1))
            out[bit // 8] ^= 1 << (bit % 8)
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(
                st.binary(min_size=1, max_size=12) | st.sampled_from([bytes([b]) for b in _INTERESTING])
            )
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif out:
            out[min(at, len(out) - 1)] = draw(st.sampled_from(_INTERESTING))
    return bytes(out)


# --- protobuf's answer ---------------------------------------------------------------------------


def protobuf_view(pb2, data: bytes) -> dict[str, np.ndarray | list[bytes]] | None:
    """What protobuf parses from ``data`` in decode_example's terms; None where protobuf rejects it."""
    try:
        parsed = pb2.Example.FromString(data)
    except Exception:  # google.protobuf.message.DecodeError, the one error FromString raises
        return None
    view: dict[str, np.ndarray | list[bytes]] = {}
    for name, value in parsed.features.feature.items():
        kind = value.WhichOneof("kind")
        if kind == "bytes_list":
            view[name] = list(value.bytes_list.value)
        elif kind == "int64_list":
            view[name] = np.array(value.int64_list.value, dtype=np.int64)
        else:  # a Feature with no kind decodes as an empty float list
            view[name] = np.array(value.float_list.value if kind else [], dtype=np.float32)
    return view


def same(ours: dict, theirs: dict) -> bool:
    """Equal names, kinds and values; floats bit for bit (NaN to NaN: protobuf hands them over as
    Python floats, which may quiet a signalling NaN)."""
    if ours.keys() != theirs.keys():
        return False
    for name, expected in theirs.items():
        got = ours[name]
        if isinstance(expected, list):
            if got != expected:
                return False
        elif not isinstance(got, np.ndarray) or got.dtype != expected.dtype or got.shape != expected.shape:
            return False
        elif expected.dtype == np.float32:
            nan = np.isnan(expected)
            if not np.array_equal(np.isnan(got), nan) or not np.array_equal(
                got[~nan].view(np.uint32), expected[~nan].view(np.uint32)
            ):
                return False
        elif not np.array_equal(got, expected):
            return False
    return True
