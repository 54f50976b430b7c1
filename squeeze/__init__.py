"""squeeze: quantize and compress models, export them to real runtimes, and prove they still work.

The public API is loaded lazily so that ``import squeeze`` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "quantize": "squeeze.api",
    "quantize_dir": "squeeze.api",
    "prune": "squeeze.api",
    "load": "squeeze.api",
    "save": "squeeze.api",
    "evaluate": "squeeze.api",
    "export": "squeeze.api",
    "evaluate_task": "squeeze.api",
    "measure_speed": "squeeze.api",
    "QuantScheme": "squeeze.scheme",
    "ActScheme": "squeeze.scheme",
    "PRESETS": "squeeze.scheme",
    "get_scheme": "squeeze.scheme",
    "RTN": "squeeze.passes.rtn",
    "GPTQ": "squeeze.passes.gptq",
    "AWQ": "squeeze.passes.awq",
    "SmoothQuant": "squeeze.passes.smoothquant",
    "Magnitude": "squeeze.passes.prune",
    "Wanda": "squeeze.passes.prune",
    "SparseGPT": "squeeze.passes.prune",
    "Structured": "squeeze.passes.structured",
    "Distill": "squeeze.passes.distill",
    "QAT": "squeeze.passes.distill",
    "Recipe": "squeeze.recipe",
    "CalibConfig": "squeeze.calib",
    "load_calibration": "squeeze.calib",
    "tensor_calibration": "squeeze.calib",
    "SqueezeError": "squeeze.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")


def __dir__():
    return __all__
