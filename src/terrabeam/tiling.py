"""Map tiles over the patch grid: the unit one worker reads, predicts and writes whole.

A tile is a rectangle of whole patches (``patches_x`` × ``patches_y``, fewer at the far edges), so
a tile's patches come from one task and its COG is written by one worker, exactly once. Tiles run
row-major like patches; tile (col, row) covers region pixels from (col × patches_x × patch width,
row × patches_y × patch height), cropped to the true region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from terrabeam.grid import Grid


@dataclass(frozen=True)
class TileWindow:
    """A tile's pixels in the region (already cropped to it)."""

    col_off: int
    row_off: int
    width: int
    height: int


@dataclass(frozen=True)
class Tiling:
    """The tiles of one grid and its true region (``region_width`` × ``region_height`` pixels)."""

    grid: Grid
    region_width: int
    region_height: int
    patches_x: int
    patches_y: int

    @classmethod
    def for_grid(cls, grid: Grid, region_width: int, region_height: int, tile_size: int) -> Tiling:
        """Tiles of about ``tile_size`` pixels a side, rounded down to whole patches (at least one)."""
        return cls(
            grid,
            region_width,
            region_height,
            max(1, min(grid.patches_per_row, tile_size // grid.patch_width)),
            max(1, min(grid.patch_rows, tile_size // grid.patch_height)),
        )

    @property
    def tiles_per_row(self) -> int:
        return math.ceil(self.grid.patches_per_row / self.patches_x)

    @property
    def tile_rows(self) -> int:
        return math.ceil(self.grid.patch_rows / self.patches_y)

    @property
    def count(self) -> int:
        return self.tiles_per_row * self.tile_rows

    def position(self, tile: int) -> tuple[int, int]:
        """(column, row) of ``tile``."""
        if not 0 <= tile < self.count:
            raise IndexError(f"tile {tile} outside 0..{self.count - 1}")
        return tile % self.tiles_per_row, tile // self.tiles_per_row

    def patch_rows(self, tile: int) -> list[tuple[int, int, int]]:
        """(patch row, first patch column, column after the last) of each row of patches of ``tile``,
        top to bottom; a short last grid row holds fewer patches."""
        col, row = self.position(tile)
        grid = self.grid
        rows = []
        for patch_row in range(row * self.patches_y, min(grid.patch_rows, (row + 1) * self.patches_y)):
            in_row = min(grid.patches_per_row, grid.total_patches - patch_row * grid.patches_per_row)
            first, last = col * self.patches_x, min(in_row, (col + 1) * self.patches_x)
            if first < last:
                rows.append((patch_row, first, last))
        return rows

    def patches(self, tile: int) -> list[int]:
        """Grid indices of the patches of ``tile`` in the order they are read (row-major in the tile)."""
        per_row = self.grid.patches_per_row
        return [r * per_row + c for r, first, last in self.patch_rows(tile) for c in range(first, last)]

    def tile_of(self, index: int) -> int:
        """The tile holding grid patch ``index``."""
        col, row = self.grid.patch_position(index)
        return (row // self.patches_y) * self.tiles_per_row + col // self.patches_x

    def window(self, tile: int) -> TileWindow:
        """The tile's pixels in the region, cropped to it."""
        col, row = self.position(tile)
        x0 = col * self.patches_x * self.grid.patch_width
        y0 = row * self.patches_y * self.grid.patch_height
        width = min(self.patches_x * self.grid.patch_width, self.region_width - x0)
        height = min(self.patches_y * self.grid.patch_height, self.region_height - y0)
        return TileWindow(x0, y0, width, height)

    def name(self, tile: int) -> str:
        """A file-name part that sorts like the tiles: ``r0001c0002``."""
        col, row = self.position(tile)
        return f"r{row:04d}c{col:04d}"
