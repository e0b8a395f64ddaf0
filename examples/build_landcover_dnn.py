"""Build the tiny per-pixel land-cover DNN of examples/sentinel2-landcover-dnn.yaml (an illustration).

It mirrors the seed design's Keras model from Earth Engine's TensorFlow tutorial: the pixel's bands
plus NDVI → Dense(64, relu) → Dropout → Dense(3, softmax). It is trained for a few epochs on
pseudo-labels made by thresholds on the demo scene itself (water: NDVI < 0 and dark NIR;
vegetation: NDVI > 0.25; else other), so it only shows the plumbing: it is not a land-cover product.
Deterministic for a given TensorFlow build. Usage: python examples/build_landcover_dnn.py [OUT.keras]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

HERE = Path(__file__).resolve().parent
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11", "swir22": "B12"}
CLASSES = ["water", "vegetation", "other"]


def build_model():
    """The untrained network: 7 inputs → Dense(64, relu) → Dropout(0.2) → Dense(3, softmax)."""
    import keras

    keras.utils.set_random_seed(42)
    return keras.Sequential(
        [
            keras.Input((len(BANDS) + 1,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )


def scene_pixels(data: Path) -> np.ndarray:
    """(pixels, 7): the demo scene's bands at 20 m as reflectance, plus NDVI."""
    bands = []
    for code in BANDS.values():
        with rasterio.open(data / "s2l1c" / f"T33UUU_20170216T102101_{code}.jp2") as ds:
            bands.append(ds.read(1, out_shape=(384, 768), resampling=Resampling.average) * np.float32(1e-4))
    stack = np.stack(bands, axis=-1).reshape(-1, len(BANDS)).astype(np.float32)
    red, nir = stack[:, 2], stack[:, 3]
    ndvi = (nir - red) / np.maximum(nir + red, 1e-6)
    return np.concatenate([stack, ndvi[:, None]], axis=1)


def pseudo_labels(pixels: np.ndarray) -> np.ndarray:
    ndvi, nir = pixels[:, -1], pixels[:, 3]
    return np.where((ndvi < 0) & (nir < 0.08), 0, np.where(ndvi > 0.25, 1, 2))


def main(out: Path) -> None:
    model = build_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    pixels = scene_pixels(HERE.parent / "data" / "demo")
    model.fit(pixels, pseudo_labels(pixels), epochs=3, batch_size=1024, shuffle=False, verbose=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "data" / "examples" / "landcover-dnn.keras"
    )
