"""The model inside Beam's RunInference: one handler for every framework, per-patch or per-pixel.

A batch is a list of normalised patches (C, H, W) with NaN where the input is masked. Per-patch
models see the whole batch at once in their layout; per-pixel models see every unmasked core pixel
of the batch in one (pixels, bands) call, never one pixel per call. Either way each patch comes
back as (outputs, H, W) with NaN where masked. A patch whose core is wholly masked never reaches
the model: it comes back all NaN, and the handler counts it (``patches_skipped``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.metrics import Metrics

from terrabeam import NAMESPACE
from terrabeam.beam_ml import ModelHandler, PredictionResult
from terrabeam.config import ModelConfig
from terrabeam.errors import ModelError
from terrabeam.predict.engines import Runtime, resolve_runtime
from terrabeam.predict.frameworks import Predictor, load_predictor


def empty_cores(batch: np.ndarray, margin: tuple[int, int]) -> np.ndarray:
    """(N, C, H, W) with NaN where masked → (N,) bool: True where every pixel of the patch's core
    (the patch less ``margin`` = (mx, my) on each side) is masked, NaN in any band."""
    mx, my = margin
    core = batch[:, :, my : batch.shape[2] - my, mx : batch.shape[3] - mx]
    return np.isnan(core).any(axis=1).all(axis=(1, 2))


def run_model(
    predictor: Predictor, batch: np.ndarray, model: ModelConfig, margin: tuple[int, int]
) -> np.ndarray:
    """(N, C, H, W) normalised input with NaN where masked → (N, outputs, h, w), NaN where masked.

    Per-pixel models only see the core (the margin is cut first: they need no context). Per-patch
    models see only the patches whose core has an unmasked pixel (see ``empty_cores``); the others
    come back all NaN, and a batch of only such patches makes no call.
    """
    if model.kind == "per_pixel":
        mx, my = margin
        core = batch[:, :, my : batch.shape[2] - my, mx : batch.shape[3] - mx]
        n, c, h, w = core.shape
        pixels = np.ascontiguousarray(core.transpose(0, 2, 3, 1)).reshape(-1, c)
        if not np.isnan(pixels.min()):  # one reduction, no mask array, when nothing is masked
            result = np.asarray(predictor(pixels), dtype=np.float32).reshape(pixels.shape[0], -1)
            return result.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
        valid = ~np.isnan(pixels).any(axis=1)
        result = np.full((pixels.shape[0], len(model.output_names)), np.nan, dtype=np.float32)
        if valid.any():
            values = np.asarray(predictor(pixels[valid]), dtype=np.float32)
            result[valid] = values.reshape(int(valid.sum()), -1)
        return result.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
    # One pass over the batch in the common case (every value finite); masked patches take the
    # slower path that zeroes NaN (and clips ±inf) like np.nan_to_num.
    if np.isfinite(batch).all():
        masked, seen, inputs = None, None, batch
    else:
        masked = np.isnan(batch).any(axis=1)
        seen = ~empty_cores(batch, margin)
        if not seen.any():
            return np.full((len(batch), len(model.output_names), *batch.shape[2:]), np.nan, np.float32)
        inputs = np.nan_to_num(batch if seen.all() else batch[seen], nan=0.0)
    if model.layout == "NHWC":
        inputs = np.ascontiguousarray(inputs.transpose(0, 2, 3, 1))
    output = np.asarray(predictor(inputs), dtype=np.float32)
    if model.layout == "NHWC" and output.ndim == 4:
        output = output.transpose(0, 3, 1, 2)
    if masked is not None and masked.any():  # a patch not seen has a masked core
        if seen.all():
            output = output.copy()
        else:
            output, seen_output = np.full((len(batch), *output.shape[1:]), np.nan, np.float32), output
            output[seen] = seen_output
        if output.shape[2:] != masked.shape[1:]:  # the model returned the core: so does the mask
            mx, my = margin
            masked = masked[:, my : masked.shape[1] - my, mx : masked.shape[2] - mx]
        output[np.broadcast_to(masked[:, None], output.shape)] = np.nan
    return output


# The model the probe just loaded, handed to the pipeline's first load in this process (the
# in-process runner) instead of loading it again (~0.3–0.5 s for the U-Net). At most one is kept;
# forget_probed() drops it when the pipeline ran elsewhere.
_probed: dict[tuple[str, str, Runtime], Predictor] = {}


def forget_probed() -> None:
    _probed.clear()


def release_models() -> None:
    """Drop the models a finished in-process pipeline leaves loaded: the probe's if nobody took it,
    and the one Beam's ``Shared`` map keeps alive after the pipeline (its ``_keepalive``: the last
    object any ``Shared`` handle acquired, which RunInference's model is). Without this the U-Net's
    ONNX Runtime session, ~400 MiB with its arena, stayed through the mosaic, whose COG buffers
    came on top of it (the 64× run's peak, BENCHMARKS.md). A model another pipeline in this
    process still uses stays: its DoFn holds it."""
    forget_probed()
    from apache_beam.utils import shared

    # a private attribute of Beam's: where it is gone, nothing is kept alive this way
    keeper = getattr(shared, "_shared_map", None)
    if keeper is not None and hasattr(keeper, "_keepalive"):
        with keeper._lock:
            keeper._keepalive = (None, None)


class PatchModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Beam ModelHandler for any framework: loaded once per worker (or per machine with
    model.share_across_processes), batched by whole patches. The engine, device and precision are
    resolved where the model loads (engines.resolve_runtime), i.e. on the worker's hardware;
    ``threads`` are the intra-op threads (0: the engine's default)."""

    def __init__(
        self, model: ModelConfig, model_path: str, margin: tuple[int, int], threads: int | None = None
    ) -> None:
        super().__init__()
        self._model = model
        self._path = model_path
        self._margin = margin
        self._skipped = Metrics.counter(NAMESPACE, "patches_skipped")
        self._threads = model.threads if threads is None else threads

    def runtime(self) -> Runtime:
        return resolve_runtime(self._model, self._threads)

    def share_model_across_processes(self) -> bool:
        return self._model.share_across_processes

    def model_copies(self) -> int:
        return self._model.copies or 1

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        """Bytes of a batch, for Beam's metrics: the arrays' sizes (Beam's default pickles the whole
        batch to count them, ~0.3 ms per patch)."""
        return sum(np.asarray(patch).nbytes for patch in batch)

    def _task(self) -> str:
        return "regression" if self._model.output == "regression" else "classification"

    def load_model(self) -> Predictor:
        runtime = self.runtime()
        kept = _probed.pop((self._path, self._task(), runtime), None)
        if kept is not None:
            return kept
        path = self._path
        if "://" in path:  # a model in the workspace's object store: each worker reads a local copy
            from terrabeam.storage import local_copy

            path = str(local_copy(path))
        return load_predictor(self._model.framework, path, self._task(), runtime)

    def run_inference(
        self, batch: Sequence[np.ndarray], model: Predictor, inference_args: dict[str, Any] | None = None
    ) -> list[PredictionResult]:
        stacked = np.stack(batch)
        self._skipped.inc(int(empty_cores(stacked, self._margin).sum()))
        outputs = run_model(model, stacked, self._model, self._margin)
        return [PredictionResult(patch, output) for patch, output in zip(batch, outputs, strict=True)]

    def batch_elements_kwargs(self) -> dict[str, int]:
        """Batches of exactly model.batch_size (a bundle's last one may be smaller). Beam's adaptive
        batching would start each bundle at 1 and grow, so the model's working memory (ONNX
        Runtime's arena, sized by the shapes it has seen and in what order) varied from run to run
        by ~100 MiB, and a small region never reached the configured batch (BENCHMARKS.md)."""
        size = self._model.batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def get_metrics_namespace(self) -> str:
        return f"terrabeam_{self._model.framework}"


@dataclass(frozen=True)
class ModelSignature:
    """What the model returns for one probe patch: (outputs, H, W) after terrabeam's handling."""

    outputs: int
    height: int
    width: int


def onnx_input(path: str) -> tuple[str, list[int | None]]:
    """The one input of an ONNX graph (its weights left out): its name and declared dims, None where
    symbolic (e.g. "batch_size")."""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except FileNotFoundError:
        raise ModelError(f"model.path: ONNX model not found: {path}") from None
    except Exception as exc:  # onnx raises DecodeError and others for files that are not models
        raise ModelError(f"model.path: cannot read ONNX model {path}: {exc}") from None
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expects {len(inputs)} inputs; terrabeam feeds one array")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _check_onnx_input(model: ModelConfig, path: str, patch_shape: tuple[int, int]) -> None:
    """ONNX files declare their input shape: compare it with the config before loading the model."""
    _, dims = onnx_input(path)
    bands = len(model.input_bands)
    expected = 2 if model.kind == "per_pixel" else 4
    if len(dims) != expected:
        raise ModelError(
            f"{path}: input of shape {dims}; a {model.kind} model needs "
            f"{'(pixels, bands)' if expected == 2 else '(N, C, H, W) or (N, H, W, C)'}"
        )
    if model.kind == "per_pixel":
        channels, spatial = dims[1], (None, None)
    elif model.layout == "NCHW":
        channels, spatial = dims[1], (dims[2], dims[3])
    else:
        channels, spatial = dims[3], (dims[1], dims[2])
    if channels is not None and channels != bands:
        raise ModelError(
            f"{path}: model expects {channels} input channels but model.input_bands gives "
            f"{bands} {model.input_bands}"
        )
    h, w = patch_shape
    if any(d is not None and d != want for d, want in zip(spatial, (h, w), strict=True)):
        raise ModelError(
            f"{path}: model expects patches of {spatial[0]}×{spatial[1]} (H×W) but the grid gives "
            f"{h}×{w} (patch_size + kernel_size); change grid.patch_size or grid.kernel_size"
        )


def probe_model(
    model: ModelConfig,
    model_path: str,
    patch_shape: tuple[int, int],
    margin: tuple[int, int] = (0, 0),
    threads: int | None = None,
    here: bool = True,
) -> ModelSignature:
    """Load the model and run it once on one zero patch of ``patch_shape`` (H, W), as the pipeline
    will; fail before any work if bands, layout, patch size or output count do not fit the config.

    ``here``: the model will run on this machine, so the probe uses its engine, device and
    precision and hands the loaded model to the pipeline; otherwise (remote workers, whose hardware
    may differ) the probe checks shapes on the CPU at fp32 and the workers resolve the rest."""
    if not here:
        model = model.model_copy(update={"engine": "auto", "device": "cpu", "precision": "fp32"})
    if model.framework == "onnx":
        if "://" in model_path:
            from terrabeam.storage import local_copy

            model_path = str(local_copy(model_path))
        _check_onnx_input(model, model_path, patch_shape)
    handler = PatchModelHandler(model, model_path, margin, threads)
    runtime = handler.runtime()
    predictor = handler.load_model()
    h, w = patch_shape
    probe = np.zeros((1, len(model.input_bands), h, w), dtype=np.float32)
    try:
        output = run_model(predictor, probe, model, margin)
    except ModelError:
        raise
    except Exception as exc:  # frameworks raise their own types on shape mismatches
        raise ModelError(
            f"{model_path}: failed on a probe patch of {len(model.input_bands)} bands "
            f"{model.input_bands}, {h}×{w} px ({model.kind}, {model.layout}): {exc}"
        ) from None
    names = model.output_names
    if output.ndim != 4 or output.shape[1] != len(names):
        raise ModelError(
            f"{model_path}: model returns {output.shape[1] if output.ndim == 4 else output.shape} outputs "
            f"but the config names {len(names)} {names} (model.classes / model.regression_bands)"
        )
    core = (h - 2 * margin[1], w - 2 * margin[0])
    if output.shape[2:] not in ((h, w), core):
        raise ModelError(
            f"{model_path}: output of {output.shape[2]}×{output.shape[3]} px for a {h}×{w} input; "
            "the model must keep the patch size"
        )
    _probed.clear()
    if here:
        _probed[(model_path, handler._task(), runtime)] = predictor
    return ModelSignature(output.shape[1], output.shape[2], output.shape[3])
