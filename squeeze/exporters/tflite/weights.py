"""Which squeeze layers TFLite can hold as they are, and their codes in TFLite's terms.

TFLite stores symmetric integer weights only (zero point 0): int8 per channel, or 4-bit codes per channel or
per block of input columns (BlockwiseQuantization, float16 scales). A symmetric squeeze grid maps onto that
exactly: its codes 0..2^b-1 around the fixed zero 2^(b-1) are the signed levels code - 2^(b-1), its float16
scales are copied. Anything else is refused in one line that names the scheme to use instead.

Int8 activations (W8A8, per-channel int8 weights): static ones keep the checkpoint's calibrated per-tensor
scale, and its uint8 zero point z as TFLite's int8 one, z - 128 (the same grid shifted: uint8 code c is int8
code c - 128); dynamic ones (per token at run time) are TFLite's dynamic-range kernels, which quantize each
row of the input the same way (asymmetric when the scheme is).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dataclasses import dataclass

from squeeze.errors import SqueezeError
from squeeze.exporters.tflite.flatbuf import IntWeight
from squeeze.model import set_submodule
from squeeze.modules import QuantLinear
from squeeze.palette import refuse_lut


class Unplaceable(SqueezeError):
    """A layer TFLite cannot hold as integers of its own and is written as float32 (the exact values of its codes)."""


@dataclass(frozen=True)
class InputQuant:
    """How a W8A8 layer's input is quantized: static (``scale``, int8 ``zero_point``) or dynamic per row."""

    static: bool
    symmetric: bool
    scale: float | None = None
    zero_point: int = 0


def input_quant(name: str, layer: QuantLinear) -> InputQuant | None:
    acts = layer.scheme.activations
    if acts is None:
        return None
    if acts.mode == "dynamic":
        return InputQuant(False, acts.symmetric)
    if layer.input_scale is None or layer.input_scale.numel() != 1:
        raise SqueezeError(f"{name}: {layer.scheme.name} needs one calibrated input scale and the checkpoint has "
                           f"{'none' if layer.input_scale is None else layer.input_scale.numel()}")
    zero = 0 if layer.input_zero_point is None else int(layer.input_zero_point.reshape(-1)[0]) - 128
    return InputQuant(True, acts.symmetric, float(layer.input_scale.float().reshape(-1)[0]), zero)


def reads_directly(dynamic_range: bool, inputs: InputQuant | None) -> bool:
    """Whether a layer's FULLY_CONNECTED reads its integer weight directly (TFLite's dynamic-range kernels,
    int8 activations per row: with --dynamic-range, or the scheme's own dynamic activations) rather than
    behind a DEQUANTIZE or as a static W8A8 matmul."""
    return dynamic_range or (inputs is not None and not inputs.static)


def _symmetric_name(layer: QuantLinear) -> str:
    s = layer.scheme
    return s.name.replace("-asym", "") if "-asym" in s.name else f"w{s.bits}g{s.group_size or 32}"


def tflite_weight(name: str, layer: QuantLinear, int4_kernels: bool = False) -> IntWeight:
    """``layer``'s codes as TFLite holds them, or a SqueezeError saying why it cannot and what to use.
    ``int4_kernels``: 4-bit codes are read by TFLite's blockwise int4 kernels (dynamic-range), which need
    blocks of a multiple of 32 columns; dequantized to float (weight-only), any block that divides the row."""
    s = layer.scheme
    refuse_lut(s, name, "TFLite")
    if s.activations is not None and (s.bits != 8 or s.granularity == "group"):
        raise SqueezeError(f"{name}: {s.name} has int8 activations with {s.bits}-bit {s.granularity} weights; "
                           "TFLite's W8A8 takes per-channel int8 weights: quantize with w8a8")
    if layer.offsets is not None or layer.gguf_blocks is not None:
        raise SqueezeError(f"{name}: {s.name} stores block mins or quantized sub-block scales, which TFLite cannot "
                           "hold; use q4_0 or a symmetric integer scheme (w4g32, w8)")
    if not s.symmetric:
        raise SqueezeError(f"{name}: TFLite holds symmetric weights only (no zero points) and {s.name} is "
                           f"asymmetric; quantize with {_symmetric_name(layer)} instead")
    if not layer.has_ordered_groups():
        raise SqueezeError(f"{name}: its groups are permuted (GPTQ --act-order without static groups), which TFLite's "
                           "blocks of consecutive columns cannot hold; quantize with --static-groups or without "
                           "--act-order")
    n_groups = layer.scales.shape[1]
    block = layer.in_features // n_groups
    columns = torch.arange(layer.in_features)
    if n_groups > 1 and not torch.equal(layer.g_idx.cpu().long(), columns // block):  # a shorter last group
        raise Unplaceable(f"{layer.in_features} input columns do not split into blocks of {s.group_size}")
    # measured: LiteRT's int4 kernels compute such layers wrongly (KLD 0.03 on stories260K)
    if int4_kernels and s.bits <= 4 and block % 32:
        raise Unplaceable(f"int4 blocks of {block} columns (LiteRT's int4 kernels need a multiple of 32)")
    if s.bits > 4 and n_groups > 1:
        raise SqueezeError(f"{name}: TFLite's blockwise quantization holds 4-bit codes only and {s.name} has "
                           f"{s.bits}-bit groups; use per-channel 8-bit weights (w8) or w4g{s.group_size}")
    idx = layer.g_idx.long()
    levels = (layer.codes.to(torch.int16) - layer.zeros[:, idx].round().to(torch.int16)).numpy()
    lo, hi = (-8, 7) if s.bits <= 4 else (-128, 127)
    if levels.min() < lo or levels.max() > hi:
        raise SqueezeError(f"{name}: codes fall outside [{lo}, {hi}] around their zero point; the checkpoint is "
                           "not a symmetric grid squeeze wrote")
    scales = layer.scales.detach().float()
    if not torch.equal(scales, scales.half().float()):
        raise SqueezeError(f"{name}: scales are not float16 values, as squeeze checkpoints store them")
    return IntWeight(name + ".weight", levels.astype(np.int8), scales.half().numpy(), 4 if s.bits <= 4 else 8)


@dataclass
class Twins:
    """What `float_twins` found: codes per layer, their float32 values (to find them again), the inputs of
    W8A8 layers, and the layers kept float32 (why)."""

    weights: dict[str, IntWeight]
    floats: dict[str, np.ndarray]
    inputs: dict[str, InputQuant]
    kept: dict[str, str]


def float_twins(model: nn.Module, dynamic_range: bool = False) -> Twins:
    """Replace every QuantLinear of ``model`` by an nn.Linear holding the float32 values of its codes (what the
    converter writes, and finds again by content). Refusals come before any change. ``dynamic_range``: the
    layers will run in TFLite's dynamic-range kernels (so will layers with dynamic int8 activations)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    weights, kept_float, inputs = {}, {}, {}
    for name, layer in layers:
        found = input_quant(name, layer)
        try:
            weights[name] = tflite_weight(name, layer, int4_kernels=reads_directly(dynamic_range, found))
        except Unplaceable as e:
            if layer.scheme.activations is not None:  # float32 would drop its int8 inputs
                raise SqueezeError(f"{name}: {e}; TFLite cannot hold this W8A8 layer") from None
            kept_float[name] = str(e)
            continue
        if found is not None:
            inputs[name] = found
    floats = {name: layer.float32_weight().numpy() for name, layer in layers}
    for name, layer in layers:
        set_submodule(model, name, layer.float_linear())
    return Twins(weights, floats, inputs, kept_float)
