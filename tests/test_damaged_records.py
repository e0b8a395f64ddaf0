"""Damaged shards through the steps: one line naming the shard and the byte or record, and a resume
that recovers. Synthetic scene and 1×1-conv model (tiny_pipeline); the damage is a single bit flip
that ISA-L itself rejects (IsalError, the error that used to escape) or a malformed Example."""

from __future__ import annotations

import json

from example_wire import length_delimited
from isal import igzip
from isal.isal_zlib import IsalError

from terrabeam.cli import main
from terrabeam.tfrecord import RecordWriter, read_records


def _isal_rejects(data: bytes) -> bytes:
    """``data`` with the first single-bit flip after the gzip header that ISA-L rejects as deflate."""
    for position in range(10, len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        try:
            igzip.decompress(bytes(flipped))
        except IsalError:
            return bytes(flipped)
        except (OSError, EOFError):  # caught by the gzip layer (CRC, length): not the case wanted
            continue
    raise AssertionError("no single-bit flip makes ISA-L fail")


def _fails(capsys, args, *fragments) -> None:
    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "IsalError" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"


def test_flipped_bit_in_an_export_shard_names_the_file_and_offset(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    shard = tmp_path / "ws" / "r" / "export" / "tiny-00001.tfrecord.gz"
    shard.write_bytes(_isal_rejects(shard.read_bytes()))
    _fails(capsys, ["predict", config, "--run", "r"], f"{shard}: unreadable in the record at byte ")


def test_damaged_kept_prediction_shard_is_predicted_again(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0  # the steps alone write interchange files
    assert main(["predict", str(config), "--run", "r"]) == 0
    run = tmp_path / "ws" / "r"
    shards = {p.name: p.read_bytes() for p in (run / "predict").glob("*.tfrecord.gz")}
    assert len(shards) > 2
    # What an interrupted predict leaves: its work folder with finished shards, one of them damaged.
    work = run / ".predict.work"
    (run / "predict").rename(work)
    damaged = sorted(shards)[1]
    (work / damaged).write_bytes(_isal_rejects(shards[damaged]))
    capsys.readouterr()
    assert main(["predict", str(config), "--run", "r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_reused"] == len(shards) - 1
    assert {p.name: p.read_bytes() for p in (run / "predict").glob("*.tfrecord.gz")} == shards


def _replace_record(shard, index: int, payload: bytes) -> None:
    records = list(read_records(shard))
    records[index] = payload
    with RecordWriter(shard) as writer:
        for record in records:
            writer.write(record)


# A Feature whose packed float list has 5 bytes: framing and CRCs are fine, protobuf rejects it.
_MALFORMED = length_delimited(
    1,
    length_delimited(
        1, length_delimited(1, b"red") + length_delimited(2, length_delimited(2, b"\x0a\x05" + bytes(5)))
    ),
)


def test_malformed_example_in_an_export_shard_names_shard_and_record(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    shard = tmp_path / "ws" / "r" / "export" / "tiny-00001.tfrecord.gz"
    _replace_record(shard, 1, _MALFORMED)
    _fails(capsys, ["predict", config, "--run", "r"], f"{shard} record 1: malformed tf.train.Example")


def test_malformed_example_in_a_prediction_shard_names_shard_and_record(tmp_path, tiny_pipeline, capsys):
    document, write = tiny_pipeline
    config = write()
    assert main(["export", str(config), "--run", "r"]) == 0
    assert main(["predict", str(config), "--run", "r"]) == 0
    shard = tmp_path / "ws" / "r" / "predict" / "predictions-00001.tfrecord.gz"
    _replace_record(shard, 1, _MALFORMED)
    _fails(capsys, ["deliver", config, "--run", "r"], f"{shard} record 1: malformed tf.train.Example")
