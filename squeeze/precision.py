"""The arithmetic precision of calibration forwards (``--calib-precision``).

Calibrated passes run every calibration window through each block once or twice, and those block
forwards (plus the input statistics they feed) are most of a GPTQ run's time. Weights, Hessians and the
solver stay float32 whatever is chosen; "bfloat16" runs only the block forwards' matmuls under autocast,
as calibrating a model stored in bfloat16 does anyway. "auto" picks bfloat16 for a float32 model where the
hardware multiplies bfloat16 natively (x86 CPUs with AVX512-BF16 or AMX; there it is about 3x the float32
matmul rate), float32 elsewhere, where emulated bfloat16 would be slower.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from squeeze.errors import SqueezeError

CALIB_PRECISIONS = ("auto", "float32", "bfloat16")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bfloat16 dot-product units


def check_calib_precision(name: str) -> None:
    if name not in CALIB_PRECISIONS:
        raise SqueezeError(f"--calib-precision must be one of {', '.join(CALIB_PRECISIONS)}, got {name!r}")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Linux: its cpuinfo flags; elsewhere assumed not)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def calib_autocast(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the calibration forwards autocast to on ``device``, or None to run in the model's dtype."""
    check_calib_precision(name)
    if name == "float32" or model_dtype != torch.float32:
        return None  # a float16/bfloat16 model already computes in its own dtype
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
