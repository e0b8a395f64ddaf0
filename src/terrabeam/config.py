"""Pipeline configuration: one YAML file, validated with pydantic before any work starts.

Relative paths in the file are relative to the file's own directory. Errors name the field path,
the value found and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numexpr
import rasterio
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from rasterio.crs import CRS
from rasterio.errors import CRSError

from terrabeam.errors import ConfigError

Resampling = Literal["nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BandFile(_Strict):
    """One band: a GDAL-readable file and the band inside it; value = raw × scale + offset."""

    path: str
    band: int = Field(1, ge=1, description="1-based band index inside the file")
    scale: float = 1.0
    offset: float = 0.0


def check_derived(bands: list[str], derived: dict[str, str]) -> None:
    """Derived bands (numexpr expressions) may use source bands and derived bands before them."""
    known = list(bands)
    for name, expression in derived.items():
        if name in bands:
            raise ValueError(f"derived band {name!r} has the name of a source band")
        try:
            used = numexpr.necompiler.getExprNames(expression, {})[0]
        except Exception as exc:  # numexpr raises several types for bad syntax
            raise ValueError(f"derived.{name}: cannot parse {expression!r} ({exc})") from None
        unknown = sorted(set(used) - set(known))
        if unknown:
            raise ValueError(
                f"derived.{name}: {expression!r} uses unknown band(s) {unknown}; known before it: {known}"
            )
        known.append(name)


def derived_needed(derived: dict[str, str], wanted: Iterable[str]) -> dict[str, str]:
    """The derived bands that ``wanted`` bands need: those named and the derived bands their
    expressions use, in configuration order (a map's pipeline computes no other)."""
    needed = set(wanted)
    for name, expression in reversed(derived.items()):
        if name in needed:
            needed.update(numexpr.necompiler.getExprNames(expression, {})[0])
    return {name: expression for name, expression in derived.items() if name in needed}


class RasterSource(_Strict):
    """Export from local or remote GDAL-readable rasters (GeoTIFF, COG, JPEG2000, …)."""

    kind: Literal["raster"] = "raster"
    bands: dict[str, BandFile] = Field(min_length=1)
    derived: dict[str, str] = Field(
        default_factory=dict, description="band name → numexpr expression over other bands"
    )
    nodata: float | None = Field(None, description="raw value meaning 'no data' (default: the file's)")
    fill_value: float = Field(0.0, description="value written where there is no data (defaultValue)")
    resampling: Resampling = "bilinear"

    @model_validator(mode="after")
    def _derived_use_known_bands(self) -> RasterSource:
        check_derived(list(self.bands), self.derived)
        return self

    @property
    def band_names(self) -> list[str]:
        """All exported bands: source bands then derived bands, in configuration order."""
        return [*self.bands, *self.derived]


class EarthEngineBand(_Strict):
    """One band of the Earth Engine collection; value = raw × scale + offset (e.g. Landsat C2 SR:
    scale 0.0000275, offset -0.2)."""

    band: str = Field(description="band name in the collection, e.g. SR_B4")
    scale: float = 1.0
    offset: float = 0.0


class TimeWindow(_Strict):
    """Which images go into the composite: absolute dates, or a span before the run date."""

    start: date | None = None
    end: date | None = Field(None, description="exclusive")
    months_before: int | None = Field(None, ge=1, description="the N months before the run date")
    days_before: int | None = Field(None, ge=1, description="the N days before the run date")

    @model_validator(mode="after")
    def _one_form(self) -> TimeWindow:
        absolute = self.start is not None or self.end is not None
        relative = [n for n in ("months_before", "days_before") if getattr(self, n) is not None]
        if absolute and relative:
            raise ValueError(f"give start/end or {relative[0]}, not both")
        if len(relative) > 1:
            raise ValueError("give months_before or days_before, not both")
        if absolute and (self.start is None or self.end is None or self.start >= self.end):
            raise ValueError("start and end are both needed, with start < end (end is exclusive)")
        if not absolute and not relative:
            raise ValueError("give start and end dates, or months_before / days_before the run date")
        return self


CloudMask = Literal["none", "landsat_c2", "s2_scl", "s2_qa60"]


class EarthEngineSource(_Strict):
    """Export a composite from Earth Engine: collection → window → region → cloud mask → bands and
    scale factors → reducer → derived bands, as TFRecord patches on Cloud Storage."""

    kind: Literal["earthengine"]
    collection: str | None = Field(None, description="image collection id, e.g. LANDSAT/LC09/C02/T1_L2")
    image: str | None = Field(None, description="a single image id instead of a collection")
    window: TimeWindow | None = Field(None, description="default: the run's window (schedule or --window)")
    cloud_mask: CloudMask = Field(
        "none",
        description="landsat_c2: QA_PIXEL fill/dilated cloud/cirrus/cloud/shadow bits; s2_scl: SCL "
        "classes 3, 8, 9, 10 masked; s2_qa60: QA60 bits 10 and 11",
    )
    bands: dict[str, EarthEngineBand] = Field(min_length=1, description="exported name → collection band")
    derived: dict[str, str] = Field(
        default_factory=dict,
        description="band name → Earth Engine expression over earlier bands, e.g. (nir - red) / (nir + red)",
    )
    reducer: Literal["median", "mean", "min", "max", "mosaic"] = "median"
    fill_value: float = Field(0.0, description="value Earth Engine writes for masked pixels (defaultValue)")
    max_pixels: float = Field(1e13, description="Earth Engine's maxPixels export limit")
    fetch: Literal["export", "compute_pixels", "auto"] = Field(
        "export",
        description="export: a batch export task writes TFRecord patches to Cloud Storage; "
        "compute_pixels: the workers request the patches' pixels directly (no task, no files), "
        "rate-limited; auto: compute_pixels when the grid needs at most 1000 requests, else export",
    )

    @model_validator(mode="after")
    def _collection_or_image(self) -> EarthEngineSource:
        if (self.collection is None) == (self.image is None):
            raise ValueError("give either collection or image")
        for name in self.derived:
            if name in self.bands:
                raise ValueError(f"derived band {name!r} has the name of a source band")
        return self

    @property
    def band_names(self) -> list[str]:
        return [*self.bands, *self.derived]


class StacBand(_Strict):
    """One band from each STAC Item: an asset by key (and the band inside it), or the asset band
    with this common name in its eo:bands / bands; value = raw × scale + offset."""

    asset: str | None = Field(None, description="asset key in the Items, e.g. B04 or red")
    common_name: str | None = Field(
        None, description="instead of asset: the band's eo:bands common name, e.g. red, nir, swir16"
    )
    band: int = Field(1, ge=1, description="1-based band index inside the asset's file (with asset)")
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _asset_or_common_name(self) -> StacBand:
        if (self.asset is None) == (self.common_name is None):
            raise ValueError("a stac band needs either asset (a key) or common_name (from eo:bands)")
        return self


class StacMask(_Strict):
    """Per-Item cloud mask from a mask asset (read with nearest resampling): a pixel is masked where
    the asset's value is one of ``classes`` (e.g. Sentinel-2 SCL 3, 8, 9, 10) or has one of
    ``bits`` set (e.g. Landsat QA_PIXEL 1–4), and where the asset has no data."""

    asset: str = Field(description="asset key of the mask, e.g. scl or qa_pixel")
    classes: list[int] = Field(default_factory=list, description="mask values that are masked")
    bits: list[int] = Field(default_factory=list, description="bit numbers that mask a pixel when set")

    @model_validator(mode="after")
    def _something_masked(self) -> StacMask:
        if not self.classes and not self.bits:
            raise ValueError("source.mask needs classes or bits (which pixels it masks)")
        if any(not 0 <= bit < 64 for bit in self.bits):
            raise ValueError(f"source.mask.bits {self.bits}: bit numbers are 0–63")
        return self


class StacSource(_Strict):
    """Items of a STAC API search or a static catalog, composited onto the grid per window: the
    run's window as the search's datetime, the grid's region as its geometry."""

    kind: Literal["stac"]
    api: str | None = Field(
        None, description="STAC API root URL, e.g. https://earth-search.aws.element84.com/v1"
    )
    catalog: str | None = Field(None, description="static catalog.json (path or URL) instead of an API")
    collections: list[str] = Field(default_factory=list, description="collection ids to search")
    query: dict[str, Any] | None = Field(
        None, description="property filters, STAC API query syntax: {eo:cloud_cover: {lt: 20}}"
    )
    filter: str | dict[str, Any] | None = Field(
        None, description="CQL2 filter (text or JSON) for APIs with the Filter extension"
    )
    bands: dict[str, StacBand] = Field(min_length=1, description="band name → asset of each Item")
    derived: dict[str, str] = Field(
        default_factory=dict, description="band name → numexpr expression over other bands"
    )
    mask: StacMask | None = None
    reducer: Literal["median", "mean", "first", "latest"] = Field(
        "median",
        description="how Items are combined per pixel (masked pixels left out): median, mean, the "
        "earliest valid (first) or the most recent valid (latest)",
    )
    max_items: int = Field(100, ge=1, description="at most this many Items per window (newest first)")
    sign: str | None = Field(
        None,
        description="'module:function' applied to each Item before reading (signed URLs), "
        "e.g. planetary_computer:sign",
    )
    nodata: float | None = Field(None, description="raw value meaning 'no data' (default: the file's)")
    fill_value: float = Field(0.0, description="value given to pixels no Item covers")
    resampling: Resampling = "bilinear"

    @model_validator(mode="after")
    def _one_place(self) -> StacSource:
        if (self.api is None) == (self.catalog is None):
            raise ValueError("a stac source needs either api (a STAC API) or catalog (a static catalog)")
        check_derived(list(self.bands), self.derived)
        return self

    @property
    def band_names(self) -> list[str]:
        return [*self.bands, *self.derived]


class EarthEngineConfig(_Strict):
    """Access to Earth Engine and the Cloud Storage folder its tasks read and write."""

    project: str = Field(description="Google Cloud project id used for Earth Engine calls")
    staging: str = Field(
        pattern=r"^gs://[^/]+(/.*)?$",
        description="gs:// folder: exports land in <staging>/<pipeline>/<run>/export/, predictions are "
        "staged in …/predict/ for ingestion",
    )
    service_account: str | None = Field(
        None,
        description="service account email to impersonate with the Application Default Credentials "
        "(no key file needed); default: the credentials themselves",
    )
    api_url: str | None = Field(None, description="Earth Engine REST endpoint (default: Google's)")
    max_requests_per_second: float = Field(
        10.0,
        gt=0,
        description="computePixels requests started per second, all workers together (the project's "
        "quota is 100/s, shared with everything else it runs)",
    )
    max_concurrent: int = Field(
        16, ge=1, description="computePixels requests in flight at once, all workers together (quota: 40)"
    )
    max_request_bytes: int = Field(
        48 * 2**20,
        ge=1,
        le=48 * 2**20,
        description="largest computePixels response asked for (Earth Engine's limit: 48 MiB), values "
        "and masks counted",
    )


class EarthEngineSink(_Strict):
    """Ingest each run's predictions into an Earth Engine image collection."""

    collection: str = Field(
        description="image collection asset id, e.g. projects/my-project/assets/landcover (created if missing)"
    )
    image_name: str = Field(
        "{pipeline}_{date}",
        pattern=r"^[A-Za-z0-9_{}:%-]+$",
        description="asset name pattern: {pipeline}, {run}, {date} (run date YYYYMMDD), {start}, {end}",
    )
    properties: dict[str, str | float | int] = Field(default_factory=dict, description="extra properties")
    mode: Literal["cog", "tfrecord"] = Field(
        "cog",
        description="cog: register the map's COGs in place as COG-backed images (no ingestion task); "
        "tfrecord: ingest the prediction shards + mixer",
    )


class Region(_Strict):
    """The area to predict: a bbox in the grid CRS, or a GeoJSON geometry (EPSG:4326, inline or file)."""

    bbox: tuple[float, float, float, float] | None = Field(
        None, description="[minx, miny, maxx, maxy] in the grid CRS"
    )
    geojson: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Region:
        if self.bbox is not None and self.geojson is not None:
            raise ValueError("give either bbox or geojson, not both")
        if self.bbox is not None and not (self.bbox[0] < self.bbox[2] and self.bbox[1] < self.bbox[3]):
            raise ValueError(f"bbox {list(self.bbox)} must be [minx, miny, maxx, maxy] with min < max")
        return self


Align = Literal["source", "origin"] | tuple[float, float]


class GridConfig(_Strict):
    crs: str | None = Field(None, description="target CRS (default: the first band's)")
    resolution: float | tuple[float, float] | None = Field(
        None, description="pixel size in CRS units, or [x, y] (default: the first band's)"
    )
    align: Align | None = Field(
        None,
        description="where pixel edges lie: source (the first band's; default for raster sources), "
        "origin (multiples of the resolution from the CRS origin; default for earthengine), or [x0, y0] "
        "a point every pixel edge lines up with",
    )
    region: Region = Region()
    patch_size: tuple[int, int] = Field((256, 256), description="core patch [width, height]")
    kernel_size: tuple[int, int] = Field(
        (0, 0), description="margin [kw, kh]: kw/2 and kh/2 extra pixels on each side"
    )

    @field_validator("patch_size", "kernel_size", mode="before")
    @classmethod
    def _one_number_or_two(cls, value: Any, info: ValidationInfo) -> Any:
        """``patch_size: 256`` means 256 × 256; a list must hold two numbers."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, list | tuple) and len(value) == 2:
            return value
        names = "width, height" if info.field_name == "patch_size" else "kw, kh"
        raise ValueError(f"give [{names}] or one number")

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"patch_size {list(value)} must be positive [width, height]")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _even_kernel(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 0 or any(k % 2 for k in value):
            raise ValueError(f"kernel_size {list(value)} must be even and ≥ 0 (half goes on each side)")
        return value

    @field_validator("crs")
    @classmethod
    def _known_crs(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                with rasterio.Env():  # PROJ's complaint goes to logging, not straight to stderr
                    CRS.from_user_input(value)
            except CRSError:
                raise ValueError(
                    f"{value} is not a known CRS; give an EPSG code (EPSG:32633), a PROJ string or WKT"
                ) from None
        return value

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, value: float | tuple[float, float] | None):
        if value is not None and min(value if isinstance(value, tuple) else (value,)) <= 0:
            raise ValueError(f"resolution {value} must be positive")
        return value


class ExportConfig(_Strict):
    prefix: str = Field("patches", pattern=r"^[A-Za-z0-9_.]+$")
    max_file_size: int = Field(104_857_600, gt=0, description="bytes per shard at most")
    compression_level: int = Field(1, ge=0, le=3, description="gzip level 1–3 (ISA-L); 0: plain TFRecord")
    mixer: str | None = Field(
        None,
        description="an Earth Engine export's mixer, when it is not <prefix>-mixer.json beside the shards",
    )


class Normalization(_Strict):
    """Per input band: (x - mean) / std, or x × scale + offset."""

    mean: list[float] | None = None
    std: list[float] | None = None
    scale: list[float] | None = None
    offset: list[float] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Normalization:
        pairs = {"mean/std": (self.mean, self.std), "scale/offset": (self.scale, self.offset)}
        given = [name for name, (a, b) in pairs.items() if a is not None or b is not None]
        if len(given) != 1:
            raise ValueError("give either mean and std, or scale and offset")
        a, b = pairs[given[0]]
        if a is None or b is None or len(a) != len(b):
            raise ValueError(f"{given[0]} need the same number of values, one per input band")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self

    def factors(self) -> tuple[list[float], list[float]]:
        """(multiply, add) per band: normalised = x × multiply + add."""
        if self.mean is not None and self.std is not None:
            return [1 / s for s in self.std], [-m / s for m, s in zip(self.mean, self.std, strict=True)]
        return list(self.scale or []), list(self.offset or [])


Framework = Literal["onnx", "tensorflow", "torch", "sklearn", "lightgbm"]
Engine = Literal["auto", "onnxruntime", "openvino", "tensorflow", "torch", "sklearn", "lightgbm"]
# The engines that run each framework's files (the first is the framework's own).
ENGINES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime", "openvino"),
    "tensorflow": ("tensorflow", "openvino"),
    "torch": ("torch", "openvino"),  # OpenVINO converts TF and PyTorch files in memory when they load
    "sklearn": ("sklearn",),
    "lightgbm": ("lightgbm",),
}


class ModelConfig(_Strict):
    path: str = Field(
        description="ONNX file, TF SavedModel folder or .keras, TorchScript / torch.export "
        ".pt2, scikit-learn joblib/pickle, LightGBM booster text file"
    )
    framework: Framework = "onnx"
    name: str | None = Field(None, description="model name recorded with outputs (default: file name)")
    architecture: str | None = Field(
        None, description="recorded in the model's STAC Item (mlm:architecture), e.g. U-Net"
    )
    version: str | None = Field(
        None, description="model version recorded with outputs (default: a hash of the model file)"
    )
    kind: Literal["per_patch", "per_pixel"] = Field(
        "per_patch", description="per_patch: (N, C, H, W) or (N, H, W, C) in; per_pixel: (pixels, bands) in"
    )
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="per_patch models: where the bands are")
    input_bands: list[str] = Field(min_length=1)
    normalization: Normalization | None = None
    nodata: float | None = Field(
        None, description="input value (before normalisation) marking masked pixels; NaN always does"
    )
    output: Literal["logits", "probabilities", "regression"] = Field(
        "logits", description="logits get a softmax; regression bands are written as float32"
    )
    classes: list[str] | None = Field(None, min_length=2, description="class names, model output order")
    regression_bands: list[str] | None = Field(None, min_length=1, description="names of regression outputs")
    regression_dtype: Literal["float32", "float64", "int16", "int32", "uint8", "uint16"] = Field(
        "float32", description="data type of the regression GeoTIFF (values are rounded for integers)"
    )
    regression_nodata: float | None = Field(
        None,
        description="value for masked pixels in the regression GeoTIFF (default NaN; required for integers)",
    )
    batch_size: int = Field(4, ge=1, description="patches per model call (every call but a bundle's last)")
    threads: int = Field(
        0,
        ge=0,
        description="intra-op threads per model copy (0: this machine's cores / local workers; on "
        "remote runners the framework's default)",
    )
    engine: Engine = Field(
        "auto",
        description="what runs the model: auto (the fastest available at model.precision, see "
        "README), onnxruntime or openvino for ONNX files, else the framework itself",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32: the model's own results; bf16: CPUs with AMX/AVX512-BF16 (OpenVINO) or "
        "GPUs; fp16: GPUs. `terrabeam compare-precision` measures what a reduced one costs",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (a CUDA GPU when the engine sees one, else the CPU), cpu, cuda or cuda:N",
    )
    share_across_processes: bool = Field(
        False,
        description="one model copy per machine shared by the worker processes (Beam RunInference's "
        "large_model): for models that fill a GPU or the memory",
    )
    copies: int | None = Field(
        None, ge=1, description="with share_across_processes: model copies per machine (Beam's model_copies)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.normalization is not None:
            count = len(self.normalization.factors()[0])
            if count != len(self.input_bands):
                raise ValueError(
                    f"normalization has {count} values for {len(self.input_bands)} input_bands {self.input_bands}"
                )
        if self.output == "regression" and not self.regression_bands:
            raise ValueError("output: regression needs regression_bands (names of the outputs)")
        integer = not self.regression_dtype.startswith("float")
        if self.output == "regression" and integer and self.regression_nodata is None:
            raise ValueError(
                f"regression_dtype {self.regression_dtype} needs regression_nodata for masked pixels"
            )
        if self.output != "regression" and not self.classes:
            raise ValueError(f"output: {self.output} needs classes (names in the model's output order)")
        if self.engine != "auto" and self.engine not in ENGINES[self.framework]:
            raise ValueError(
                f"engine {self.engine} does not run {self.framework} models; "
                f"choose auto or {' / '.join(ENGINES[self.framework])}"
            )
        if self.copies is not None and not self.share_across_processes:
            raise ValueError("copies needs share_across_processes: true (Beam's model_copies)")
        return self

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, in order (classes or regression bands)."""
        return list(self.regression_bands if self.output == "regression" else self.classes or [])


class RunnerConfig(_Strict):
    """Where the predict pipeline runs. Every other step runs where terrabeam runs."""

    kind: Literal["local", "dataflow", "portable"] = Field(
        "local",
        description="local: this machine (Beam's FnApiRunner); dataflow: Google Cloud Dataflow; "
        "portable: any Beam job service (Flink, Spark, …)",
    )
    workers: int = Field(
        1,
        ge=1,
        description="local: FnApiRunner workers, threads of this process "
        "(processes with options.direct_running_mode: multi_processing)",
    )
    # dataflow
    project: str | None = Field(None, description="dataflow: Google Cloud project id")
    region: str | None = Field(None, description="dataflow: region, e.g. europe-west1")
    temp_location: str | None = Field(None, description="dataflow: gs:// folder for temporary files")
    staging_location: str | None = Field(None, description="dataflow: gs:// folder for staged code")
    machine_type: str | None = Field(None, description="dataflow: worker machine type, e.g. n2-standard-4")
    max_workers: int | None = Field(None, ge=1, description="dataflow: autoscaling limit")
    sdk_container_image: str | None = Field(
        None, description="dataflow/portable: worker image with terrabeam installed"
    )
    service_account: str | None = Field(None, description="dataflow: worker service account email")
    gpu_type: str | None = Field(
        None, description="dataflow: a GPU per worker of this type, e.g. nvidia-l4 (worker_accelerator)"
    )
    gpu_count: int = Field(1, ge=1, description="dataflow: GPUs per worker (with gpu_type)")
    nvidia_mps: bool = Field(
        False, description="dataflow: NVIDIA MPS, the worker's SDK processes share its one GPU"
    )
    # portable
    job_endpoint: str | None = Field(None, description="portable: job service host:port")
    environment_type: Literal["DOCKER", "PROCESS", "EXTERNAL", "LOOPBACK"] | None = Field(
        None, description="portable: how workers start (EXTERNAL: a worker pool at environment_config)"
    )
    environment_config: str | None = Field(None, description="portable: image, command or host:port")
    options: dict[str, Any] = Field(
        default_factory=dict, description="any other Beam pipeline option, passed as --key=value"
    )

    @model_validator(mode="after")
    def _needs(self) -> RunnerConfig:
        required = {
            "dataflow": ["project", "region", "temp_location"],
            "portable": ["job_endpoint"],
        }.get(self.kind, [])
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"runner kind {self.kind!r} needs {', '.join(missing)}")
        if self.nvidia_mps and (not self.gpu_type or self.gpu_count != 1):
            raise ValueError(
                "runner.nvidia_mps needs gpu_type and gpu_count 1 (MPS shares one GPU per worker)"
            )
        return self

    def beam_flags(self) -> list[str]:
        """Beam command-line flags for this runner (the command line may add or override flags)."""
        if self.kind == "local":
            # N workers are N threads of this process (FnApiRunner's in-memory workers): no ports to
            # open, no processes to outlive it. options.direct_running_mode: multi_processing for processes.
            flags = ["--runner=FnApiRunner"]
            if self.workers > 1:
                flags.append(f"--direct_num_workers={self.workers}")
        elif self.kind == "dataflow":
            flags = ["--runner=DataflowRunner"]
            named = {
                "project": self.project,
                "region": self.region,
                "temp_location": self.temp_location,
                "staging_location": self.staging_location,
                "machine_type": self.machine_type,
                "max_num_workers": self.max_workers,
                "sdk_container_image": self.sdk_container_image,
                "service_account_email": self.service_account,
            }
            flags += [f"--{k}={v}" for k, v in named.items() if v is not None]
            if self.gpu_type:
                accelerator = (
                    f"worker_accelerator=type:{self.gpu_type};count:{self.gpu_count};install-nvidia-driver"
                )
                flags.append(
                    f"--dataflow_service_options={accelerator}{';use_nvidia_mps' if self.nvidia_mps else ''}"
                )
        else:
            flags = ["--runner=PortableRunner", f"--job_endpoint={self.job_endpoint}"]
            named = {
                "environment_type": self.environment_type,
                "environment_config": self.environment_config,
                "sdk_container_image": self.sdk_container_image,
            }
            flags += [f"--{k}={v}" for k, v in named.items() if v is not None]
        for key, value in self.options.items():
            if value is True:
                flags.append(f"--{key}")
            elif value is not False and value is not None:
                flags.append(f"--{key}={value}")
        return flags


class PredictConfig(_Strict):
    prefix: str = Field("predictions", pattern=r"^[A-Za-z0-9_.]+$")
    reshuffle: bool | None = Field(
        None,
        description="spread records over workers before the model; default (null): only when the "
        "runner has more than one worker (not the in-process FnApiRunner/DirectRunner)",
    )
    compression_level: int = Field(1, ge=0, le=3, description="gzip level 1–3 (ISA-L); 0: plain TFRecord")

    def should_reshuffle(self, flags: Sequence[str]) -> bool:
        """Reshuffling moves every record through the runner's shuffle: worth it only across workers.
        ``flags`` are the Beam flags of the run (later flags win)."""
        if self.reshuffle is not None:
            return self.reshuffle
        return local_workers(flags) != 1


def local_workers(flags: Sequence[str]) -> int | None:
    """How many workers run the pipeline in this process by the Beam flags (later flags win); None
    when the runner runs it elsewhere (Dataflow, a job service's workers)."""
    runner, workers = "FnApiRunner", 1
    for flag in flags:
        key, _, value = flag.removeprefix("--").partition("=")
        if key == "runner":
            runner = value
        elif key == "direct_num_workers":
            workers = int(value or 1)
    return workers if runner in ("FnApiRunner", "DirectRunner") else None


class StacOutput(_Strict):
    """A STAC API whose Transactions endpoint receives each run's map Item."""

    api: str = Field(description="STAC API root URL, e.g. http://127.0.0.1:8080")
    collection: str = Field(description="collection the Items go into (created on first use)")


class OutputsConfig(_Strict):
    class_map: bool = True
    probabilities: bool = True
    quicklook: bool = True
    quicklook_rgb: list[str] | None = Field(
        None,
        description="three source bands (red, green, blue) drawn under the classes in the quicklook; "
        "default: bands named red, green, blue if the source has them; [] for none",
    )
    quicklook_stretch: tuple[float, float] | None = Field(
        None, description="band values shown as black and white; default: each band's 2nd–98th percentile"
    )
    quicklook_opacity: float = Field(0.5, ge=0, le=1, description="of the classes over the imagery")
    colors: dict[str, str] = Field(default_factory=dict, description="class → '#rrggbb'")
    tile_size: int = Field(
        2048,
        ge=1,
        description="map tile side in pixels, rounded down to whole patches: one COG per tile and "
        "layer, written by one worker (memory per tile: a patch plus GDAL's cache)",
    )
    single_file_max_pixels: int = Field(
        2**28,
        ge=0,
        description="also assemble one COG per layer from the tiles when the region has at most this "
        "many pixels (0: never); the VRT over the tiles is always written",
    )
    compression: Literal["zstd", "deflate", "lzw", "none"] = Field(
        "zstd",
        description="codec of the map COGs: zstd (level 1 by default) compresses like deflate at about "
        "twice its speed (BENCHMARKS.md); deflate for readers without ZSTD",
    )
    compression_level: int | None = Field(
        None,
        ge=1,
        le=22,
        description="codec level (GDAL's LEVEL); default: 1 for zstd, GDAL's for the others",
    )
    tfrecord: bool = Field(
        False,
        description="a raster-sourced run also writes Earth Engine-layout prediction shards + mixer",
    )
    earthengine: EarthEngineSink | None = Field(
        None, description="also deliver the map into an Earth Engine image collection"
    )
    stac: StacOutput | None = Field(
        None, description="also post the map's STAC Item to a STAC API (Transactions extension)"
    )


class WorkflowConfig(_Strict):
    retries: int = Field(3, ge=1, description="attempts per step for transient failures")
    backoff_seconds: float = Field(2.0, ge=0, description="first retry delay; doubles, with ±50 % jitter")
    max_backoff_seconds: float = Field(300.0, ge=0)


class ScheduleConfig(_Strict):
    """When `terrabeam schedule` runs the pipeline; each run covers the interval since the previous fire."""

    cron: str = Field(description="cron expression in UTC, e.g. '0 6 1 * *' (monthly, 1st, 06:00)")
    start: datetime = Field(description="windows start at the first fire time at or after this (UTC)")
    catch_up: Literal["all", "latest", "none"] = Field(
        "latest",
        description="windows that closed while no scheduler ran: run all of them, only the latest, or none",
    )
    wait_for_data: bool = Field(
        False,
        description="a window whose source had no imagery (no_data) is run again at each later look, "
        "until it has some; false: no data closes the window",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression (minute hour day month weekday)")
        return value

    @field_validator("start")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class LimitsConfig(_Strict):
    """What `terrabeam run` starts without asking: a plan above a limit is refused unless --yes."""

    max_patches: int | None = Field(
        100_000,
        ge=1,
        description="patches in the grid at most (null: no limit); 100 000 patches of 192 px are "
        "about 30 Sentinel-2 tiles at 20 m",
    )
    max_scratch_bytes: int | None = Field(
        100 * 2**30,
        ge=1,
        description="temporary disk a run needs at most, bytes (null: no limit): map tiles in flight, "
        "their prediction records (outputs.tfrecord), an export downloaded for predict",
    )


class PlanConfig(_Strict):
    """`terrabeam plan`: the calibration and the Dataflow price table."""

    prices: dict[str, float] = Field(
        default_factory=dict,
        description="Dataflow worker machine type → US$ per worker-hour, over the built-in list prices "
        "(terrabeam plan --json shows which were used and their date)",
    )
    calibration_patches: int = Field(
        8, ge=1, description="real patches read, predicted and encoded to time this machine"
    )

    @field_validator("prices")
    @classmethod
    def _positive_prices(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, price in value.items() if not price > 0)
        if bad:
            raise ValueError(f"prices of {bad} must be positive US$ per worker-hour")
        return value


class GcpDeployConfig(_Strict):
    """Google Cloud deployment (`terrabeam deploy gcp`); project, region and buckets come from runner."""

    workspace: str = Field(
        pattern=r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\s]*)?$",
        description="gs:// folder the cloud runs live in (<run>/export, predict, deliver)",
    )
    repository: str = Field(
        "terrabeam",
        pattern=r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        description="Artifact Registry Docker repository (in runner.region; created if missing)",
    )
    service: str | None = Field(
        None,
        pattern=r"^[a-z]([a-z0-9-]{0,47}[a-z0-9])?$",
        description="Cloud Run service for export and deliver (default: <name>-steps)",
    )
    workflow: str | None = Field(
        None,
        pattern=r"^[a-z]([a-z0-9_-]{0,62}[a-z0-9])?$",
        description="Cloud Workflows workflow (default: <name>)",
    )
    memory: str = Field("4Gi", pattern=r"^[0-9]+(Mi|Gi)$", description="memory of a Cloud Run instance")
    cpu: int = Field(2, ge=1, le=8, description="vCPUs of a Cloud Run instance")


class DeployConfig(_Strict):
    """Where `terrabeam deploy` puts the pipeline."""

    gcp: GcpDeployConfig | None = None


def _source_kind(value: Any) -> str:
    """``source.kind`` picks the source model; a source without ``kind`` is a raster source."""
    kind = value.get("kind", "raster") if isinstance(value, dict) else getattr(value, "kind", "raster")
    return kind if kind in ("raster", "earthengine", "stac") else "raster"


class PipelineConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    workspace: str = "workspace"
    source: Annotated[
        Annotated[RasterSource, Tag("raster")]
        | Annotated[EarthEngineSource, Tag("earthengine")]
        | Annotated[StacSource, Tag("stac")],
        Discriminator(_source_kind),
    ]
    earthengine: EarthEngineConfig | None = None
    grid: GridConfig = GridConfig()
    export: ExportConfig = ExportConfig()
    model: ModelConfig
    predict: PredictConfig = PredictConfig()
    runner: RunnerConfig = RunnerConfig()
    outputs: OutputsConfig = OutputsConfig()
    workflow: WorkflowConfig = WorkflowConfig()
    schedule: ScheduleConfig | None = None
    deploy: DeployConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    plan: PlanConfig = PlanConfig()

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        exported = self.source.band_names
        missing = [b for b in self.model.input_bands if b not in exported]
        if missing:
            raise ValueError(
                f"model.input_bands {missing} are not bands of the source; source bands: {exported}"
            )
        uses_ee = self.source.kind == "earthengine" or self.outputs.earthengine is not None
        if uses_ee and self.earthengine is None:
            raise ValueError(
                "the earthengine source or sink needs an 'earthengine:' section (project, staging)"
            )
        if self.source.kind in ("earthengine", "stac"):
            kind = self.source.kind
            a_kind = f"an {kind}" if kind == "earthengine" else f"a {kind}"
            missing = [n for n in ("crs", "resolution") if getattr(self.grid, n) is None]
            if self.grid.region.bbox is None and self.grid.region.geojson is None:
                missing.append("region")
            if missing:
                raise ValueError(f"{a_kind} source needs grid.{', grid.'.join(missing)}")
            if self.grid.align == "source":
                raise ValueError(
                    f"grid.align: source means the first band's pixel edges, and {a_kind} source "
                    "has no band file; use origin (the default: what crsTransform expects) or [x0, y0]"
                )
        if self.source.kind == "stac" and self.outputs.earthengine is not None:
            raise ValueError(
                "outputs.earthengine with a stac source is not supported: its maps are delivered as files"
            )
        unknown = sorted(set(self.outputs.colors) - set(self.model.classes or []))
        if unknown:
            raise ValueError(f"outputs.colors names {unknown}, not in model.classes {self.model.classes}")
        rgb = self.outputs.quicklook_rgb
        if rgb:
            if len(rgb) != 3:
                raise ValueError(f"outputs.quicklook_rgb needs three bands (red, green, blue), got {rgb}")
            files = list(self.source.bands) if self.source.kind in ("raster", "stac") else []
            if any(band not in files for band in rgb):
                raise ValueError(
                    f"outputs.quicklook_rgb {rgb}: the imagery is read from the source's band files "
                    f"or STAC assets; bands with files: {files}"
                )
        return self

    def quicklook_bands(self) -> list[str]:
        """The source bands under the quicklook's classes (none where the source has no files)."""
        if self.outputs.quicklook_rgb is not None:
            return list(self.outputs.quicklook_rgb)
        files = self.source.bands if self.source.kind in ("raster", "stac") else {}
        return ["red", "green", "blue"] if all(b in files for b in ("red", "green", "blue")) else []

    def locate(self, path: str) -> str:
        """A path from the file made absolute against the file's directory; a URI (gs://, s3://,
        http(s)://, /vsi…) is returned as it is."""
        if "://" in path or path.startswith("/vsi"):
            return path
        return str(self.resolve(path))

    def resolve(self, path: str) -> Path:
        """A local path from the file, made absolute against the file's directory."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (self._base_dir / candidate).resolve()

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source_path(self) -> Path | None:
        """The YAML file this configuration was loaded from (None if built in code)."""
        return self._source_path

    def fingerprint(self) -> str:
        """A short hash of the validated configuration (same settings, same hash). ``limits`` and
        ``plan`` are left out: they change what may start, not what a run makes, so raising a limit
        does not turn an unfinished run into a new one."""
        document = self.model_dump(mode="json", exclude={"limits", "plan"})
        canonical = json.dumps(document, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _format_errors(source: str, error: ValidationError) -> str:
    """One line for one problem (``file: field = value: what to do``), else a line per problem."""
    lines = [f"{source}: invalid configuration ({error.error_count()} problems)"]
    for item in error.errors():
        parts = [str(p) for p in item["loc"]]
        if parts[:1] == ["source"] and parts[1:2] in (["raster"], ["earthengine"], ["stac"]):
            del parts[1]  # the source kind's union tag, not a field the user wrote
        location = ".".join(parts) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            lines.append(f"  {location}: missing (required)")
            continue
        value = item.get("input")
        if isinstance(value, dict) or (isinstance(value, str) and value and message.startswith(value)):
            # a check across a section's fields, or a sentence about the value: the message says it all
            lines.append(f"  {message}" if not parts else f"  {location}: {message}")
            continue
        shown = json.dumps(value, default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {location} = {shown}: {message}")
    if len(lines) == 2:
        return f"{source}: {lines[1].strip()}"
    return "\n".join(lines)


def parse_config(document: Any, base_dir: Path, source: str = "config") -> PipelineConfig:
    """Validate a loaded YAML document; relative paths will resolve against ``base_dir``."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(document).__name__}")
    try:
        config = PipelineConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    config._base_dir = base_dir.resolve()
    return config


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
        document = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a configuration file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a pipeline config is YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if document is None:
        raise ConfigError(f"{path}: the file is empty; a pipeline config is a YAML mapping (see examples/)")
    config = parse_config(document, path.parent, source=str(path))
    config._source_path = path.resolve()
    return config
