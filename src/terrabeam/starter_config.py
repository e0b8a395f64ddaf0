"""``terrabeam init``: a commented starter config for the user's own rasters and model, with what
can be read from the files filled in (bands, CRS, resolution, extent; the model's framework, input
channels, patch size and output count: declared by ONNX, Keras and torch.export files, else found by
running one zero patch) and what cannot marked for the user to decide."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from terrabeam.errors import ConfigError, ModelError
from terrabeam.predict.models import onnx_input

# Sentinel-2 band ids → the STAC eo:bands common names (what the examples use).
SENTINEL2_COMMON_NAMES = {
    "b01": "coastal",
    "b02": "blue",
    "b03": "green",
    "b04": "red",
    "b05": "rededge1",
    "b06": "rededge2",
    "b07": "rededge3",
    "b08": "nir",
    "b8a": "nir08",
    "b09": "nir09",
    "b10": "cirrus",
    "b11": "swir16",
    "b12": "swir22",
}
FRAMEWORK_BY_SUFFIX = {
    ".onnx": "onnx",
    ".keras": "tensorflow",
    ".h5": "tensorflow",
    ".pt": "torch",
    ".pth": "torch",
    ".pt2": "torch",
    ".joblib": "sklearn",
    ".pkl": "sklearn",
    ".txt": "lightgbm",
}
DEFAULT_PATCH = 256


@dataclass
class RasterBand:
    """One band of one input file, as the config will name it."""

    name: str
    path: str
    band: int
    description: str
    nodata: float | None
    resolution: tuple[float, float]


@dataclass
class ModelFacts:
    """What the model file says about itself; None where it does not say."""

    framework: str
    kind: str = "per_patch"
    layout: str = "NCHW"
    channels: int | None = None
    size: tuple[int, int] | None = None  # fixed input (H, W)
    outputs: int | None = None
    output: str = "logits"
    notes: list[str] = field(default_factory=list)


def _identifier(text: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_").lower()
    return name if name and not name[0].isdigit() else f"b{name}"


def _common_prefix(stems: list[str]) -> str:
    """The shared start of the file names, cut back to a separator (``T33UUU_20170216T102101_``)."""
    if len(stems) < 2:
        return ""
    prefix = os.path.commonprefix(stems)
    cut = max(prefix.rfind(sep) for sep in "_-.")
    return prefix[: cut + 1] if cut >= 0 else ""


def read_bands(rasters: list[Path]) -> list[RasterBand]:
    """Every band of every file, named by its description, else by what sets its file name apart
    from the others (Sentinel-2 ids become common names)."""
    import rasterio

    prefix = _common_prefix([p.stem for p in rasters])
    bands: list[RasterBand] = []
    for path in rasters:
        try:
            with rasterio.open(path) as ds:
                descriptions, nodata, count, res = ds.descriptions, ds.nodata, ds.count, ds.res
        except rasterio.errors.RasterioIOError as exc:
            raise ConfigError(f"{path}: cannot read as a raster: {exc}") from None
        stem = _identifier(path.stem[len(prefix) :] or path.stem)
        for index in range(1, count + 1):
            description = descriptions[index - 1] or ""
            name = _identifier(description) if description else stem if count == 1 else f"{stem}_{index}"
            name = SENTINEL2_COMMON_NAMES.get(name, name)
            while name in {b.name for b in bands}:
                name = f"{name}_{index}"
            bands.append(RasterBand(name, str(path), index, description, nodata, res))
    return bands


def _onnx_facts(path: Path) -> ModelFacts:
    """Input channels, fixed patch size and output count of an ONNX file: declared shapes, then one
    zero patch through ONNX Runtime for what the shapes leave symbolic."""
    import onnxruntime as ort

    name, dims = onnx_input(str(path))
    facts = ModelFacts("onnx")
    if len(dims) == 2:
        facts.kind, facts.channels = "per_pixel", dims[1]
    elif len(dims) == 4:
        # NHWC when the last axis is small and the second is not (Keras exports), else NCHW
        if dims[3] is not None and dims[3] <= 32 and (dims[1] is None or dims[1] > 32):
            facts.layout, facts.channels, spatial = "NHWC", dims[3], (dims[1], dims[2])
        else:
            facts.channels, spatial = dims[1], (dims[2], dims[3])
        if spatial[0] is not None and spatial[1] is not None:
            facts.size = (spatial[0], spatial[1])
    else:
        raise ModelError(
            f"{path}: input of shape {dims}; terrabeam needs (N, C, H, W), (N, H, W, C) or (N, bands)"
        )
    if facts.channels is None:
        facts.notes.append("the model does not declare its input channels: check model.input_bands")
        return facts
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _probe_outputs(facts, lambda x: session.run(None, {name: x})[0], facts.channels)
    except Exception as exc:  # ONNX Runtime raises its own types on shape mismatches
        facts.notes.append(f"a zero patch failed in ONNX Runtime ({exc}); set model.classes")
    return facts


def _probe_outputs(facts: ModelFacts, predict, channels: int) -> None:
    """Output count (and probabilities or not) from one zero input of the shape the facts say."""
    h, w = facts.size or (DEFAULT_PATCH, DEFAULT_PATCH)
    if facts.kind == "per_pixel":
        shape: tuple[int, ...] = (4, channels)
    else:
        shape = (1, channels, h, w) if facts.layout == "NCHW" else (1, h, w, channels)
    result = np.asarray(predict(np.zeros(shape, np.float32)), dtype=np.float32)
    axis = 1 if facts.kind == "per_pixel" or facts.layout == "NCHW" else result.ndim - 1
    facts.outputs = int(result.shape[axis])
    if facts.outputs > 1 and np.all(result >= 0) and np.allclose(result.sum(axis=axis), 1, atol=1e-3):
        facts.output = "probabilities"


def _keras_facts(path: Path, facts: ModelFacts) -> None:
    """Keras files declare their input: (None, C) per pixel, (None, H, W, C) per patch."""
    import keras

    model = keras.models.load_model(path, compile=False)
    shape = tuple(model.input_shape)
    if len(shape) == 2:
        facts.kind, facts.channels = "per_pixel", shape[1]
    elif len(shape) == 4:
        facts.channels = shape[3]
        if shape[1] is not None and shape[2] is not None:
            facts.size = (shape[1], shape[2])
    else:
        raise ModelError(f"{path}: input of shape {list(shape)}; terrabeam needs (N, H, W, C) or (N, bands)")
    if facts.channels is not None:
        _probe_outputs(facts, lambda x: model(x, training=False), facts.channels)


def _torch_facts(path: Path, facts: ModelFacts, bands: int) -> None:
    """A torch.export program keeps its example input's shape; a TorchScript file says nothing, so it
    is tried on a zero patch with one channel per raster band."""
    import torch

    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        (example, *_), _ = program.example_inputs
        shape = tuple(example.shape)
        module = program.module()
        if len(shape) == 2:
            facts.kind = "per_pixel"
        facts.channels = shape[1]
    else:
        module = torch.jit.load(str(path), map_location="cpu").eval()
        facts.channels = bands
        facts.notes.append(f"input channels not declared by TorchScript: a zero patch of {bands} bands ran")

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).float().numpy()

    _probe_outputs(facts, predict, facts.channels)


def model_facts(path: Path, bands: int = 0) -> ModelFacts:
    framework = FRAMEWORK_BY_SUFFIX.get(path.suffix.lower(), "tensorflow" if path.is_dir() else None)
    if framework is None:
        raise ModelError(
            f"{path}: unknown model type; give a .onnx, .keras, .h5, .pt, .pt2, .joblib or .txt file"
        )
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    if framework == "onnx":
        return _onnx_facts(path)
    facts = ModelFacts(framework)
    if framework == "tensorflow":
        facts.layout = "NHWC"
    if framework in ("sklearn", "lightgbm"):
        facts.kind = "per_pixel"
    readers = {"torch": lambda: _torch_facts(path, facts, bands)}
    if framework == "tensorflow" and not path.is_dir():
        readers["tensorflow"] = lambda: _keras_facts(path, facts)
    if framework not in readers:
        facts.notes.append(
            f"{framework} models are not opened by init: check input_bands, classes, patch size"
        )
        return facts
    try:
        readers[framework]()
    except ModelError:
        raise
    except ImportError:
        facts.notes.append(
            f"{framework} is not installed here: check input_bands, classes and the patch size"
        )
    except Exception as exc:  # each framework raises its own types
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        facts.notes.append(
            f"the model could not be run on a zero patch ({message}): check its input and classes"
        )
    return facts


def _grid_facts(first: RasterBand) -> dict:
    import rasterio

    with rasterio.open(first.path) as ds:
        crs = ds.crs.to_string() if ds.crs else None
        res = ds.res
        return {"crs": crs, "resolution": res, "width": ds.width, "height": ds.height, "bounds": ds.bounds}


def _grid_sizes(facts: ModelFacts) -> tuple[int, int, int, int, str]:
    """(patch w, h, kernel w, h, why): a fixed model input is cut as the demo does, three quarters
    core and a quarter of context (half on each side) so patch seams do not show."""
    if facts.kind == "per_pixel":
        return DEFAULT_PATCH, DEFAULT_PATCH, 0, 0, "a per-pixel model needs no context"
    if facts.size is None:
        return (
            DEFAULT_PATCH,
            DEFAULT_PATCH,
            32,
            32,
            "the model takes any size: 256 px cores, 16 px of context a side",
        )
    h, w = facts.size
    kw, kh = (w // 4) // 2 * 2, (h // 4) // 2 * 2
    return w - kw, h - kh, kw, kh, f"core + kernel margin = the model's fixed {w} × {h} input"


def _yaml(value: object) -> str:
    """A YAML flow value: JSON is YAML (quoted strings, plain numbers)."""
    return json.dumps(value)


def _names(names: list[str]) -> str:
    """``[a, b]``: identifiers need no quotes."""
    return f"[{', '.join(names)}]"


def render(name: str, bands: list[RasterBand], model: Path, facts: ModelFacts, out: Path) -> str:
    """The commented YAML text; paths relative to the config's folder where they can be."""

    def where(path: str | Path) -> str:
        try:  # relative where the file lies under the config's folder, so the two move together
            relative = os.path.relpath(Path(path).resolve(), out.parent.resolve())
        except ValueError:  # another drive
            return str(Path(path).resolve())
        return str(Path(path).resolve()) if relative.startswith("..") else relative

    grid = _grid_facts(bands[0])
    channels = facts.channels or len(bands)
    if channels > len(bands):
        raise ConfigError(
            f"{model}: the model takes {channels} input channels but the rasters have {len(bands)} bands "
            f"({', '.join(b.name for b in bands)}); give more rasters"
        )
    inputs = [b.name for b in bands[:channels]]
    pw, ph, kw, kh, why = _grid_sizes(facts)
    outputs = facts.outputs or 2
    classes = [f"class_{i}" for i in range(outputs)]
    lines = [
        f"# Written by `terrabeam init` for {len(bands)} band(s) of {len({b.path for b in bands})} file(s) and",
        f"# the model {model.name}. Check every line marked CHECK, then: terrabeam validate {out.name}",
        f"name: {name}",
        "workspace: workspace          # runs go to <workspace>/<run>/ (a folder, gs://… or s3://…)",
        "",
        "source:",
        "  kind: raster",
        "  # value fed to the model = raw × scale + offset. CHECK: e.g. scale 0.0001 for Sentinel-2 L2A",
        "  # reflectance; the model must see values as it saw them in training.",
        "  bands:",
    ]
    width = max(len(b.name) for b in bands)
    for b in bands:
        entry = f"{{path: {_yaml(where(b.path))}" + (f", band: {b.band}" if b.band != 1 else "") + "}"
        note = f"  # {b.description}" if b.description else ""
        lines.append(f"    {b.name + ':':<{width + 1}} {entry}{note}")
    nodata = {b.nodata for b in bands} - {None}
    if nodata:
        lines.append(f"  # nodata: {sorted(nodata)[0]:g}   (read from the files; pixels with it are masked)")
    res = grid["resolution"]
    resolution = _yaml(res[0]) if res[0] == res[1] else _yaml(list(res))
    bounds = grid["bounds"]
    others = sorted({b.resolution for b in bands} - {bands[0].resolution})
    if others:
        lines.append(
            f"  resampling: bilinear   # bands at {', '.join(f'{r[0]:g} × {r[1]:g}' for r in others)} are "
            "resampled onto the grid (average: for a coarser grid)"
        )
    lines += [
        "",
        "grid:",
        f"  crs: {grid['crs']}" + ("" if grid["crs"] else "   # CHECK: the first file has no CRS"),
        f"  resolution: {resolution}          # of {Path(bands[0].path).name}: maps line up with its pixels",
        f"  # region: the whole extent of the first file, {grid['width']} × {grid['height']} px "
        f"({bounds.left:.10g}, {bounds.bottom:.10g}, {bounds.right:.10g}, {bounds.top:.10g});",
        "  # or {bbox: [minx, miny, maxx, maxy]} in the grid CRS, or {geojson: file.geojson}",
        f"  patch_size: [{pw}, {ph}]       # {why}",
        f"  kernel_size: [{kw}, {kh}]",
        "",
        "model:",
        f"  path: {_yaml(where(model))}",
        f"  framework: {facts.framework}",
    ]
    if facts.kind != "per_patch":
        lines.append(f"  kind: {facts.kind}")
    if facts.kind == "per_patch" and facts.layout != "NCHW":
        lines.append(f"  layout: {facts.layout}")
    unused = [b.name for b in bands[channels:]]
    lines.append(
        f"  input_bands: {_names(inputs)}"
        + (f"   # CHECK: the model takes {channels}; not fed: {', '.join(unused)}" if unused else "")
    )
    lines += [
        "  # normalization: {mean: [...], std: [...]}   CHECK: the statistics the model was trained with",
        f"  output: {facts.output}"
        + (
            "               # the outputs sum to 1 on a probe patch"
            if facts.output == "probabilities"
            else "                    # softmax is applied; or probabilities / regression"
        ),
        f"  classes: {_names(classes)}   # CHECK: name the model's {outputs} outputs, in order",
        "  batch_size: 4",
        "",
        "outputs:",
        "  class_map: true",
        "  probabilities: true",
        "  quicklook: true",
    ]
    if facts.notes:
        lines += ["", *(f"# NOTE: {note}" for note in facts.notes)]
    return "\n".join(lines) + "\n"


def write_starter_config(rasters: list[Path], model: Path, out: Path, name: str | None, force: bool) -> dict:
    """Write the starter config to ``out`` (refusing to replace a file unless ``force``) and check
    that it loads; returns what was read, for --json."""
    from terrabeam.config import load_config

    if not rasters:
        raise ConfigError("init: give at least one raster file")
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists; give another --out or --force to replace it")
    bands = read_bands(rasters)
    facts = model_facts(model, len(bands))
    default = model.stem if out.name == "terrabeam.yaml" else out.stem  # the config's own name if given one
    pipeline = _identifier(name or default).replace("_", "-")
    text = render(pipeline, bands, model, facts, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    try:
        load_config(partial)
    except ConfigError as exc:
        partial.unlink()
        raise ConfigError(f"init wrote a config that does not load (a bug; please report): {exc}") from None
    partial.replace(out)
    return {
        "config": str(out),
        "name": pipeline,
        "bands": {b.name: {"path": b.path, "band": b.band} for b in bands},
        "model": {
            "framework": facts.framework,
            "kind": facts.kind,
            "layout": facts.layout,
            "channels": facts.channels,
            "input_size": list(facts.size) if facts.size else None,
            "outputs": facts.outputs,
            "output": facts.output,
        },
        "notes": facts.notes,
    }
