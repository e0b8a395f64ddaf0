"""TFRecord framing and tf.train.Example coding, checked against independent implementations:
protoc-generated protobuf classes for Examples, and Apache Beam's TFRecord codec for framing.
Values are synthetic (random arrays), which is enough to cover the encodings."""

from __future__ import annotations

import gzip
import io
import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
from apache_beam.io.tfrecordio import _TFRecordUtil
from example_wire import (
    END_GROUP,
    FIXED32,
    FIXED64,
    START_GROUP,
    VARINT,
    length_delimited,
    protobuf_view,
    same,
    tag,
    varint,
)

from terrabeam.errors import CorruptRecordError
from terrabeam.tfrecord import (
    RecordWriter,
    decode_example,
    decode_varints,
    encode_example,
    encode_varints,
    frame_record,
    masked_crc32c,
    read_records,
)

rng = np.random.default_rng(7)


def _oracle_example(pb2, features: dict) -> bytes:
    example = pb2.Example()
    for name, values in features.items():
        feature = example.features.feature[name]
        if np.issubdtype(values.dtype, np.floating):
            feature.float_list.value.extend(values.ravel().tolist())
        else:
            feature.int64_list.value.extend(values.ravel().tolist())
    return example.SerializeToString(deterministic=True)


def _patch_features() -> dict:
    return {
        "B2": rng.normal(size=(3, 5)).astype(np.float32),
        "ndvi": np.array([np.nan, np.inf, -0.0, 1e-38, 3.4e38], dtype=np.float32),
        "class": rng.integers(0, 3, size=(3, 5)),
        "big": np.array([0, 1, 127, 128, 300, 2**31, 2**62, -1, -(2**63), 2**63 - 1], dtype=np.int64),
        "empty": np.zeros(0, dtype=np.float32),
    }


def test_encode_is_bit_identical_to_protobuf(example_pb2):
    features = _patch_features()
    assert encode_example(features) == _oracle_example(example_pb2, features)


def test_decode_reads_protobuf_bytes_exactly(example_pb2):
    features = _patch_features()
    decoded = decode_example(_oracle_example(example_pb2, features))
    assert sorted(decoded) == sorted(features)
    for name, values in features.items():
        expected = values.ravel()
        assert decoded[name].dtype == (np.float32 if expected.dtype == np.float32 else np.int64)
        np.testing.assert_array_equal(decoded[name].view(np.uint8), expected.view(np.uint8))


def test_protobuf_parses_our_bytes(example_pb2):
    features = {"a": rng.normal(size=(256, 256)).astype(np.float32), "c": rng.integers(-5, 500, 1000)}
    parsed = example_pb2.Example.FromString(encode_example(features))
    np.testing.assert_array_equal(
        np.array(parsed.features.feature["a"].float_list.value, np.float32), features["a"].ravel()
    )
    assert list(parsed.features.feature["c"].int64_list.value) == features["c"].tolist()


def test_decode_accepts_unpacked_floats_and_bytes_lists(example_pb2):
    # Unpacked repeated floats are legal on the wire; protobuf writes them for [packed=false] fields.
    example = example_pb2.Example()
    example.features.feature["names"].bytes_list.value.extend([b"x", b"yz"])
    data = bytearray(example.SerializeToString())
    unpacked_floats = b"".join(b"\x0d" + np.float32(v).tobytes() for v in (1.5, -2.0))
    float_list = b"\x12" + bytes([len(unpacked_floats)]) + unpacked_floats
    entry = b"\x0a\x01f" + b"\x12" + bytes([len(float_list)]) + float_list
    features_msg = b"\x0a" + bytes([len(entry)]) + entry
    data = b"\x0a" + bytes([len(features_msg)]) + features_msg
    assert decode_example(data)["f"].tolist() == [1.5, -2.0]
    assert decode_example(example.SerializeToString())["names"] == [b"x", b"yz"]


def test_decode_selected_names_only():
    data = encode_example({"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)})
    assert list(decode_example(data, frozenset({"b"}))) == ["b"]


def test_varints_round_trip_and_match_protobuf_for_negative_values(example_pb2):
    values = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64), [0, 1, -1, 127, 128]])
    encoded = encode_varints(values)
    np.testing.assert_array_equal(decode_varints(encoded), values)
    msg = example_pb2.Int64List(value=values.tolist())
    assert msg.SerializeToString().endswith(encoded)


def test_malformed_example_raises_value_error():
    with pytest.raises(ValueError, match="malformed"):
        decode_example(b"\x0a\x05\x0a\x03ab")


@pytest.mark.parametrize("level", [0, 1, 3])
def test_framing_matches_beam_codec(tmp_path, level):
    payloads = [b"", b"x", rng.bytes(100_000)]
    path = tmp_path / ("r.tfrecord.gz" if level else "r.tfrecord")
    with RecordWriter(path, level) as writer:
        for p in payloads:
            writer.write(p)
    raw = path.read_bytes()
    plain = gzip.decompress(raw) if level else raw
    beam_buffer = io.BytesIO()
    for p in payloads:
        _TFRecordUtil.write_record(beam_buffer, p)
    assert plain == beam_buffer.getvalue()
    assert list(read_records(path)) == payloads
    assert b"".join(frame_record(p) for p in payloads) == plain


def test_reads_beam_written_gzip_file(tmp_path):
    path = tmp_path / "beam.tfrecord.gz"
    with gzip.open(path, "wb") as f:
        for p in (b"alpha", b"beta"):
            _TFRecordUtil.write_record(f, p)
    assert list(read_records(path)) == [b"alpha", b"beta"]


def _corrupt(path, offset):
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[offset] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(data)))


def test_corrupted_payload_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.tfrecord.gz"
    with RecordWriter(path) as writer:
        for p in (b"a" * 10, b"b" * 20, b"c" * 30):
            writer.write(p)
    second = 16 + 10  # the second record starts after one 10-byte record and its 16 framing bytes
    _corrupt(path, second + 12 + 5)
    records = read_records(path)
    assert next(records) == b"a" * 10
    with pytest.raises(
        CorruptRecordError, match=rf"bad\.tfrecord\.gz: data CRC mismatch in record at byte {second}"
    ):
        next(records)


def test_corrupted_length_and_truncation(tmp_path):
    path = tmp_path / "len.tfrecord"
    with RecordWriter(path, 0) as writer:
        writer.write(b"hello")
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match="length CRC mismatch in record at byte 0"):
        list(read_records(path))
    path.write_bytes(frame_record(b"hello")[:-3])
    with pytest.raises(CorruptRecordError, match="truncated record at byte 0"):
        list(read_records(path))


def test_truncated_gzip_stream_is_reported(tmp_path):
    path = tmp_path / "cut.tfrecord.gz"
    with RecordWriter(path) as writer:
        writer.write(rng.bytes(50_000))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CorruptRecordError, match="cut.tfrecord.gz"):
        list(read_records(path))


# --- protobuf's answer for every legal encoding, an error for every malformed one ----------------


def _example_with(feature: bytes, key: bytes = b"a") -> bytes:
    """An Example holding one map entry whose Feature message is ``feature``."""
    return length_delimited(1, length_delimited(1, length_delimited(1, key) + length_delimited(2, feature)))


def _float(value: float) -> bytes:
    return np.float32(value).tobytes()


def _agrees_with_protobuf(pb2, data: bytes) -> dict:
    theirs = protobuf_view(pb2, data)
    assert theirs is not None, "protobuf rejects the test input"
    ours = decode_example(data)
    assert same(ours, theirs), (ours, theirs)
    return ours


def test_unpacked_then_packed_values_keep_wire_order(example_pb2):
    floats = tag(1, FIXED32) + _float(1.0) + length_delimited(1, _float(2.0) + _float(3.0))
    assert _agrees_with_protobuf(example_pb2, _example_with(length_delimited(2, floats)))["a"].tolist() == [
        1,
        2,
        3,
    ]
    ints = (
        tag(1, VARINT) + varint(1) + length_delimited(1, varint(2) + varint(3)) + tag(1, VARINT) + varint(4)
    )
    assert _agrees_with_protobuf(example_pb2, _example_with(length_delimited(3, ints)))["a"].tolist() == [
        1,
        2,
        3,
        4,
    ]


_ONE, _TWO = (
    length_delimited(2, length_delimited(1, _float(1.0))),
    length_delimited(2, length_delimited(1, _float(2.0))),
)


def _entry(key: bytes, *features: bytes) -> bytes:
    return length_delimited(1, length_delimited(1, key) + b"".join(length_delimited(2, f) for f in features))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(_example_with(_ONE + _TWO), {"a": [1.0, 2.0]}, id="float_list twice merges"),
        pytest.param(
            _example_with(_ONE + length_delimited(1, length_delimited(1, b"x")) + _TWO),
            {"a": [2.0]},
            id="another oneof kind replaces",
        ),
        pytest.param(
            length_delimited(1, _entry(b"a", _ONE, _TWO)), {"a": [1.0, 2.0]}, id="entry value twice merges"
        ),
        pytest.param(
            length_delimited(1, _entry(b"a", _ONE) + _entry(b"a", _TWO)), {"a": [2.0]}, id="last entry wins"
        ),
        pytest.param(
            length_delimited(1, _entry(b"a", _ONE)) + length_delimited(1, _entry(b"b", _TWO)),
            {"a": [1.0], "b": [2.0]},
            id="features twice merge",
        ),
        pytest.param(
            length_delimited(
                1,
                _entry(b"a", _ONE)
                + length_delimited(1, length_delimited(1, b"a") + tag(3, VARINT) + b"\x01"),
            ),
            {"a": [1.0]},
            id="entry with an unknown field is dropped",
        ),
    ],
)
def test_repeated_messages_merge_as_protobuf_merges(example_pb2, data, expected):
    ours = _agrees_with_protobuf(example_pb2, data)
    assert {name: values.tolist() for name, values in ours.items()} == expected


def test_wrong_wire_type_is_an_unknown_field(example_pb2):
    assert (
        _agrees_with_protobuf(example_pb2, _example_with(length_delimited(1, tag(1, VARINT) + b"\x05")))["a"]
        == []
    )
    floats = tag(1, VARINT) + b"\x05" + tag(1, FIXED64) + bytes(8) + tag(1, FIXED32) + _float(7.0)
    assert _agrees_with_protobuf(example_pb2, _example_with(length_delimited(2, floats)))["a"].tolist() == [
        7.0
    ]
    ints = tag(1, FIXED32) + bytes(4) + tag(1, START_GROUP) + tag(2, VARINT) + b"\x01" + tag(1, END_GROUP)
    assert _agrees_with_protobuf(example_pb2, _example_with(length_delimited(3, ints)))["a"].tolist() == []


def test_ten_byte_varints_wrap_mod_2_64_as_protobuf(example_pb2):
    wide = varint(2**64 + 5)  # 10 bytes; protobuf keeps the low 64 bits
    ints = tag(1, VARINT) + wide + length_delimited(1, wide + b"\xff" * 9 + b"\x7f")
    assert _agrees_with_protobuf(example_pb2, _example_with(length_delimited(3, ints)))["a"].tolist() == [
        5,
        5,
        -1,
    ]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            _example_with(length_delimited(3, tag(1, VARINT) + b"\xff" * 10 + b"\x01")), id="unpacked"
        ),
        pytest.param(
            _example_with(length_delimited(3, length_delimited(1, b"\xff" * 10 + b"\x01"))), id="packed"
        ),
        pytest.param(b"\x0a" + b"\x80" * 10 + b"\x00", id="length"),
        pytest.param(b"\x88\x80\x80\x80\x80\x00", id="6-byte tag"),
    ],
)
def test_varint_longer_than_10_bytes_is_rejected(example_pb2, data):
    assert protobuf_view(example_pb2, data) is None
    with pytest.raises(ValueError, match="malformed tf.train.Example: .* at byte"):
        decode_example(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            _example_with(length_delimited(2, tag(1, FIXED32) + b"\x00\x00")), id="fixed32 in a list"
        ),
        pytest.param(b"\x15\x00\x00\x00", id="fixed32 at the end"),
        pytest.param(b"\x11" + bytes(7), id="fixed64 at the end"),
        pytest.param(
            _example_with(length_delimited(2, length_delimited(1, bytes(5)))), id="packed floats, 5 bytes"
        ),
        pytest.param(b"\x0b\x08\x01", id="unclosed group"),
        pytest.param(b"\x0c", id="stray end-group"),
        pytest.param(_example_with(b"", key=b"\xff"), id="feature name not UTF-8"),
    ],
)
def test_malformed_input_raises_value_error_naming_the_byte(example_pb2, data):
    assert protobuf_view(example_pb2, data) is None
    with pytest.raises(ValueError, match=r"malformed tf.train.Example: .* at byte \d+"):
        decode_example(data)


@pytest.mark.parametrize("where", ["length", "value"])
def test_megabyte_varint_fails_in_linear_time(where):
    huge = b"\xff" * 10**6 + b"\x01"
    data = b"\x0a" + huge if where == "length" else _example_with(length_delimited(3, tag(1, VARINT) + huge))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="varint longer than 10 bytes"):
        decode_example(data)
    assert time.perf_counter() - start < 5  # protobuf stops after 10 bytes; so must we (was 37 s)


def _forged_length(length: int) -> bytes:
    """A record header announcing ``length`` payload bytes, with a valid length CRC, and a little data."""
    length_bytes = struct.pack("<Q", length)
    return length_bytes + struct.pack("<I", masked_crc32c(length_bytes)) + b"payload" * 3


@pytest.mark.parametrize("length", [2**40, 2**63, 2**64 - 1])
@pytest.mark.parametrize("compressed", [False, True])
def test_huge_record_length_is_corrupt_without_allocating_it(tmp_path, length, compressed):
    path = tmp_path / ("huge.tfrecord.gz" if compressed else "huge.tfrecord")
    data = frame_record(b"first") + _forged_length(length)
    path.write_bytes(gzip.compress(data) if compressed else data)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptRecordError, match=r"huge\.tfrecord(\.gz)?: truncated record at byte 21"):
            list(read_records(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # the read chunk (4 MiB) at most, not the length announced


def test_flipped_bit_anywhere_in_a_gzip_shard_names_file_and_offset(tmp_path):
    """Every single-bit flip of a small prediction-like shard: ISA-L's IsalError, zlib's errors and
    gzip's BadGzipFile all become CorruptRecordError; a flip deflate does not notice reads as before."""
    path = tmp_path / "flip.tfrecord.gz"
    with RecordWriter(path, 1) as writer:
        for i in range(3):
            writer.write(encode_example({"class": (np.arange(4000) // 7 + i) % 3}))
    data, original = path.read_bytes(), list(read_records(path))
    errors = 0
    for position in range(len(data)):
        for bit in (0x01, 0x10):
            flipped = bytearray(data)
            flipped[position] ^= bit
            path.write_bytes(bytes(flipped))
            try:
                assert list(read_records(path)) == original
            except CorruptRecordError as exc:
                assert re.match(r".*flip\.tfrecord\.gz: .*at byte \d+", str(exc)), exc
                errors += 1
    assert errors > len(data)
