"""The patch grid, read and written as Earth Engine's ``mixer.json``.

Patch ``i`` sits at grid column ``i % patchesPerRow`` and row ``i // patchesPerRow``; its core
covers ``patchDimensions`` = [width, height] pixels, and a kernel margin [kw, kh] adds kw/2 and
kh/2 pixels on each side. Pixel (0, 0) of the grid is the top-left of patch 0's core.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from affine import Affine

from terrabeam.errors import GridMismatchError


class PatchKey(NamedTuple):
    """Where a patch belongs: its index in the grid, and its shard and position in shard files
    (Earth Engine's layout; a source without shards keeps shard 0 and position = index)."""

    index: int
    shard: int = 0
    position: int = 0


@dataclass(frozen=True)
class PatchWindow:
    """A pixel window in grid coordinates; offsets may be negative when a margin crosses the edge."""

    col_off: int
    row_off: int
    width: int
    height: int

    @property
    def col_stop(self) -> int:
        return self.col_off + self.width

    @property
    def row_stop(self) -> int:
        return self.row_off + self.height


@dataclass(frozen=True)
class Grid:
    """Patch layout of one export: projection, patch size and count (exactly the mixer's fields)."""

    crs: str
    transform: Affine
    patch_width: int
    patch_height: int
    patches_per_row: int
    total_patches: int

    def __post_init__(self) -> None:
        for name in ("patch_width", "patch_height", "patches_per_row", "total_patches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GridMismatchError(f"grid: {name}={value!r} must be a positive integer")

    @classmethod
    def covering(
        cls, crs: str, transform: Affine, width: int, height: int, patch_size: tuple[int, int]
    ) -> Grid:
        """The smallest grid of patches covering ``width`` × ``height`` pixels (padded at the far edges)."""
        patch_width, patch_height = patch_size
        per_row = math.ceil(width / patch_width)
        rows = math.ceil(height / patch_height)
        return cls(crs, transform, patch_width, patch_height, per_row, per_row * rows)

    @property
    def patch_rows(self) -> int:
        return math.ceil(self.total_patches / self.patches_per_row)

    @property
    def width(self) -> int:
        """Grid width in pixels (all patch columns)."""
        return self.patches_per_row * self.patch_width

    @property
    def height(self) -> int:
        """Grid height in pixels (all patch rows)."""
        return self.patch_rows * self.patch_height

    def patch_position(self, index: int) -> tuple[int, int]:
        """(column, row) of patch ``index`` in the grid."""
        if not 0 <= index < self.total_patches:
            raise IndexError(f"patch index {index} outside 0..{self.total_patches - 1}")
        return index % self.patches_per_row, index // self.patches_per_row

    def patch_window(self, index: int, kernel_size: tuple[int, int] = (0, 0)) -> PatchWindow:
        """Pixel window of patch ``index``, grown by half the kernel margin on each side."""
        col, row = self.patch_position(index)
        kernel_width, kernel_height = kernel_size
        return PatchWindow(
            col * self.patch_width - kernel_width // 2,
            row * self.patch_height - kernel_height // 2,
            self.patch_width + kernel_width,
            self.patch_height + kernel_height,
        )

    def window_transform(self, window: PatchWindow) -> Affine:
        """Affine transform of the window's top-left pixel corner."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def xy(self, col: float, row: float) -> tuple[float, float]:
        """Map coordinates of a pixel position (corner convention: integers are pixel corners)."""
        return self.transform @ (col, row)

    def to_mixer(self) -> dict[str, Any]:
        """The mixer.json document Earth Engine writes (and ingests) for this grid."""
        t = self.transform
        return {
            "projection": {
                "crs": self.crs,
                "affine": {"doubleMatrix": [t.a, t.b, t.c, t.d, t.e, t.f]},
            },
            "patchDimensions": [self.patch_width, self.patch_height],
            "patchesPerRow": self.patches_per_row,
            "totalPatches": self.total_patches,
        }

    @classmethod
    def from_mixer(cls, mixer: dict[str, Any], source: str = "mixer.json") -> Grid:
        """Parse a mixer document; errors name ``source`` and the field at fault."""

        def field(path: str) -> Any:
            node: Any = mixer
            for part in path.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise GridMismatchError(f"{source}: missing field {path!r}")
                node = node[part]
            return node

        matrix = field("projection.affine.doubleMatrix")
        if not (isinstance(matrix, list) and len(matrix) == 6):
            raise GridMismatchError(
                f"{source}: projection.affine.doubleMatrix={matrix!r} must be 6 numbers "
                "[xScale, xShear, xTranslation, yShear, yScale, yTranslation]"
            )
        dims = field("patchDimensions")
        if not (isinstance(dims, list) and len(dims) == 2):
            raise GridMismatchError(f"{source}: patchDimensions={dims!r} must be [width, height]")
        try:
            return cls(
                crs=str(field("projection.crs")),
                transform=Affine(*(float(v) for v in matrix)),
                patch_width=dims[0],
                patch_height=dims[1],
                patches_per_row=field("patchesPerRow"),
                total_patches=field("totalPatches"),
            )
        except GridMismatchError as exc:
            raise GridMismatchError(f"{source}: {exc}") from None

    @classmethod
    def read_mixer(cls, path: str | Path) -> Grid:
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise GridMismatchError(f"{path}: mixer file not found") from None
        except json.JSONDecodeError as exc:
            raise GridMismatchError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_mixer(document, source=str(path))

    def write_mixer(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_mixer(), indent=2) + "\n")
