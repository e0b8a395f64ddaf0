"""The quicklook: a PNG a person can read at a glance and GIS software can place — the classes
over an RGB of the source imagery, nodata transparent, a title (pipeline, run, window) and a legend
with each class's share; georeferenced by a world file and GDAL's ``.aux.xml`` (the CRS)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling

from terrabeam.sinks.tiles import CLASS_NODATA
from terrabeam.sinks.vrt import hex_to_rgb

MAX_SIDE = 1024  # the map part at most this many pixels a side
MIN_WIDTH = 480  # smaller maps are enlarged (whole pixels) so that title and legend fit
FONT_SIZE = 13
PADDING = 6

# (height, width) → (3, height, width) reflectance and (height, width) valid, or None
Backdrop = Callable[[tuple[int, int]], tuple[np.ndarray, np.ndarray] | None]


@dataclass(frozen=True)
class QuicklookStyle:
    classes: Sequence[str]
    colors: Sequence[str]  # '#rrggbb' per class
    title: str
    opacity: float = 0.5  # of the classes over the imagery (1 without imagery)
    stretch: tuple[float, float] | None = None  # reflectance → 0..255; None: 2–98 % per band


def _stretch(rgb: np.ndarray, valid: np.ndarray, stretch: tuple[float, float] | None) -> np.ndarray:
    """(3, H, W) reflectance → (H, W, 3) uint8, linear between the stretch's ends."""
    out = np.zeros((*rgb.shape[1:], 3), np.uint8)
    for band in range(3):
        values = rgb[band]
        if stretch is not None:
            low, high = stretch
        elif valid.any():
            low, high = np.percentile(values[valid], [2, 98])
        else:
            low, high = 0.0, 1.0
        scaled = (values - low) / max(float(high - low), 1e-12) * 255
        out[..., band] = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _legend_lines(draw: ImageDraw.ImageDraw, entries: list[str], font, width: int) -> list[list[int]]:
    """Entry indices per legend line, wrapped so that no entry is cut off at ``width``."""
    lines: list[list[int]] = [[]]
    x = PADDING
    for i, text in enumerate(entries):
        span = 16 + int(draw.textlength(text, font=font)) + 14
        if lines[-1] and x + span > width:
            lines.append([])
            x = PADDING
        lines[-1].append(i)
        x += span
    return lines


def compose_quicklook(
    labels: np.ndarray, style: QuicklookStyle, backdrop: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """(H, W) class labels (255: nodata) [over (3, H, W) imagery and its valid mask] → (RGBA image:
    title, map enlarged to MIN_WIDTH in whole pixels, legend; the enlargement; the title's height;
    pixels per class)."""
    valid = labels != CLASS_NODATA
    palette = np.zeros((256, 3), np.uint8)
    for i, color in enumerate(style.colors):
        palette[i] = hex_to_rgb(color)
    classes_rgb = palette[labels].astype(np.float32)
    rgba = np.zeros((*labels.shape, 4), np.uint8)
    if backdrop is not None:
        imagery, seen = backdrop
        under = _stretch(imagery, seen, style.stretch).astype(np.float32)
        alpha = np.float32(style.opacity)
        mixed = np.where(valid[..., None], (1 - alpha) * under + alpha * classes_rgb, under)
        rgba[..., :3] = np.rint(mixed).astype(np.uint8)
        rgba[..., 3] = np.where(valid | seen, 255, 0)
    else:
        rgba[..., :3] = classes_rgb.astype(np.uint8)
        rgba[..., 3] = np.where(valid, 255, 0)
    enlarge = max(1, -(-MIN_WIDTH // labels.shape[1]))
    if enlarge > 1:
        rgba = rgba.repeat(enlarge, axis=0).repeat(enlarge, axis=1)
    counts = np.bincount(labels[valid].ravel(), minlength=len(style.classes))[: len(style.classes)]
    total = max(int(counts.sum()), 1)
    entries = [
        f"{name} {100 * count / total:.1f} %" for name, count in zip(style.classes, counts, strict=True)
    ]

    font = _font(FONT_SIZE)
    width = rgba.shape[1]
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    lines = _legend_lines(probe, entries, font, width)
    line_height = FONT_SIZE + 2 * PADDING
    title_height = line_height
    legend_height = line_height * len(lines)
    canvas = Image.new("RGBA", (width, title_height + rgba.shape[0] + legend_height), (255, 255, 255, 255))
    canvas.paste(Image.fromarray(rgba, "RGBA"), (0, title_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((PADDING, PADDING), style.title, fill="black", font=font)
    for number, line in enumerate(lines):
        x, y = PADDING, title_height + rgba.shape[0] + number * line_height + PADDING
        for i in line:
            draw.rectangle([x, y, x + 12, y + 12], fill=hex_to_rgb(style.colors[i]), outline="black")
            draw.text((x + 16, y), entries[i], fill="black", font=font)
            x += 16 + int(draw.textlength(entries[i], font=font)) + 14
    return np.asarray(canvas), enlarge, title_height, counts


def quicklook_shape(width: int, height: int) -> tuple[int, int]:
    """(height, width) of the quicklook's map part for a map of ``width`` × ``height`` pixels: the
    map reduced by a whole factor until its longer side is at most MAX_SIDE."""
    scale = max(1, -(-max(width, height) // MAX_SIDE))
    return max(1, height // scale), max(1, width // scale)


def write_quicklook(class_map: Path, target: Path, style: QuicklookStyle, backdrop: Backdrop | None) -> Path:
    """``target`` (PNG) from the class map (a VRT or COG), with ``.wld`` world file and ``.aux.xml``
    (CRS) beside it, each renamed into place (the PNG last)."""
    with rasterio.open(class_map) as ds:
        shape = quicklook_shape(ds.width, ds.height)
        labels = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
        crs, transform = ds.crs, ds.transform
        pixel = transform * Affine.scale(ds.width / shape[1], ds.height / shape[0])
    under = backdrop(shape) if backdrop is not None else None
    image, enlarge, title_height, _ = compose_quicklook(labels, style, under)
    # the map's pixels sit where they belong; the title above and the legend below extend beyond it
    placed = pixel * Affine.scale(1 / enlarge) * Affine.translation(0, -title_height)
    folder = Path(tempfile.mkdtemp(prefix=".quicklook-", dir=target.parent))
    try:
        png = folder / "quicklook.png"
        with rasterio.open(
            png,
            "w",
            driver="PNG",
            width=image.shape[1],
            height=image.shape[0],
            count=4,
            dtype="uint8",
            crs=crs,
            transform=placed,
            WORLDFILE="YES",
        ) as out:
            out.write(np.moveaxis(image, -1, 0))
        # GDAL wrote quicklook.png, quicklook.wld and quicklook.png.aux.xml: the PNG goes last
        for made in sorted(folder.iterdir(), key=lambda p: p.suffix == ".png"):
            if made.name.startswith(png.name):
                name = target.name + made.name.removeprefix(png.name)
            else:
                name = target.stem + made.suffix
            os.replace(made, target.with_name(name))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return target
