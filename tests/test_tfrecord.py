"""TFRecord framing and tf.train.Example coding, checked against independent implementations:
protoc-generated protobuf classes for Examples, and Apache Beam's TFRecord codec for framing.
Values are synthetic (random arrays), which is enough to cover the encodings."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from apache_beam.io.tfrecordio import _TFRecordUtil

from terrabeam.errors import CorruptRecordError
from terrabeam.tfrecord import (
    RecordWriter,
    decode_example,
    decode_varints,
    encode_example,
    encode_varints,
    frame_record,
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
