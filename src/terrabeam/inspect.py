"""``terrabeam inspect``: validate TFRecord shard sets in Earth Engine's layout (Earth Engine's exports
or terrabeam's) and COGs. Every record is read once, streamed, its CRCs checked and its Example
decoded; each violation names its file and, where it has one, its record.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from terrabeam.errors import CorruptRecordError, GridMismatchError, InputError
from terrabeam.grid import Grid
from terrabeam.layout import (
    ExportManifest,
    export_prefixes,
    find_mixer,
    list_shards,
    manifest_path,
    parse_shard_name,
)
from terrabeam.tfrecord import decode_example, read_records

MAX_FINDINGS = 100  # per file set: a shard damaged throughout says so in 100 lines, then counts the rest
COG_SUFFIXES = (".tif", ".tiff")
# Earth Engine ingests image patches from int64_list and float_list features (bytes_list is no band).
INGESTIBLE_TYPES = ("float", "int64")


@dataclass(frozen=True)
class Finding:
    """A violation or warning: the file, the record (its position in that file) where there is one."""

    file: str
    message: str
    record: int | None = None

    def __str__(self) -> str:
        where = self.file if self.record is None else f"{self.file} record {self.record}"
        return f"{where}: {self.message}"


@dataclass
class Findings:
    """Violations (the file set breaks the format: exit 1) and warnings (worth knowing, not wrong)."""

    violations: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    omitted: int = 0  # violations past MAX_FINDINGS, counted only

    def violate(self, file: str | Path, message: str, record: int | None = None) -> None:
        if len(self.violations) < MAX_FINDINGS:
            self.violations.append(Finding(str(file), message, record))
        else:
            self.omitted += 1

    def warn(self, file: str | Path, message: str, record: int | None = None) -> None:
        self.warnings.append(Finding(str(file), message, record))

    @property
    def valid(self) -> bool:
        return not self.violations and not self.omitted

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "violations": [asdict(f) for f in self.violations],
            "violations_omitted": self.omitted,
            "warnings": [asdict(f) for f in self.warnings],
        }

    def lines(self) -> list[str]:
        out = [f"  VIOLATION {f}" for f in self.violations]
        if self.omitted:
            out.append(f"  … and {self.omitted} more violations")
        return out + [f"  warning {f}" for f in self.warnings]


def _own_message(message: str, file: Path | str) -> str:
    """``message`` without the leading ``<file>: `` our errors start with (the Finding names the file)."""
    prefix = f"{file}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


@dataclass(frozen=True)
class FeatureInfo:
    """One feature of the records: its list type (float, int64, bytes) and number of values."""

    name: str
    type: str
    length: int


@dataclass(frozen=True)
class ShardInfo:
    path: str
    number: int | None  # None: unnumbered (a single-file export)
    records: int  # readable records; all of them when ``complete``
    complete: bool  # read to its end without a damaged record
    compressed: bool
    size_bytes: int


@dataclass
class RecordSetReport:
    """One shard set: its shards in patch order, mixer and terrabeam manifest where present, the
    records' features, the patch size and kernel margin, and what Earth Engine ingestion needs."""

    directory: str
    prefix: str
    shards: list[ShardInfo]
    whole: bool  # every shard of the set was inspected (not one shard picked out of several)
    mixer: str | None = None
    manifest: str | None = None
    grid: Grid | None = None
    features: list[FeatureInfo] = field(default_factory=list)
    patch_size: tuple[int, int] | None = None  # [width, height] of the core
    kernel_size: tuple[int, int] | None = None
    kernel_size_source: str | None = None  # "manifest", "inferred" or "assumed"
    ingestion_needs: list[str] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def ingestible(self) -> bool:
        """Earth Engine could ingest these shards with their mixer as an image (a prediction's case)."""
        return self.findings.valid and not self.ingestion_needs

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "tfrecord",
            "directory": self.directory,
            "prefix": self.prefix,
            "whole_set": self.whole,
            "records": self.records,
            "shards": [asdict(s) for s in self.shards],
            "mixer": self.mixer,
            "grid": self.grid.to_mixer() if self.grid else None,
            "manifest": self.manifest,
            "features": [asdict(f) for f in self.features],
            "patch_size": list(self.patch_size) if self.patch_size else None,
            "kernel_size": list(self.kernel_size) if self.kernel_size else None,
            "kernel_size_source": self.kernel_size_source,
            "earth_engine_ingestion": {"ready": self.ingestible, "needs": self.ingestion_needs},
        } | self.findings.as_dict()

    def lines(self) -> list[str]:
        shards = f"{len(self.shards)} shard{'s' * (len(self.shards) != 1)}"
        part = "" if self.whole else " (one shard of the set)"
        read = ", every CRC checked" if all(s.complete for s in self.shards) else " read before the damage"
        out = [
            f"{Path(self.directory) / self.prefix}*: {shards}{part}, {self.records} records{read}",
            f"  mixer: {Path(self.mixer).name if self.mixer else 'none'}; "
            f"manifest: {Path(self.manifest).name if self.manifest else 'none'}",
        ]
        if self.features:
            out.append("  features: " + ", ".join(f"{f.name} {f.type}×{f.length}" for f in self.features))
        if self.grid:
            g = self.grid
            out.append(
                f"  grid: {g.crs}, patchDimensions [{g.patch_width}, {g.patch_height}], "
                f"patchesPerRow {g.patches_per_row}, totalPatches {g.total_patches}"
            )
        if self.patch_size and self.kernel_size:
            out.append(
                f"  patch {self.patch_size[0]}×{self.patch_size[1]}, kernel margin "
                f"[{self.kernel_size[0]}, {self.kernel_size[1]}] ({self.kernel_size_source})"
            )
        verdict = (
            "ready"
            if self.ingestible
            else "not ready: " + "; ".join(self.ingestion_needs or ["fix the violations"])
        )
        out.append(f"  Earth Engine ingestion: {verdict}")
        return out + self.findings.lines()


@dataclass
class CogReport:
    """A GeoTIFF: what ``rio cogeo validate`` says, its layout, and terrabeam's TERRABEAM_* tags."""

    path: str
    cog: bool = False
    width: int | None = None
    height: int | None = None
    bands: int | None = None
    dtype: str | None = None
    crs: str | None = None
    block_size: list[int] | None = None
    compression: str | None = None
    overviews: list[int] = field(default_factory=list)
    terrabeam_tags: dict[str, str] = field(default_factory=dict)
    findings: Findings = field(default_factory=Findings)

    def as_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "findings"}
        return {"kind": "cog"} | fields | self.findings.as_dict()

    def lines(self) -> list[str]:
        if self.width is None:
            return [f"{self.path}: not readable as a GeoTIFF", *self.findings.lines()]
        out = [
            f"{self.path}: {'a valid COG' if self.cog else 'NOT a valid COG'} ({self.width}×{self.height}, "
            f"{self.bands} band(s) {self.dtype}, {self.crs}, blocks {self.block_size}, "
            f"{self.compression or 'uncompressed'}, overviews {self.overviews or 'none'})",
            "  terrabeam tags: "
            + (
                ", ".join(f"{k}={v}" for k, v in self.terrabeam_tags.items())
                or "none (not made by terrabeam)"
            ),
        ]
        return out + self.findings.lines()


Report = RecordSetReport | CogReport


@dataclass
class Inspection:
    """The reports of everything the PATHs named, and the PATHs that named nothing inspectable."""

    reports: list[Report] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)

    @property
    def violations(self) -> int:
        every = [self.findings, *(r.findings for r in self.reports)]
        return sum(len(f.violations) + f.omitted for f in every)

    @property
    def valid(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "violations": self.violations,
            "reports": [r.as_dict() for r in self.reports],
            "errors": [asdict(f) for f in self.findings.violations],
        }

    def summary(self) -> str:
        lines = [line for r in self.reports for line in r.lines()] + self.findings.lines()
        count = len(self.reports)
        verdict = "valid" if self.valid else f"{self.violations} violation(s)"
        lines.append(f"inspected {count} file set{'s' * (count != 1)}: {verdict}")
        return "\n".join(lines)


# --- what a PATH names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _RecordSet:
    directory: Path
    prefix: str
    only: Path | None = None  # one shard picked out of its set
    mixer: Path | None = None  # a mixer named explicitly


def _targets(path: Path, inspection: Inspection) -> list[_RecordSet | Path]:
    """The shard sets and COGs ``path`` names: a folder (an export, predict or deliver folder, or a
    run folder holding those), a mixer or manifest, a shard, or a GeoTIFF."""
    if path.is_dir():
        found = _in_folder(path)
        if not found:  # a run folder: its export/, predict/ and deliver/
            found = [t for sub in sorted(p for p in path.iterdir() if p.is_dir()) for t in _in_folder(sub)]
        if not found:
            inspection.findings.violate(path, "no TFRecord shards and no GeoTIFFs here, nor one folder down")
        return found
    if not path.is_file():
        inspection.findings.violate(path, "not found")
        return []
    if path.name.lower().endswith(COG_SUFFIXES):
        return [path]
    parsed = parse_shard_name(path.name)
    if parsed:
        return [_RecordSet(path.parent, parsed[0], only=path)]
    if path.suffix == ".json":
        prefixes = export_prefixes(path.parent)
        for suffix, mixer in (
            ("-manifest.json", None),
            ("-mixer.json", path),
            ("mixer.json", path),
            (".json", path),
        ):
            stem = path.name.removesuffix(suffix)
            if path.name.endswith(suffix) and stem in prefixes:
                return [_RecordSet(path.parent, stem, mixer=mixer)]
        if len(prefixes) == 1:
            return [_RecordSet(path.parent, prefixes[0], mixer=path)]
        inspection.findings.violate(
            path, f"no shard set of its own beside it (found: {', '.join(prefixes) or 'none'})"
        )
        return []
    inspection.findings.violate(path, "neither a TFRecord shard, a mixer (.json) nor a GeoTIFF (.tif)")
    return []


def _in_folder(folder: Path) -> list[_RecordSet | Path]:
    cogs = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(COG_SUFFIXES))
    return [_RecordSet(folder, prefix) for prefix in export_prefixes(folder)] + cogs


def inspect_paths(paths: Iterable[str | Path]) -> Inspection:
    """Inspect every file set and COG the ``paths`` name, each once (a set named twice, say by its
    folder and by its mixer, is inspected as first named)."""
    inspection = Inspection()
    seen: set[object] = set()
    for path in paths:
        for target in _targets(Path(path), inspection):
            key = (
                target.resolve()
                if isinstance(target, Path)
                else (target.directory.resolve(), target.prefix, target.only)
            )
            if key in seen:
                continue
            seen.add(key)
            if isinstance(target, Path):
                inspection.reports.append(inspect_cog(target))
            else:
                inspection.reports.append(
                    inspect_record_set(target.directory, target.prefix, target.only, target.mixer)
                )
    return inspection


# --- shard sets ------------------------------------------------------------------------------------


def inspect_record_set(
    directory: str | Path, prefix: str, only: Path | None = None, mixer: Path | None = None
) -> RecordSetReport:
    """Inspect the shards of ``prefix`` in ``directory`` (or the one shard ``only``) with their mixer
    (``mixer``, else found as ``layout.find_mixer`` finds it) and terrabeam's manifest if present."""
    directory = Path(directory)
    findings = Findings()
    set_name = directory / f"{prefix}*"
    try:
        every = list_shards(directory, prefix)
    except InputError as exc:  # ambiguous: e.g. p.tfrecord.gz beside p-00000.tfrecord.gz
        findings.violate(set_name, _own_message(str(exc), directory))
        every = [p for p in sorted(directory.iterdir()) if (parse_shard_name(p.name) or ("",))[0] == prefix]
    shards = every if only is None else [only]
    report = RecordSetReport(str(directory), prefix, [], whole=shards == every, findings=findings)
    _check_numbering(report, shards, set_name)
    report.grid = _read_mixer(report, directory, prefix, mixer)
    manifest = _read_manifest(report, directory, prefix)
    schema = _read_records(report, shards)
    report.features = [FeatureInfo(name, kind, length) for name, (kind, length) in schema.items()]
    _infer_patch(report, manifest)
    _check_grid(report, manifest)
    _ingestion(report)
    return report


def _check_numbering(report: RecordSetReport, shards: Sequence[Path], set_name: Path) -> None:
    """Shards continue the patch order by their numbers: 00000, 00001, … without a gap."""
    if not report.whole:
        return
    numbers = [parsed[1] for parsed in map(parse_shard_name, (s.name for s in shards)) if parsed]
    if None in numbers:
        return
    for expected, (number, shard) in enumerate(zip(numbers, shards, strict=True)):
        if number != expected:
            report.findings.violate(
                set_name,
                f"shard {expected:05d} is missing ({shard.name} follows): the patches after it would be "
                "placed wrongly",
            )
            return


def _read_mixer(report: RecordSetReport, directory: Path, prefix: str, mixer: Path | None) -> Grid | None:
    if mixer is None:
        try:
            mixer = find_mixer(directory, prefix)
        except InputError as exc:
            report.findings.warn(
                directory / f"{prefix}*", _own_message(str(exc), directory) + "; grid not checked"
            )
            report.ingestion_needs.append("a mixer (Earth Engine ingests the shards with their mixer.json)")
            return None
    report.mixer = str(mixer)
    try:
        return Grid.read_mixer(mixer)
    except GridMismatchError as exc:
        report.findings.violate(mixer, _own_message(str(exc), mixer))
        return None


def _read_manifest(report: RecordSetReport, directory: Path, prefix: str) -> ExportManifest | None:
    path = manifest_path(directory, prefix)
    if not path.is_file():
        return None
    report.manifest = str(path)
    try:
        return ExportManifest.read(path)
    except (InputError, OSError) as exc:
        report.findings.violate(path, _own_message(str(exc), path))
        return None


def _type_of(values: np.ndarray | list[bytes]) -> str:
    if isinstance(values, list):
        return "bytes"
    return "int64" if values.dtype == np.int64 else "float"


def _read_records(report: RecordSetReport, shards: Sequence[Path]) -> dict[str, tuple[str, int]]:
    """Stream every record of ``shards``: framing and CRCs, the Example, and its features against the
    first record's. Fills ``report.shards``; returns the first record's {name: (type, length)}."""
    schema: dict[str, tuple[str, int]] | None = None
    for shard in shards:
        records, complete = 0, True
        try:
            for payload in read_records(shard):
                try:
                    example = decode_example(payload)
                except ValueError as exc:
                    report.findings.violate(shard, str(exc), records)
                else:
                    found = {name: (_type_of(v), len(v)) for name, v in sorted(example.items())}
                    if schema is None:
                        schema = found
                    elif found != schema:
                        report.findings.violate(shard, _schema_difference(schema, found), records)
                records += 1
        except CorruptRecordError as exc:
            complete = False
            report.findings.violate(shard, _own_message(str(exc), shard), records)
        compressed = _is_gzip(shard)
        report.shards.append(
            ShardInfo(
                str(shard),
                (parse_shard_name(shard.name) or ("", None))[1],
                records,
                complete,
                compressed,
                shard.stat().st_size,
            )
        )
        if complete and records == 0:
            report.findings.warn(shard, "no records")
    return schema or {}


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _schema_difference(first: dict[str, tuple[str, int]], found: dict[str, tuple[str, int]]) -> str:
    parts = []
    missing, extra = sorted(first.keys() - found.keys()), sorted(found.keys() - first.keys())
    if missing:
        parts.append(f"features {', '.join(missing)} missing")
    if extra:
        parts.append(f"features {', '.join(extra)} not in the first record")
    for name in sorted(first.keys() & found.keys()):
        if first[name] != found[name]:
            (kind, length), (first_kind, first_length) = found[name], first[name]
            parts.append(
                f"feature {name} has {length} {kind} values where the first record has {first_length} {first_kind}"
            )
    return "; ".join(parts)


def _patch_length(report: RecordSetReport) -> int | None:
    """Values per band of a patch: the commonest length of the numeric features."""
    lengths = Counter(f.length for f in report.features if f.type in INGESTIBLE_TYPES)
    return lengths.most_common(1)[0][0] if lengths else None


def kernel_candidates(patch_width: int, patch_height: int, length: int) -> list[tuple[int, int]]:
    """Every kernel margin [kw, kh] ≥ 0 with (width + kw) × (height + kh) = ``length``, likeliest first:
    margins closest to equal, even ones before odd (Earth Engine puts kw/2 on each side)."""
    found = []
    for record_width in range(patch_width, length // max(patch_height, 1) + 1):
        if length % record_width == 0 and length // record_width >= patch_height:
            found.append((record_width - patch_width, length // record_width - patch_height))
    return sorted(found, key=lambda k: (abs(k[0] - k[1]), k[0] % 2 + k[1] % 2, k[0] + k[1]))


def _infer_patch(report: RecordSetReport, manifest: ExportManifest | None) -> None:
    """Patch size from the mixer, kernel margin from terrabeam's manifest or from the record length."""
    length = _patch_length(report)
    first = report.shards[0].path if report.shards else report.directory
    for f in report.features:
        if length is not None and f.length != length:
            report.findings.warn(first, f"feature {f.name} has {f.length} values, not a patch's {length}", 0)
    if length is None:
        return
    if report.grid is None:
        side = math.isqrt(length)
        if side * side == length:
            report.patch_size, report.kernel_size, report.kernel_size_source = (side, side), (0, 0), "assumed"
            report.findings.warn(
                first, f"no mixer: patches of {side}×{side} values assumed (square, no margin)"
            )
        return
    width, height = report.grid.patch_width, report.grid.patch_height
    report.patch_size = (width, height)
    if manifest is not None and report.manifest:
        kw, kh = manifest.kernel_size
        if (width + kw) * (height + kh) != length:
            report.findings.violate(
                report.manifest,
                f"kernel_size [{kw}, {kh}] with patchDimensions [{width}, {height}] makes records of "
                f"{width + kw}×{height + kh} = {(width + kw) * (height + kh)} values; the records hold {length}",
            )
        report.kernel_size, report.kernel_size_source = (kw, kh), "manifest"
        return
    candidates = kernel_candidates(width, height, length)
    if not candidates:
        report.findings.violate(
            first,
            f"{length} values per band fit no kernel margin of patchDimensions [{width}, {height}] "
            f"({report.mixer}): a record must hold (width + kw) × (height + kh) values",
            0,
        )
        return
    report.kernel_size, report.kernel_size_source = candidates[0], "inferred"
    if len(candidates) > 1:
        others = ", ".join(f"[{kw}, {kh}]" for kw, kh in candidates[1:])
        report.findings.warn(
            first,
            f"kernel margin [{candidates[0][0]}, {candidates[0][1]}] inferred from {length} values per band; "
            f"{others} would fit too (the export's kernelSize says which)",
        )


def _check_grid(report: RecordSetReport, manifest: ExportManifest | None) -> None:
    """Mixer against the records (totalPatches) and the region (patchesPerRow), manifest against both."""
    grid, mixer = report.grid, report.mixer
    complete = report.whole and all(s.complete for s in report.shards)
    if grid is not None and mixer:
        if grid.patches_per_row > grid.total_patches:
            report.findings.violate(
                mixer, f"patchesPerRow={grid.patches_per_row} is more than totalPatches={grid.total_patches}"
            )
        if complete and report.records != grid.total_patches:
            counts = ", ".join(f"{Path(s.path).name}: {s.records}" for s in report.shards)
            report.findings.violate(
                mixer, f"totalPatches={grid.total_patches} but {report.records} records found ({counts})"
            )
        if not report.whole:
            report.findings.warn(mixer, "one shard of the set inspected: totalPatches not checked")
    if manifest is None or not report.manifest:
        if grid is not None and report.whole:
            report.findings.warn(
                mixer or report.directory,
                "no terrabeam manifest: the region's size is unknown, patchesPerRow "
                "checked against totalPatches only",
            )
        return
    path = report.manifest
    if grid is not None:
        per_row = math.ceil(manifest.region_width / grid.patch_width)
        rows = math.ceil(manifest.region_height / grid.patch_height)
        if grid.patches_per_row != per_row:
            report.findings.violate(
                mixer or path,
                f"patchesPerRow={grid.patches_per_row} but the region is {manifest.region_width} px wide "
                f"({Path(path).name}): ceil({manifest.region_width} / {grid.patch_width}) = {per_row} patches per row",
            )
        elif grid.total_patches != per_row * rows:
            report.findings.violate(
                mixer or path,
                f"totalPatches={grid.total_patches} but the region of {manifest.region_width}×"
                f"{manifest.region_height} px ({Path(path).name}) makes {per_row} × {rows} = {per_row * rows} patches",
            )
    if complete:
        counts = [s.records for s in report.shards]
        if manifest.shard_records != counts:
            report.findings.violate(
                path, f"shard_records={manifest.shard_records} but the shards hold {counts} records"
            )
    names = sorted(f.name for f in report.features)
    if report.features and sorted(manifest.bands) != names:
        report.findings.violate(path, f"bands={manifest.bands} but the records' features are {names}")


def _ingestion(report: RecordSetReport) -> None:
    """What Earth Engine's TFRecord ingestion needs beyond a valid set: core-size records (no kernel
    margin), int64 or float features of one patch each."""
    needs = report.ingestion_needs
    if report.kernel_size and report.kernel_size != (0, 0) and report.patch_size:
        (w, h), (kw, kh) = report.patch_size, report.kernel_size
        needs.append(
            f"records at core size {w}×{h}: these hold {w + kw}×{h + kh} (kernel margin [{kw}, {kh}]); crop it"
        )
    length = _patch_length(report)
    for f in report.features:
        if f.type not in INGESTIBLE_TYPES:
            needs.append(
                f"feature {f.name} is a {f.type} list: Earth Engine ingests int64 and float features"
            )
        elif f.length != length:
            needs.append(f"feature {f.name} of {f.length} values: every band must hold one patch")
    if not report.features:
        needs.append("records with features")


# --- COGs ------------------------------------------------------------------------------------------


def terrabeam_tag_names() -> tuple[str, ...]:
    """The TERRABEAM_* tags terrabeam writes into every map (TERRABEAM_WINDOW only for a windowed run)."""
    from terrabeam.provenance import Provenance

    return tuple(Provenance("", "", "", "", "", "").tags())


def inspect_cog(path: str | Path) -> CogReport:
    """``rio cogeo validate``'s verdict (errors are violations, warnings warnings), the layout, and
    terrabeam's tags, of which none or all must be there."""
    import rasterio
    from rasterio.errors import RasterioIOError
    from rio_cogeo.cogeo import cog_validate

    report = CogReport(str(path))
    try:
        with rasterio.open(path) as ds:
            report.width, report.height, report.bands = ds.width, ds.height, ds.count
            report.dtype, report.crs = ds.dtypes[0], ds.crs.to_string() if ds.crs else None
            report.block_size = list(ds.block_shapes[0][::-1])
            report.compression = ds.compression.value if ds.compression else None
            report.overviews = ds.overviews(1)
            tags = ds.tags()
    except RasterioIOError as exc:
        report.findings.violate(path, f"not readable as a GeoTIFF: {exc}")
        return report
    report.cog, errors, warnings = cog_validate(path, quiet=True)
    for message in errors:
        report.findings.violate(path, f"not a COG: {message}")
    for message in warnings:
        report.findings.warn(path, message)
    report.terrabeam_tags = {k: v for k, v in sorted(tags.items()) if k.startswith("TERRABEAM_")}
    if report.terrabeam_tags:
        missing = [k for k in terrabeam_tag_names() if k not in report.terrabeam_tags]
        if missing:
            report.findings.warn(path, f"terrabeam tags missing: {', '.join(missing)}")
    return report
