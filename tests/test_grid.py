"""The grid / mixer.json: exact round trips and pixel-exact windows on non-square patches and grids."""

from __future__ import annotations

import json

import pytest
from affine import Affine

from terrabeam.errors import GridMismatchError
from terrabeam.grid import Grid, PatchWindow

# A mixer as Earth Engine writes it (field names and order of the affine as in its exports).
EE_MIXER = {
    "projection": {
        "crs": "EPSG:32633",
        "affine": {"doubleMatrix": [20.0, 0.0, 330000.0, 0.0, -20.0, 5822040.0]},
    },
    "patchDimensions": [256, 128],
    "patchesPerRow": 3,
    "totalPatches": 6,
}


def test_mixer_round_trips_exactly(tmp_path):
    grid = Grid.from_mixer(EE_MIXER)
    assert grid.to_mixer() == EE_MIXER
    path = tmp_path / "p-mixer.json"
    grid.write_mixer(path)
    assert json.loads(path.read_text()) == EE_MIXER
    assert Grid.read_mixer(path) == grid


def test_double_matrix_is_affine_order_not_gdal_order():
    grid = Grid.from_mixer(
        EE_MIXER
        | {"projection": {"crs": "EPSG:32633", "affine": {"doubleMatrix": [10, 1, 500, 2, -30, 900]}}}
    )
    assert grid.transform == Affine(10, 1, 500, 2, -30, 900)
    assert grid.xy(1, 0) == (510, 902)  # x = a*col + b*row + c ; y = d*col + e*row + f
    assert grid.xy(0, 1) == (501, 870)


def test_non_square_patches_on_non_square_grid():
    grid = Grid.from_mixer(EE_MIXER)  # patches 256 wide, 128 high; 3 per row, 2 rows
    assert (grid.patch_rows, grid.width, grid.height) == (2, 768, 256)
    assert grid.patch_position(4) == (1, 1)
    assert grid.patch_window(4) == PatchWindow(256, 128, 256, 128)
    assert grid.patch_window(5, kernel_size=(32, 16)) == PatchWindow(512 - 16, 128 - 8, 288, 144)
    window = grid.patch_window(5)
    assert grid.window_transform(window) @ (0, 0) == (330000 + 512 * 20, 5822040 - 128 * 20)


def test_covering_pads_partial_patches():
    grid = Grid.covering("EPSG:4326", Affine.identity(), width=700, height=130, patch_size=(256, 64))
    assert (grid.patches_per_row, grid.total_patches) == (3, 9)
    assert grid.patch_window(8) == PatchWindow(512, 128, 256, 64)


def test_last_row_may_be_partial():
    grid = Grid("EPSG:4326", Affine.identity(), 4, 4, patches_per_row=3, total_patches=7)
    assert grid.patch_rows == 3
    assert grid.patch_position(6) == (0, 2)
    with pytest.raises(IndexError):
        grid.patch_position(7)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"patchDimensions": [256]}, "patchDimensions"),
        ({"patchesPerRow": 0}, "patches_per_row=0"),
        ({"projection": {"crs": "EPSG:1", "affine": {"doubleMatrix": [1, 2]}}}, "doubleMatrix"),
    ],
)
def test_invalid_mixer_names_the_field(broken, message):
    with pytest.raises(GridMismatchError, match=message):
        Grid.from_mixer(EE_MIXER | broken, source="x-mixer.json")


def test_missing_field_and_file(tmp_path):
    mixer = {k: v for k, v in EE_MIXER.items() if k != "totalPatches"}
    with pytest.raises(GridMismatchError, match="x-mixer.json: missing field 'totalPatches'"):
        Grid.from_mixer(mixer, source="x-mixer.json")
    with pytest.raises(GridMismatchError, match="mixer file not found"):
        Grid.read_mixer(tmp_path / "nope-mixer.json")
