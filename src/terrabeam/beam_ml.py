"""Beam's RunInference API as terrabeam imports it: without torch.

Beam's ``apache_beam.ml.inference.base`` imports its GPU ModelManager eagerly, and that module
imports torch and scipy.optimize: ~1.2 s and ~200 MB in every terrabeam process and Beam worker
when torch is installed, as it is for terrabeam's PyTorch models. terrabeam never asks for the
ModelManager (``use_model_manager`` stays False), so the module is marked absent before Beam's
module loads, and Beam takes its own fallback for installs without torch (``ModelManager =
None``). That fallback also drops the stdlib ``resource`` module Beam uses to measure a model
load's memory, so it is handed back. Where torch or Beam's module was loaded first, nothing
changes. terrabeam's modules import Beam's inference names from here.
"""

from __future__ import annotations

import resource
import sys

_MODEL_MANAGER = "apache_beam.ml.inference.model_manager"
_BASE = "apache_beam.ml.inference.base"

if not {"torch", _BASE, _MODEL_MANAGER} & sys.modules.keys():
    sys.modules[_MODEL_MANAGER] = None  # type: ignore[assignment]

from apache_beam.ml.inference import base  # noqa: E402

if base.resource is None:
    base.resource = resource

from apache_beam.ml.inference.base import (  # noqa: E402
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

__all__ = ["KeyedModelHandler", "ModelHandler", "PredictionResult", "RunInference"]
