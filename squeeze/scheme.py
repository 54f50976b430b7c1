"""Quantization schemes as data: what grid a tensor is rounded onto.

A `QuantScheme` says how weights (and optionally activations) are quantized;
algorithms (RTN, GPTQ, AWQ) take one as an argument and never hard-code a
bit format. Named presets (``w4g128``, ``w4g32-asym``, ``w8a8``) live in the
`PRESETS` table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

from squeeze.errors import SqueezeError

Granularity = Literal["tensor", "channel", "group"]
ActMode = Literal["static", "dynamic"]
Observer = Literal["minmax", "percentile"]

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8
# Lookup-table presets: the index widths Core ML's constexpr_lut_to_dense takes (iOS 18), and the output rows
# that share one table (Core ML's per-grouped-channel palettization; 1 = a table per row).
LUT_BITS: tuple[int, ...] = (2, 3, 4, 6, 8)
LUT_CHANNELS: tuple[int, ...] = (1, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ActScheme:
    """Activation quantization, static per-tensor or dynamic per-token: symmetric int8 (zero point 0) or
    asymmetric uint8 with an integer zero point ("azp", onnxruntime's QDQ form: scale = (max - min) / 255)."""

    bits: int = 8
    mode: ActMode = "static"
    observer: Observer = "minmax"
    percentile: float = 99.99
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise SqueezeError(f"activation bits must be 8 (got {self.bits}); only int8 activations are supported")
        if self.mode not in ("static", "dynamic"):
            raise SqueezeError(f"activation mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.observer not in ("minmax", "percentile"):
            raise SqueezeError(f"activation observer must be 'minmax' or 'percentile', got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise SqueezeError(f"activation percentile must be in (50, 100], got {self.percentile}")
        if not isinstance(self.symmetric, bool):
            raise SqueezeError(f"activation symmetric must be true or false, got {self.symmetric!r}")

    @property
    def name(self) -> str:
        if self.mode == "dynamic":
            base = "a8-dynamic"
        else:
            base = "a8" if self.observer == "minmax" else "a8-percentile"
        # "-azp" (activation zero point), not "-asym": that suffix already names an asymmetric weight grid
        return base + ("" if self.symmetric else "-azp")


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight grid: ``bits`` wide, symmetric or not, at one granularity.

    Symmetric grids follow the GPTQ convention: codes 0..2^b-1 with a fixed zero
    point 2^(b-1) and scale 2*absmax/(2^b-1). Asymmetric grids span [min, max]
    (always including 0.0) with an integer zero point.

    With ``lut_channels`` the grid is a lookup table instead (palettization): each group of that many output
    rows shares 2^bits values fitted by importance-weighted k-means (`squeeze.palette`), and a code is an index
    into its rows' table; such a scheme is per-channel, symmetric by convention, with float activations.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    activations: ActScheme | None = None
    gguf: str | None = None  # a GGUF block type whose exact grid (llama.cpp's block fit) calibration uses
    lut_channels: int | None = None  # a lookup-table grid: 2^bits fitted values shared by this many output rows

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
        if self.lut_channels is not None:
            self._check_lut()
        if self.gguf is not None:
            spec = GGUF_SCHEMES.get(self.gguf)
            if spec is None or (self.bits, self.symmetric, self.granularity, self.group_size) != (
                    spec.bits, spec.symmetric, "group", spec.group_size) or self.activations is not None:
                raise SqueezeError(f"GGUF scheme {self.gguf!r} is fixed by its block format; "
                                   f"known GGUF schemes: {', '.join(GGUF_SCHEMES)}")

    def _check_lut(self) -> None:
        c = self.lut_channels
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise SqueezeError(f"a lookup-table scheme needs a positive number of output channels per table, got {c!r}")
        if (self.granularity, self.group_size, self.symmetric, self.activations, self.gguf) != (
                "channel", None, True, None, None):
            raise SqueezeError(f"a lookup-table scheme (lut{self.bits}g{c}) spans whole rows, with no activation "
                               "quantization and no GGUF type: use the preset name, e.g. 'lut4g16'")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        if self.lut_channels is not None:
            return f"lut{self.bits}g{self.lut_channels}"
        return self.gguf or self._int_name()

    @property
    def gguf_blocks(self) -> bool:
        """Whether layers on this grid are stored as raw GGUF blocks (sub-block scales, mins) in a checkpoint."""
        return self.gguf is not None and not GGUF_SCHEMES[self.gguf].gptq_layout

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
    for bits in LUT_BITS:  # lookup tables: "lut4g16" = 16 values shared by each group of 16 output rows
        for channels in LUT_CHANNELS:
            s = QuantScheme(bits, True, "channel", None, lut_channels=channels)
            presets[s.name] = s
    w8 = QuantScheme(8, True, "channel", None)
    for acts in (ActScheme(), ActScheme(mode="dynamic"), ActScheme(observer="percentile"), ActScheme(symmetric=False)):
        presets[w8.with_(activations=acts).name] = w8.with_(activations=acts)
    return presets


PRESETS: dict[str, QuantScheme] = _build_presets()


class GGUFSchemeSpec(NamedTuple):
    bits: int
    symmetric: bool
    group_size: int  # weights sharing one (sub-block) scale
    gptq_layout: bool  # the grid is an integer preset's, so the GPTQ checkpoint layout holds it exactly


# Schemes named after GGUF block types: calibration rounds onto llama.cpp's exact block grid
# (squeeze.exporters.gguf.grid.GGUFGrid) and `squeeze export --to gguf` writes the blocks without re-rounding.
# Q4_0/Q5_0/Q8_0 are value = d * (q - zero) with one fp16 d per 32 weights: the w4g32/w5g32/w8g32 grids
# with llama.cpp's finer fit of d, stored in the GPTQ layout. The others carry block mins or quantized
# sub-block scales (K-quants: 6-bit scales and mins under fp16 super-block scales) and are stored as raw
# GGUF blocks.
GGUF_SCHEMES: dict[str, GGUFSchemeSpec] = {
    "q4_0": GGUFSchemeSpec(4, True, 32, True),
    "q5_0": GGUFSchemeSpec(5, True, 32, True),
    "q8_0": GGUFSchemeSpec(8, True, 32, True),
    "q4_1": GGUFSchemeSpec(4, False, 32, False),
    "q5_1": GGUFSchemeSpec(5, False, 32, False),
    "q2_k": GGUFSchemeSpec(2, False, 16, False),
    "q3_k": GGUFSchemeSpec(3, True, 16, False),
    "q4_k": GGUFSchemeSpec(4, False, 32, False),
    "q5_k": GGUFSchemeSpec(5, False, 32, False),
    "q6_k": GGUFSchemeSpec(6, True, 16, False),
}
# llama.cpp's mixed --type names: each layer gets the GGUF type the mix gives it (see GGUFMix).
GGUF_MIXES: tuple[str, ...] = ("q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m")
# --type names that are also a block type: as a scheme "q2_k" is the one grid, "q2_k-mix" the mix that
# `llama-quantize ... Q2_K` (and `squeeze export --type q2_k`) writes (bumped tensors, shape fallbacks).
MIX_SUFFIX = "-mix"
GGUF_TYPE_MIXES: tuple[str, ...] = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q6_k")


def gguf_scheme(qtype: str) -> QuantScheme:
    """The scheme of one GGUF block type (``q4_k`` or ``Q4_K``)."""
    key = qtype.strip().lower()
    if key not in GGUF_SCHEMES:
        raise SqueezeError(f"no scheme for GGUF type {qtype!r}; GGUF schemes: {', '.join(GGUF_SCHEMES)}")
    spec = GGUF_SCHEMES[key]
    return QuantScheme(spec.bits, spec.symmetric, "group", spec.group_size, gguf=key)


@dataclass(frozen=True)
class GGUFMix:
    """A llama.cpp mix (``q4_k_m``) as a scheme: every layer is calibrated on the GGUF type that mix gives it.

    The per-layer types follow `squeeze.exporters.gguf.mixes.choose_type` (llama.cpp's rules, shape
    fallbacks included); layers the mix keeps in float stay float. `squeeze export --to gguf --type <mix>`
    of the checkpoint then writes every calibrated layer exactly.
    """

    mix: str
    activations: None = None

    def __post_init__(self) -> None:
        if self.mix not in GGUF_MIXES + GGUF_TYPE_MIXES:
            raise SqueezeError(f"unknown GGUF mix {self.mix!r}; mixes: {', '.join(GGUF_MIXES + GGUF_TYPE_MIXES)}")

    @property
    def name(self) -> str:
        return self.mix + MIX_SUFFIX if self.mix in GGUF_TYPE_MIXES else self.mix

    def to_dict(self) -> dict:
        return {"name": self.mix, "mix": self.mix}


def scheme_from_dict(d: dict) -> "QuantScheme | GGUFMix":
    """Inverse of ``to_dict`` for a single-grid scheme or a GGUF mix."""
    return GGUFMix(d["mix"]) if "mix" in d else QuantScheme.from_dict(d)


def get_scheme(name: str) -> "QuantScheme | GGUFMix":
    """Look up a named preset, GGUF type or GGUF mix; unknown names fail with the list of known ones."""
    key = name.strip().lower()
    if key in GGUF_SCHEMES:
        return gguf_scheme(key)
    if key in GGUF_MIXES:
        return GGUFMix(key)
    if key.endswith(MIX_SUFFIX) and key[: -len(MIX_SUFFIX)] in GGUF_TYPE_MIXES:
        return GGUFMix(key[: -len(MIX_SUFFIX)])
    if key not in PRESETS:
        known = ", ".join(sorted(PRESETS) + list(GGUF_SCHEMES) + list(GGUF_MIXES)
                          + [m + MIX_SUFFIX for m in GGUF_TYPE_MIXES])
        raise SqueezeError(f"unknown scheme {name!r}; known schemes: {known}")
    return PRESETS[key]
