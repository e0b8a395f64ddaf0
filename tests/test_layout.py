"""Finding an export's files (layout.find_export): terrabeam's own names, and Earth Engine exports
named otherwise (one unnumbered shard, ``<prefix>mixer.json``, ``<prefix>.json``); an ambiguous
folder is an error listing what it holds. Empty shard files: only names matter here."""

from __future__ import annotations

import json

import pytest

from terrabeam.errors import InputError
from terrabeam.layout import find_export, list_shards

MIXER = {
    "projection": {"crs": "EPSG:32633", "affine": {"doubleMatrix": [10.0, 0.0, 0.0, 0.0, -10.0, 0.0]}},
    "patchDimensions": [8, 8],
    "patchesPerRow": 1,
    "totalPatches": 1,
}


def _files(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text(json.dumps(MIXER) if name.endswith(".json") else "")
    return folder


def test_terrabeams_own_layout(tmp_path):
    folder = _files(tmp_path / "x", "p-00001.tfrecord.gz", "p-00000.tfrecord.gz", "p-mixer.json")
    (folder / "p-manifest.json").write_text("{}")  # not a mixer: skipped even though it is .json
    files = find_export(folder, "p")
    assert (files.prefix, files.mixer.name, files.manifest.name) == ("p", "p-mixer.json", "p-manifest.json")
    assert [s.name for s in files.shards] == ["p-00000.tfrecord.gz", "p-00001.tfrecord.gz"]


def test_a_single_file_earth_engine_export_under_another_prefix(tmp_path):
    folder = _files(tmp_path / "x", "image_2021.tfrecord.gz", "image_2021.json")
    files = find_export(folder, "patches")
    assert (files.prefix, files.mixer.name, files.manifest) == ("image_2021", "image_2021.json", None)
    assert [s.name for s in files.shards] == ["image_2021.tfrecord.gz"]


def test_prefix_then_mixer_without_a_dash_and_shards_in_number_order(tmp_path):
    names = ["ee-00010.tfrecord", "ee-00002.tfrecord", "ee-00001.tfrecord", "eemixer.json", "other.json"]
    files = find_export(_files(tmp_path / "x", *names), "patches")
    assert files.mixer.name == "eemixer.json"  # named for the prefix: wins over any other .json
    assert [s.name for s in files.shards] == ["ee-00001.tfrecord", "ee-00002.tfrecord", "ee-00010.tfrecord"]


def test_the_configured_prefix_wins_over_other_exports(tmp_path):
    folder = _files(
        tmp_path / "x", "a-00000.tfrecord.gz", "b-00000.tfrecord.gz", "b-mixer.json", "a-mixer.json"
    )
    assert find_export(folder, "b").mixer.name == "b-mixer.json"


def test_an_explicit_mixer_wins(tmp_path):
    folder = _files(tmp_path / "x", "a.tfrecord.gz", "one.json", "two.json")
    assert find_export(folder, "a", tmp_path / "elsewhere.json").mixer == tmp_path / "elsewhere.json"


def test_a_year_in_the_name_is_not_a_shard_number(tmp_path):
    files = find_export(_files(tmp_path / "x", "image-2021.tfrecord.gz", "image-2021.json"), "patches")
    assert files.prefix == "image-2021"


@pytest.mark.parametrize(
    ("names", "fragments"),
    [
        (
            ["a-00000.tfrecord.gz", "b.tfrecord.gz", "a-mixer.json"],
            ["several exports", "a: 1 file(s); b: 1 file(s)"],
        ),
        (
            ["a.tfrecord.gz", "one.json", "two.json"],
            ["2 files could be the mixer of a", "one.json, two.json"],
        ),
        (["a.tfrecord.gz"], ["no mixer for a", "a-mixer.json", "amixer.json", "export.mixer"]),
        (["a.tfrecord.gz", "a-00000.tfrecord.gz", "a.json"], ["shards of a are ambiguous", "a.tfrecord.gz"]),
        (["a-00000.tfrecord", "a-00000.tfrecord.gz", "a.json"], ["shards of a are ambiguous"]),
        (["a.json"], ["no TFRecord shards"]),
    ],
)
def test_an_ambiguous_or_incomplete_folder_lists_what_it_found(tmp_path, names, fragments):
    folder = _files(tmp_path / "x", *names)
    with pytest.raises(InputError) as error:
        find_export(folder, "patches")
    for fragment in fragments:
        assert fragment in str(error.value)
    assert str(folder) in str(error.value)


def test_list_shards_names_both_forms_when_none_exist(tmp_path):
    with pytest.raises(InputError, match=r"p-NNNNN\.tfrecord\.gz or p\.tfrecord\.gz"):
        list_shards(tmp_path, "p")
