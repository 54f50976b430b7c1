"""Quantization schemes as data: what grid a tensor is rounded onto.

A `QuantScheme` says how weights (and optionally activations) are quantized;
algorithms (RTN, GPTQ, AWQ) take one as an argument and never hard-code a
bit format. Named presets (``w4g128``, ``w4g32-asym``, ``w8a8``) live in the
`PRESETS` table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from squeeze.errors import SqueezeError

Granularity = Literal["tensor", "channel", "group"]
ActMode = Literal["static", "dynamic"]
Observer = Literal["minmax", "percentile"]

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class ActScheme:
    """Activation quantization: symmetric int8, static per-tensor or dynamic per-token."""

    bits: int = 8
    mode: ActMode = "static"
    observer: Observer = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise SqueezeError(f"activation bits must be 8 (got {self.bits}); only int8 activations are supported")
        if self.mode not in ("static", "dynamic"):
            raise SqueezeError(f"activation mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.observer not in ("minmax", "percentile"):
            raise SqueezeError(f"activation observer must be 'minmax' or 'percentile', got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise SqueezeError(f"activation percentile must be in (50, 100], got {self.percentile}")

    @property
    def name(self) -> str:
        if self.mode == "dynamic":
            return "a8-dynamic"
        return "a8" if self.observer == "minmax" else "a8-percentile"


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight grid: ``bits`` wide, symmetric or not, at one granularity.

    Symmetric grids follow the GPTQ convention: codes 0..2^b-1 with a fixed zero
    point 2^(b-1) and scale 2*absmax/(2^b-1). Asymmetric grids span [min, max]
    (always including 0.0) with an integer zero point.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    activations: ActScheme | None = None
    gguf: str | None = None  # a GGUF block type whose exact grid (llama.cpp's block fit) calibration uses

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise SqueezeError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise SqueezeError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            if self.group_size is None or self.group_size <= 0:
                raise SqueezeError(f"group size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            raise SqueezeError(f"group size {self.group_size} only applies to granularity 'group', not {self.granularity!r}")
        if self.gguf is not None and GGUF_SCHEMES.get(self.gguf) != self._int_name():
            raise SqueezeError(f"GGUF scheme {self.gguf!r} needs the grid {GGUF_SCHEMES.get(self.gguf)}; "
                               f"known GGUF schemes: {', '.join(GGUF_SCHEMES)}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        return self.gguf or self._int_name()

    def _int_name(self) -> str:
        base = f"w{self.bits}"
        if self.granularity == "group":
            base += f"g{self.group_size}"
        elif self.granularity == "tensor":
            base += "-tensor"
        if self.activations is not None:
            base += self.activations.name
        return base + ("" if self.symmetric else "-asym")

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for a row of ``in_features`` (per-channel/tensor: the whole row)."""
        if self.granularity == "group":
            return min(int(self.group_size), in_features)
        return in_features

    def with_(self, **changes) -> "QuantScheme":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        d = {k: v for k, v in d.items() if k != "name"}
        acts = d.pop("activations", None)
        return cls(**d, activations=ActScheme(**acts) if acts else None)


def _build_presets() -> dict[str, QuantScheme]:
    presets: dict[str, QuantScheme] = {}
    for bits in range(MIN_BITS, MAX_BITS + 1):
        variants = [QuantScheme(bits, True, "channel", None), QuantScheme(bits, True, "tensor", None)]
        variants += [QuantScheme(bits, True, "group", g) for g in (32, 64, 128)]
        for s in variants:
            presets[s.name] = s
            asym = s.with_(symmetric=False)
            presets[asym.name] = asym
    w8 = QuantScheme(8, True, "channel", None)
    for acts in (ActScheme(), ActScheme(mode="dynamic"), ActScheme(observer="percentile")):
        presets[w8.with_(activations=acts).name] = w8.with_(activations=acts)
    return presets


PRESETS: dict[str, QuantScheme] = _build_presets()
# GGUF block types whose grid is a preset's: value = d * (q - zero), d in float16, 32 weights per block
# (Q4_0: zero 8, Q5_0: 16, Q8_0: 128). The GGUF scheme fits d as llama.cpp does (signed max / -8 for Q4_0,
# a finer step than w4g32's 2*absmax/15); the checkpoint stores it in the GPTQ layout and the GGUF
# exporter writes the blocks without re-rounding.
GGUF_SCHEMES: dict[str, str] = {"q4_0": "w4g32", "q5_0": "w5g32", "q8_0": "w8g32"}


def get_scheme(name: str) -> QuantScheme:
    """Look up a named preset; unknown names fail with the list of known ones."""
    key = name.strip().lower()
    if key in GGUF_SCHEMES:
        return PRESETS[GGUF_SCHEMES[key]].with_(gguf=key)
    if key not in PRESETS:
        known = ", ".join(sorted(PRESETS) + sorted(GGUF_SCHEMES))
        raise SqueezeError(f"unknown scheme {name!r}; known schemes: {known}")
    return PRESETS[key]
