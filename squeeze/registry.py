"""Explicit name -> implementation tables for passes (and, later, exporters and runtimes).

Each pass registers itself where it is defined; lookups of unknown names fail
with the list of known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from squeeze.errors import SqueezeError


@dataclass(frozen=True)
class PassEntry:
    name: str
    config_cls: type
    apply: Callable  # (model, config, calib, io=None) -> dict of per-layer records (io: squeeze.runner.BlockIO)
    needs_calibration: Callable  # (config) -> bool


PASSES: dict[str, PassEntry] = {}


def register_pass(name: str, config_cls: type, apply: Callable, needs_calibration: Callable) -> None:
    if name in PASSES:
        raise ValueError(f"pass {name!r} registered twice")
    PASSES[name] = PassEntry(name, config_cls, apply, needs_calibration)


def _load_builtin_passes() -> None:
    # Importing a pass module runs its register_pass call; the list is explicit.
    import squeeze.passes.awq  # noqa: F401
    import squeeze.passes.distill  # noqa: F401
    import squeeze.passes.gptq  # noqa: F401
    import squeeze.passes.prune  # noqa: F401
    import squeeze.passes.rtn  # noqa: F401
    import squeeze.passes.smoothquant  # noqa: F401
    import squeeze.passes.structured  # noqa: F401


def get_pass(name: str) -> PassEntry:
    _load_builtin_passes()
    if name not in PASSES:
        raise SqueezeError(f"unknown method {name!r}; known methods: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def pass_for_config(config) -> PassEntry:
    _load_builtin_passes()
    for entry in PASSES.values():
        if type(config) is entry.config_cls:
            return entry
    raise SqueezeError(f"{type(config).__name__} is not a registered pass config; known: {', '.join(sorted(PASSES))}")
