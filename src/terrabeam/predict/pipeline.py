"""The predict step as one Apache Beam pipeline: keyed shards → model → ordered prediction shards.

Runs on Beam's FnApiRunner by default (the default runner would try to download Prism); any other
runner and its options come from the config's ``runner:`` section or the command line (later flags
win).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from terrabeam import NAMESPACE, beam_local
from terrabeam.beam_ml import KeyedModelHandler, RunInference
from terrabeam.config import PipelineConfig, local_workers
from terrabeam.errors import ConfigError, RecordCountError, TerrabeamError
from terrabeam.grid import Grid
from terrabeam.layout import ExportManifest, find_export, manifest_path, mixer_path, shard_name
from terrabeam.predict.engines import default_threads
from terrabeam.predict.io import (
    DecodeRecord,
    PostProcess,
    PreparePatch,
    ReadKeyedRecords,
    WritePredictionShards,
)
from terrabeam.predict.models import PatchModelHandler, probe_model, release_models
from terrabeam.region import TrueRegion, projected_geometry
from terrabeam.storage import list_files
from terrabeam.tfrecord import count_records


def pipeline_flags(config: PipelineConfig, extra: Sequence[str] = ()) -> list[str]:
    """Beam flags from the config's ``runner:`` section, then ``extra`` (so the command line wins).

    Dataflow workers must get terrabeam's code: a worker image (``sdk_container_image``, which
    `terrabeam deploy gcp` builds) or a package to install; without either the job would fail on
    its workers after minutes, so it fails here at once.
    """
    flags = config.runner.beam_flags() + list(extra)
    keys = {flag.removeprefix("--").partition("=")[0]: flag.partition("=")[2] for flag in flags}
    shipped = {"sdk_container_image", "setup_file", "extra_package", "extra_packages"} & set(keys)
    if keys.get("runner") == "DataflowRunner" and not shipped:
        raise ConfigError(
            "runner kind 'dataflow': workers need terrabeam installed; set runner.sdk_container_image "
            "(a worker image; `terrabeam deploy gcp` renders its Dockerfile) or runner.options.setup_file"
        )
    return flags


def run_counted(pipeline: beam.Pipeline) -> dict[str, int]:
    """Run ``pipeline`` to its end, then drop the models it left loaded (``release_models``, also
    when it failed); terrabeam's counters, summed by name (committed, else attempted)."""
    try:
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        release_models()  # the probe's (if the pipeline ran elsewhere) and Beam's
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + (counter.committed or counter.attempted or 0)
    return totals


def model_placement(config: PipelineConfig, beam_args: Sequence[str] = ()) -> tuple[int, bool]:
    """(intra-op threads per model copy, whether the model runs on this machine) for a run."""
    workers = local_workers(config.runner.beam_flags() + list(beam_args))
    return default_threads(config.model, workers), workers is not None


class PredictPatches(beam.PTransform):
    """(PatchKey, {band: (H, W)}) → (PatchKey, prediction bands at core size): the model's input
    prepared, Beam's RunInference with terrabeam's handler, and the output post-processed.

    ``region`` is the true region's (width, height) in pixels; a patch whose core lies wholly
    outside it or outside ``grid.region``'s polygon skips the model, as does one whose core is
    wholly masked (both counted as ``patches_skipped``). Without ``region`` (the patches' keys do
    not hold their grid index) only masked cores are skipped.
    """

    def __init__(
        self,
        config: PipelineConfig,
        model_path: str,
        grid: Grid,
        margin: tuple[int, int],
        region: tuple[int, int] | None,
        threads: int,
    ) -> None:
        super().__init__()
        self.config, self.model_path, self.grid, self.margin = config, model_path, grid, margin
        self.region = region
        self.threads = threads

    def expand(self, patches: beam.PCollection) -> beam.PCollection:
        model = self.config.model
        norm = model.normalization
        handler = KeyedModelHandler(PatchModelHandler(model, self.model_path, self.margin, self.threads))
        core = (self.grid.patch_height, self.grid.patch_width)
        region = None
        if self.region is not None:
            region = TrueRegion(self.grid, *self.region, projected_geometry(self.config, self.grid.crs))
        prepare = PreparePatch(model.input_bands, norm.factors() if norm else None, model.nodata, region)
        return (
            patches
            | "PreparePatch" >> beam.ParDo(prepare)
            | "RunInference" >> RunInference(handler)
            | "PostProcess" >> beam.ParDo(PostProcess(model.output_names, core, model.output))
        )


@dataclass(frozen=True)
class PredictResult:
    grid: Grid
    manifest: ExportManifest
    shards: list[Path]
    records: int
    reused_shards: int = 0
    patches_skipped: int = 0  # by this run's pipeline: cores wholly masked or outside the region
    remote_shards: dict[str, str] = field(default_factory=dict)  # name → URI of shards left remote


def read_export(
    config: PipelineConfig, export_dir: Path, names: Sequence[str] | None = None
) -> tuple[Grid, ExportManifest, list[Path]]:
    """Mixer, manifest and shards of an export, terrabeam's or Earth Engine's however named (see
    ``layout.find_export``); without a manifest, margin and bands come from the config. ``names``:
    the export's file names when only its metadata is here (the shards stay remote)."""
    explicit = config.export.mixer
    mixer = config.resolve(explicit) if explicit else None
    files = find_export(export_dir, config.export.prefix, mixer, names)
    grid = Grid.read_mixer(files.mixer)
    shards = files.shards
    if files.manifest is not None:
        manifest = ExportManifest.read(files.manifest)
        declared = sum(manifest.shard_records)
        if declared != grid.total_patches or len(manifest.shard_records) != len(shards):
            raise RecordCountError(
                f"{files.mixer}: totalPatches={grid.total_patches} but "
                f"{files.manifest.name} lists {declared} records in {len(manifest.shard_records)} "
                f"shards and {len(shards)} shard files are present in {export_dir}"
            )
    else:
        manifest = ExportManifest(
            kernel_size=list(config.grid.kernel_size),
            region_width=grid.width,
            region_height=grid.height,
            bands=config.source.band_names,
        )
    return grid, manifest, shards


@dataclass(frozen=True)
class RemoteIO:
    """For workers that cannot see this machine's files (Dataflow, a remote job service): where they
    read the export's shards and the model, and where they write prediction shards (URIs)."""

    export: str
    work: str
    model: str
    tiles: str


def run_predict(
    config: PipelineConfig,
    export_dir: Path,
    out_dir: Path,
    beam_args: Sequence[str] = (),
    probe: bool = True,
    remote: RemoteIO | None = None,
    export_names: Sequence[str] | None = None,
) -> PredictResult:
    """Predict every patch of ``export_dir`` into ``out_dir`` (prediction shards + mixer + manifest).

    ``probe=False`` skips the model probe when the caller has just probed the same model and shape.
    With ``remote``, the workers read and write object storage; the prediction shards stay in
    ``remote.work`` (``PredictResult.remote_shards``), and ``out_dir`` gets the mixer and manifest
    (an export without shard counts: the shards are copied into ``out_dir`` too). ``export_names``:
    the export's files when only its metadata is in ``export_dir``.
    """
    grid, manifest, shards = read_export(config, export_dir, export_names)
    kw, kh = manifest.kernel_size
    shape = (grid.patch_height + kh, grid.patch_width + kw)
    own_model = config.locate(config.model.path)
    model_path = remote.model if remote else own_model
    margin = (kw // 2, kh // 2)
    threads, here = model_placement(config, beam_args)
    if probe:  # the configured file, not the workers' copy: a local model is not fetched back
        probe_model(config.model, own_model, shape, margin, threads, here)

    compressed = config.predict.compression_level > 0
    names = [shard_name(config.predict.prefix, i, compressed) for i in range(len(shards))]
    expected = manifest.shard_records or None
    stays_remote = remote is not None and expected is not None
    if stays_remote:  # objects appear whole: one there is a finished shard (steps clears stale ones)
        there = {posixpath.basename(path) for path, size in list_files(f"{remote.work}/*") if size}
        finished = {i for i, name in enumerate(names) if name in there}
    else:
        finished = finished_shards(out_dir, names, expected)
    todo = [i for i in range(len(shards)) if i not in finished]
    flags = pipeline_flags(config, beam_args)
    pipeline = beam_local.pipeline(PipelineOptions(flags))
    sources = [f"{remote.export}/{p.name}" for p in shards] if remote else [str(p) for p in shards]
    target = remote.work if remote else str(out_dir)
    records = pipeline | "Shards" >> beam.Create([(i, sources[i]) for i in todo])
    # with the shards' counts a record's key holds its grid index, so the region test can place it
    offsets = [sum(expected[:i]) for i in range(len(shards))] if expected else None
    records = records | "ReadKeyedRecords" >> beam.ParDo(ReadKeyedRecords(offsets))
    reshuffle = config.predict.should_reshuffle(flags)
    if reshuffle:
        records = records | "Reshuffle" >> beam.Reshuffle()
    _ = (
        records
        | "DecodeRecord"
        >> beam.ParDo(DecodeRecord([str(p) for p in shards], config.model.input_bands, shape))
        | "Predict"
        >> PredictPatches(
            config,
            model_path,
            grid,
            margin,
            (manifest.region_width, manifest.region_height) if expected else None,
            threads,
        )
        # reshuffled: a shard's records are spread over workers, bring them together; otherwise each
        # shard stays in one bundle, in order, and streams out with flat memory
        | "WritePredictionShards"
        >> WritePredictionShards(target, names, config.predict.compression_level, expected, reshuffle)
    )
    read = written = skipped = 0
    if todo:
        totals = run_counted(pipeline)
        read, written = totals.get("records_read", 0), totals.get("records_written", 0)
        skipped = totals.get("patches_skipped", 0)
        if remote is not None and not stays_remote:
            from terrabeam.storage import copy_file

            for i in todo:
                copy_file(f"{remote.work}/{names[i]}", str(out_dir / names[i]))
    kept = sum(expected[i] for i in finished) if expected else 0
    if read + kept != grid.total_patches or written + kept != grid.total_patches:
        raise RecordCountError(
            f"{mixer_path(export_dir, config.export.prefix)}: totalPatches={grid.total_patches} but "
            f"{read + kept} records were read from {len(shards)} shard(s) in {export_dir} "
            f"({written + kept} written)"
        )
    out_shards = [out_dir / name for name in names]
    grid.write_mixer(mixer_path(out_dir, config.predict.prefix))
    if stays_remote:
        there = {posixpath.basename(path) for path, _ in list_files(f"{remote.work}/*")}
        missing = [f"{remote.work}/{name}" for name in names if name not in there]
        if missing:
            raise RecordCountError(f"prediction shards not written: {missing}")
        counts = list(expected)
    else:
        counts = [int(c) for c in _shard_counts(out_shards, manifest, grid)]
    ExportManifest(
        kernel_size=[0, 0],
        region_width=manifest.region_width,
        region_height=manifest.region_height,
        bands=prediction_bands(config),
        shard_records=counts,
    ).write(manifest_path(out_dir, config.predict.prefix))
    remote_shards = {name: f"{remote.work}/{name}" for name in names} if stays_remote else {}
    return PredictResult(grid, manifest, out_shards, written + kept, len(finished), skipped, remote_shards)


def finished_shards(out_dir: Path, names: list[str], expected: list[int] | None) -> set[int]:
    """Shards an interrupted run already wrote and that verify (every CRC, the expected record
    count); leftovers of unfinished shards are removed. Without expected counts nothing is reused."""
    for partial in out_dir.glob("*.partial"):
        partial.unlink()
    if not expected:
        return set()
    finished = set()
    for number, name in enumerate(names):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            if count_records(path) == expected[number]:
                finished.add(number)
                continue
        except TerrabeamError:
            pass
        path.unlink()
    return finished


def prediction_bands(config: PipelineConfig) -> list[str]:
    """Band names of the prediction records, in the order deliver writes them."""
    if config.model.output == "regression":
        return list(config.model.output_names)
    return ["class", *(f"prob_{c}" for c in config.model.output_names)]


def _shard_counts(out_shards: list[Path], manifest: ExportManifest, grid: Grid) -> list[int]:
    missing = [p for p in out_shards if not p.exists()]
    if missing:
        raise RecordCountError(f"prediction shards not written: {[str(p) for p in missing]}")
    if manifest.shard_records:
        return manifest.shard_records
    return [count_records(p) for p in out_shards]
