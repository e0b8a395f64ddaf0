"""terrabeam: run trained models over satellite imagery on Apache Beam, patch by patch."""

import sys

__version__ = "0.1.0"

NAMESPACE = "terrabeam"  # of the Beam metrics terrabeam's transforms count

# Beam's RunInference module imports its GPU ModelManager eagerly, and that module imports torch
# and scipy.optimize (~1.2 s in every terrabeam process and Beam worker when torch is installed,
# as it is for terrabeam's PyTorch models). terrabeam never asks for the ModelManager
# (use_model_manager stays False), so the module is marked absent: Beam then takes its own
# fallback for installs without torch (ModelManager = None). Where torch is already loaded, or
# Beam's module already imported, nothing changes.
_BEAM_MODEL_MANAGER = "apache_beam.ml.inference.model_manager"
if not {"torch", "apache_beam.ml.inference.base", _BEAM_MODEL_MANAGER} & sys.modules.keys():
    sys.modules[_BEAM_MODEL_MANAGER] = None  # type: ignore[assignment]
