"""Which squeeze layers Core ML holds as they are, and their codes in Core ML's constexpr terms (iOS 18).

- Integer grids of 4 or 8 bits, per channel or per block of consecutive input columns:
  ``constexpr_blockwise_shift_scale`` (value = scale * (data - offset)). Symmetric codes are stored as signed
  levels code - 2^(b-1) (int4/int8, no offset), asymmetric ones as the unsigned codes with their integer zero
  points as the offset (uint4/uint8); the float16 scales are copied. Core ML's blocks must divide the row, so a
  row whose last group is short (stories260K's 172 columns in groups of 32) is written in blocks of
  gcd(columns, group) columns, each with its group's scale: the same values, more scale bytes.
- Lookup-table grids (``lut4g16``): ``constexpr_lut_to_dense``, the codes as uint indices and one table per
  group of output rows. Core ML's groups must divide the rows, so a layer whose rows do not split into the
  scheme's groups (stories260K's 172 rows in groups of 16) gets one table per gcd(rows, channels) rows,
  each a copy of its group's: the same values, a few more table bytes.
Anything else is refused in one line naming what to use instead.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import set_submodule
from squeeze.modules import QuantLinear
from squeeze.palette import group_tables

SHIFT_SCALE_BITS = (4, 8)  # constexpr_blockwise_shift_scale's integer data types
LUT_INDEX_BITS = (1, 2, 3, 4, 6, 8)  # constexpr_lut_to_dense's index types


@dataclass(frozen=True)
class CoreMLWeight:
    """One layer's weight as Core ML stores it.

    kind "shift_scale": ``data`` (int8 levels, or uint8 codes with ``offset``) and ``scale`` [rows, blocks];
    kind "lut": ``data`` (uint8 indices) and ``lut`` [tables, entries], one table per ``lut_rows`` rows.
    """

    layer: str
    kind: str
    bits: int
    data: np.ndarray  # [rows, cols]
    scale: np.ndarray | None = None  # float32 [rows, blocks] (float16 values)
    offset: np.ndarray | None = None  # uint8 [rows, blocks] (asymmetric grids)
    lut: np.ndarray | None = None  # float32 [tables, entries] (float16 values)
    lut_rows: int = 1

    @property
    def signed(self) -> bool:
        return self.kind == "shift_scale" and self.offset is None


def content_key(values: np.ndarray) -> str:
    """What finds a weight again in the converted program: the hash of its float32 values."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def coreml_weight(name: str, layer: QuantLinear) -> CoreMLWeight:
    """``layer``'s codes as Core ML holds them, or a SqueezeError saying why it cannot and what to use."""
    s = layer.scheme
    if s.activations is not None:
        raise SqueezeError(f"{name}: {s.name} quantizes activations, and squeeze's Core ML export holds weights "
                           "only; quantize the weights alone (w8, w4g32, lut4g16)")
    if layer.lut is not None:
        return _lut_weight(name, layer)
    if layer.offsets is not None or layer.gguf_blocks is not None:
        raise SqueezeError(f"{name}: {s.name} stores block mins or quantized sub-block scales, which Core ML cannot "
                           "hold; use q4_0 or an integer scheme (w4g32, w8)")
    if s.bits not in SHIFT_SCALE_BITS:
        raise SqueezeError(f"{name}: Core ML's blockwise weights hold 4- or 8-bit codes and {s.name} has {s.bits}; "
                           f"quantize with w{4 if s.bits < 4 else 8}{_group(s)} or a lookup-table scheme "
                           f"(lut{s.bits if s.bits in LUT_INDEX_BITS else 4}g16)")
    if not layer.has_ordered_groups():
        raise SqueezeError(f"{name}: its groups are permuted (GPTQ --act-order without static groups), which Core ML's "
                           "blocks of consecutive columns cannot hold; quantize with --static-groups or without "
                           "--act-order")
    group = s.group_size_for(layer.in_features)
    block = math.gcd(layer.in_features, group)  # Core ML's blocks divide the row: a short last group is split up
    group_of_block = torch.arange(layer.in_features // block) * block // group
    codes = layer.codes.cpu().to(torch.int16)
    zeros = layer.zeros.cpu()[:, group_of_block]
    scale = layer.scales.cpu().float()[:, group_of_block].to(torch.float16).float().numpy()
    if s.symmetric:
        zero = float(zeros.reshape(-1)[0])
        if not bool((zeros == zero).all()) or zero != 1 << (s.bits - 1):
            raise SqueezeError(f"{name}: symmetric codes must sit around {1 << (s.bits - 1)}; re-create the checkpoint")
        return CoreMLWeight(name, "shift_scale", s.bits, (codes - int(zero)).to(torch.int8).numpy(), scale)
    return CoreMLWeight(name, "shift_scale", s.bits, codes.to(torch.uint8).numpy(), scale,
                        offset=zeros.to(torch.uint8).numpy())


def _group(scheme) -> str:
    return f"g{scheme.group_size}" if scheme.granularity == "group" else ""


def _lut_weight(name: str, layer: QuantLinear) -> CoreMLWeight:
    s = layer.scheme
    if s.bits not in LUT_INDEX_BITS:
        raise SqueezeError(f"{name}: Core ML's lookup-table indices are {', '.join(map(str, LUT_INDEX_BITS))} bits "
                           f"wide, not {s.bits} ({s.name}); use lut4g16 or lut6g16")
    rows = math.gcd(layer.out_features, int(s.lut_channels))
    tables = group_tables(layer.lut.cpu(), rows).numpy()  # one per `rows` rows (copies where groups were larger)
    return CoreMLWeight(name, "lut", s.bits, layer.codes.cpu().numpy().astype(np.uint8),
                        lut=tables.astype(np.float16).astype(np.float32), lut_rows=rows)


def dequantized(weight: CoreMLWeight) -> np.ndarray:
    """The float32 values Core ML decompresses ``weight`` to (what torch computes with)."""
    if weight.kind == "lut":
        tables = np.repeat(weight.lut, weight.lut_rows, axis=0)
        return np.take_along_axis(tables, weight.data.astype(np.int64), axis=1)
    cols = weight.data.shape[1]
    block = cols // weight.scale.shape[1]
    data = weight.data.astype(np.float32)
    if weight.offset is not None:
        data = data - np.repeat(weight.offset.astype(np.float32), block, axis=1)
    return data * np.repeat(weight.scale, block, axis=1)


def float_twins(model: nn.Module) -> dict[str, CoreMLWeight]:
    """Replace every QuantLinear of ``model`` by an nn.Linear holding the float32 values of its codes (what the
    converter sees); returns their Core ML weights by content key. Refusals come before any change."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    weights = {}
    for name, layer in layers:
        weight = coreml_weight(name, layer)
        values = layer.float32_weight().cpu().numpy()
        if not np.array_equal(dequantized(weight), values):  # e.g. a scale that float16 does not hold
            raise SqueezeError(f"{name}: its values are not exactly the Core ML form of its codes; re-create the "
                               "checkpoint with this squeeze version")
        weights[content_key(values)] = weight
    for name, layer in layers:
        set_submodule(model, name, layer.float_linear())
    return weights
