"""The computePixels source: an Earth Engine composite's pixels requested block by block by the
workers (``image:computePixels``), with no export task and no files in between.

The image is the export's (``build_image``), with masked pixels set to ``source.fill_value`` as the
export's ``defaultValue`` does, on the export's padded grid: so the patches are the export task's
patches. Each block of patches (a patch row of a map tile, kernel margin included) is cut into
requests whose answer stays under ``earthengine.max_request_bytes`` (Earth Engine's limit is
48 MiB; a 4-byte value and a mask byte counted per band and pixel). Requests pass one gate per
worker process: at most its share of ``earthengine.max_requests_per_second`` started per second
and of ``earthengine.max_concurrent`` in flight; an answer 429 or 5xx is retried after its
Retry-After or an exponential backoff with jitter, and holds the process's later requests too.
"""

from __future__ import annotations

import io
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from terrabeam.config import PipelineConfig, local_workers
from terrabeam.earthengine import EarthEngineError
from terrabeam.errors import ConfigError, TransientError
from terrabeam.grid import Grid
from terrabeam.sources.raster import block_patches
from terrabeam.tiling import Tiling

log = logging.getLogger("terrabeam.earthengine")

AUTO_MAX_REQUESTS = 1000  # `fetch: auto` takes computePixels up to this many requests
MAX_SIDE = 32768  # pixels per side of one request
BYTES_PER_BAND_PIXEL = 5  # a float32 value and a mask byte
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_ATTEMPTS = 8
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 60.0
READ_AHEAD_BLOCKS = 4


def uses_compute_pixels(config: PipelineConfig) -> bool:
    """Whether an Earth Engine source fetches by computePixels: as configured, or with ``auto``
    when the grid needs at most AUTO_MAX_REQUESTS requests (an export task queues for minutes) and
    a patch fits in one."""
    source = config.source
    if source.kind != "earthengine" or source.fetch == "export":
        return False
    if source.fetch == "compute_pixels":
        return True
    from terrabeam.region import stated_grid

    grid, region = stated_grid(config)
    if config.outputs.earthengine is None:  # the one pipeline reads each tile's patch rows
        tiling = Tiling.for_grid(grid, region.width, region.height, config.outputs.tile_size)
        blocks = tile_blocks(tiling)
    else:  # the export step writes the interchange files from its own blocks
        from terrabeam.sources.raster import export_blocks

        blocks = export_blocks(grid)
    try:
        needed = count_requests(config, grid, blocks, AUTO_MAX_REQUESTS + 1)
    except ConfigError:  # a patch larger than a request: only an export can fetch it
        return False
    return needed <= AUTO_MAX_REQUESTS


def tile_blocks(tiling: Tiling) -> Iterator[tuple[int, int, int]]:
    """The blocks a one-pipeline run reads: each patch row of each tile."""
    for tile in range(tiling.count):
        yield from tiling.patch_rows(tile)


def count_requests(
    config: PipelineConfig, grid: Grid, blocks: Iterable[tuple[int, int, int]], stop: int | None = None
) -> int:
    """computePixels requests sent for ``blocks`` (row, first, last); counting ends at ``stop``."""
    count = 0
    for _, first, last in blocks:
        count += len(request_spans(config, grid, first, last))
        if stop is not None and count >= stop:
            break
    return count


def request_spans(config: PipelineConfig, grid: Grid, first: int, last: int) -> list[tuple[int, int]]:
    """Patch columns ``first``..``last - 1`` of a patch row cut into as few requests as fit under
    ``earthengine.max_request_bytes`` and MAX_SIDE, of near equal widths."""
    kw, kh = config.grid.kernel_size
    pw, height = grid.patch_width, grid.patch_height + kh
    bands = len(config.source.band_names)
    row_bytes = height * bands * BYTES_PER_BAND_PIXEL  # per pixel of width
    limit = config.earthengine.max_request_bytes
    fit = min((limit // row_bytes - kw) // pw, (MAX_SIDE - kw) // pw)
    if fit < 1 or height > MAX_SIDE:
        raise ConfigError(
            f"grid.patch_size: one patch of {pw + kw}×{height} px with {bands} band(s) needs "
            f"{(pw + kw) * row_bytes} bytes, more than earthengine.max_request_bytes ({limit}) or "
            f"{MAX_SIDE} px a side; use smaller patches or source.fetch: export"
        )
    count = -(-(last - first) // fit)
    bounds = [first + round(i * (last - first) / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def worker_processes(flags: Sequence[str]) -> int:
    """How many processes share the rate limit, from the Beam flags: 1 on the local runner
    (its worker threads share this process's gate), ``direct_num_workers`` in its multi_processing
    mode; on Dataflow ``max_num_workers`` (else ``num_workers``) × the vCPUs of ``machine_type``
    (one SDK process per vCPU, unless ``no_use_multiple_sdk_containers``); on a job service's
    workers ``sdk_worker_parallelism`` (1 unless set)."""
    keys: dict[str, str] = {}
    experiments: list[str] = []
    for flag in flags:
        key, _, value = flag.removeprefix("--").partition("=")
        if key in ("experiments", "experiment"):
            experiments += value.split(",")
        else:
            keys[key] = value
    local = local_workers(flags)
    if local is not None:
        return local if keys.get("direct_running_mode") == "multi_processing" else 1
    if keys.get("runner") == "DataflowRunner":
        workers = keys.get("max_num_workers") or keys.get("num_workers")
        if not workers:
            raise ConfigError(
                "source.fetch: compute_pixels on Dataflow needs runner.max_workers: the "
                "workers share earthengine.max_requests_per_second and max_concurrent"
            )
        cpus = re.search(r"-(\d+)$", keys.get("machine_type") or keys.get("worker_machine_type") or "")
        per_worker = 1 if "no_use_multiple_sdk_containers" in experiments or not cpus else int(cpus[1])
        return int(workers) * per_worker
    return max(1, int(keys.get("sdk_worker_parallelism") or 1))


class RequestGate:
    """This process's share of the request limits: request starts spaced ``1 / per_second`` apart,
    at most ``concurrent`` in flight; ``hold_off`` delays every later start (after a 429)."""

    def __init__(
        self,
        per_second: float,
        concurrent: int,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # 2 % apart more: the quota is counted where requests arrive, after the network's jitter
        self.interval = 1.02 / per_second
        self._slots = threading.BoundedSemaphore(concurrent)
        self._lock = threading.Lock()
        self._next = 0.0
        self._sleep, self._clock = sleep, clock

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots:
            with self._lock:
                now = self._clock()
                start = max(now, self._next)
                self._next = start + self.interval
            if start > now:
                self._sleep(start - now)
            yield

    def hold_off(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, self._clock() + seconds)


_gates: dict[tuple[float, int], RequestGate] = {}
_gates_lock = threading.Lock()


def process_gate(per_second: float, concurrent: int) -> RequestGate:
    """The one gate of this process for these limits, shared by every reader and thread in it."""
    with _gates_lock:
        return _gates.setdefault((per_second, concurrent), RequestGate(per_second, concurrent))


@dataclass(frozen=True)
class FetchLimits:
    """One process's share of the configured limits."""

    per_second: float
    concurrent: int

    @classmethod
    def share(cls, config: PipelineConfig, processes: int) -> FetchLimits:
        ee = config.earthengine
        return cls(ee.max_requests_per_second / processes, max(1, ee.max_concurrent // processes))


class RequestTooLarge(EarthEngineError):
    """Earth Engine counted a request over its size limit: asked again in smaller parts."""


def with_backoff(
    request: Callable[[], bytes], gate: RequestGate, what: str, rng: random.Random | None = None
) -> bytes:
    """``request()`` through ``gate``; retried on 429 / 5xx answers and lost connections after the
    answer's Retry-After, else an exponential backoff with full jitter, during which the gate holds
    every request of the process back; other refusals and the last retry's raise with ``what``
    named."""
    from terrabeam.earthengine import Refusal

    rng = rng or random.Random()
    for attempt in range(MAX_ATTEMPTS):
        try:
            with gate.slot():
                return request()
        except Refusal as refusal:
            if refusal.status == 400 and "request size" in refusal.message.lower():
                raise RequestTooLarge(f"Earth Engine refused computePixels for {what}: {refusal}") from None
            if refusal.status not in RETRIED_STATUSES:
                raise EarthEngineError(f"Earth Engine refused computePixels for {what}: {refusal}") from None
            problem, delay = str(refusal), refusal.retry_after
        except (OSError, TimeoutError) as exc:  # the connection, not the answer: worth another try
            problem, delay = f"{type(exc).__name__}: {exc}", None
        if attempt == MAX_ATTEMPTS - 1:
            raise TransientError(
                f"Earth Engine computePixels for {what}: {problem} after {MAX_ATTEMPTS} attempts"
            ) from None
        if delay is None:
            delay = rng.uniform(0, min(MAX_BACKOFF, FIRST_BACKOFF * 2**attempt))
        log.info("computePixels for %s: %s; retrying in %.1f s", what, problem, delay)
        gate.hold_off(delay)  # the retry waits in gate.slot(), and so does every other request
    raise AssertionError("unreachable")


def pixel_grid(grid: Grid, kernel: tuple[int, int], row: int, first: int, last: int) -> dict[str, Any]:
    """computePixels' ``grid`` for patches ``first``..``last - 1`` of patch row ``row`` with their
    margins: the padded grid's window, as dimensions + affine transform + CRS."""
    kw, kh = kernel
    x, y = grid.xy(first * grid.patch_width - kw // 2, row * grid.patch_height - kh // 2)
    t = grid.transform
    crs = str(grid.crs)
    return {
        "dimensions": {"width": (last - first) * grid.patch_width + kw, "height": grid.patch_height + kh},
        "affineTransform": {
            "scaleX": t.a,
            "shearX": t.b,
            "translateX": x,
            "shearY": t.d,
            "scaleY": t.e,
            "translateY": y,
        },
        **({"crsCode": crs} if re.fullmatch(r"[A-Za-z]+:\d+", crs) else {"crsWkt": crs}),
    }


def composite_expression(config: PipelineConfig, start: date, end: date) -> Any:
    """The serialized expression requested: the export's image, masked pixels = the fill value."""
    from ee import serializer

    from terrabeam.earthengine import connect
    from terrabeam.sources.earthengine import build_image

    ee = connect(config.earthengine)
    image = build_image(ee, config, start, end).unmask(config.source.fill_value, False)
    return serializer.encode(image)


class ComputePixelsPatchReader:
    """A reader of blocks of patches (as the raster source's) whose pixels come from computePixels;
    a block's requests are sent in parallel, up to the process's share of ``max_concurrent``.

    Made on the launcher (the composite's dates resolved there), opened on the worker: it connects
    to Earth Engine with the worker's own credentials.
    """

    def __init__(
        self,
        config: PipelineConfig,
        grid: Grid,
        kernel: tuple[int, int],
        window: tuple[date, date],
        limits: FetchLimits,
    ) -> None:
        self.config, self.grid, self.kernel, self.limits = config, grid, kernel, limits
        self.bands = config.source.band_names
        self.expression = composite_expression(config, *window)
        self.gate = process_gate(limits.per_second, limits.concurrent)
        # blocks asked for before they are needed: enough to keep the requests in flight, few
        # enough that memory stays a few blocks
        self.read_ahead = min(limits.concurrent, READ_AHEAD_BLOCKS)
        self._pool = ThreadPoolExecutor(max_workers=limits.concurrent)
        self._most: int | None = None  # patches per request, once Earth Engine refused more
        self._lock = threading.Lock()

    def fetch(self, row: int, first: int, last: int) -> dict[str, np.ndarray]:
        """{band: (ph + kh, n × pw + kw) float32} of one request."""
        from terrabeam.earthengine import compute_pixels

        body = {
            "expression": self.expression,
            "fileFormat": "NPY",
            "bandIds": self.bands,
            "grid": pixel_grid(self.grid, self.kernel, row, first, last),
        }
        what = f"patch row {row}, columns {first}–{last - 1}"
        answer = np.load(io.BytesIO(with_backoff(lambda: compute_pixels(body), self.gate, what)))
        width = (last - first) * self.grid.patch_width + self.kernel[0]
        expected = (self.grid.patch_height + self.kernel[1], width)
        missing = [b for b in self.bands if b not in (answer.dtype.names or ())]
        if answer.shape != expected or missing:
            raise TransientError(
                f"Earth Engine computePixels for {what}: got {answer.shape} px with bands "
                f"{list(answer.dtype.names or ())}, asked for {expected} with {self.bands}"
            )
        return {band: answer[band].astype(np.float32) for band in self.bands}

    def fetch_span(self, row: int, first: int, last: int) -> list[tuple[int, int, dict[str, np.ndarray]]]:
        """[(first, last, bands)] of one request, or of its halves if Earth Engine finds it too large
        (its size accounting is its own): later requests of this reader stay at the size that fit."""
        try:
            return [(first, last, self.fetch(row, first, last))]
        except RequestTooLarge as exc:
            if last - first == 1:
                raise EarthEngineError(
                    f"{exc}; one patch is more than Earth Engine answers: use a smaller grid.patch_size "
                    "or source.fetch: export"
                ) from None
            middle = (first + last) // 2
            with self._lock:
                self._most = min(self._most or last - first, middle - first)
            log.info("computePixels: %d patches too large for one request; asking in halves", last - first)
            return self.fetch_span(row, first, middle) + self.fetch_span(row, middle, last)

    def read_block(self, row: int, first: int, last: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        """(grid index, {band: (H + kh, W + kw) float32}) of patches ``first``..``last - 1`` of patch
        row ``row``, its requests fetched in parallel."""
        spans = request_spans(self.config, self.grid, first, last)
        most = self._most
        if most:  # Earth Engine refused larger ones
            spans = [(a, min(end, a + most)) for start, end in spans for a in range(start, end, most)]
        parts = self._pool.map(lambda span: self.fetch_span(row, *span), spans)
        patches = []
        for a, b, bands in (part for span_parts in parts for part in span_parts):
            patches += block_patches(self.grid, self.kernel, row, a, b, bands)
        return patches

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> ComputePixelsPatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pixels_reader(
    config: PipelineConfig, grid: Grid, dates: tuple[date, date], flags: Sequence[str]
) -> Callable[[], ComputePixelsPatchReader]:
    """What a worker calls to open its reader of the composite over ``dates``, with its process's
    share of the limits (worked out here, on the launcher, from the Beam flags)."""
    from functools import partial

    limits = FetchLimits.share(config, worker_processes(flags))
    return partial(ComputePixelsPatchReader, config, grid, config.grid.kernel_size, dates, limits)
