"""Pure quantization math: qparams, quantize/dequantize, fake-quant, int packing.

Weights are [out_features, in_features]; groups run along the input dimension
(as in GPTQ). A row whose length is not a multiple of the group size gets a
shorter last group. Scales are rounded to float16 when they are computed, so
the in-memory model and the checkpoint (which stores fp16 scales, as the GPTQ
layout does) hold exactly the same grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from squeeze.scheme import ActScheme, QuantScheme

SCALE_DTYPE = torch.float16
# Smallest scale kept: a normal fp16 number, so an all-zero group stays exact
# and 1/scale stays finite.
MIN_SCALE = 2.0**-14


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Group id of every input column: [in_features] int32 (GPTQ's ``g_idx``)."""
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size], zero-padding a short last group.

    Zero padding never changes a group's range: every grid here contains 0.
    """
    out_f, in_f = w.shape
    pad = num_groups(in_f, group_size) * group_size - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, -1, group_size)


def qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for value ranges [wmin, wmax] (any shape, float32)."""
    maxq = (1 << bits) - 1
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if symmetric:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2.0 * amax / maxq
    else:
        scale = (wmax - wmin) / maxq
    scale = scale.clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def compute_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point for a weight: two [out, n_groups] float32 tensors."""
    w = w.detach().float()
    out_f, in_f = w.shape
    if scheme.granularity == "tensor":
        wmin = w.min().expand(out_f, 1)
        wmax = w.max().expand(out_f, 1)
    else:
        g = _grouped(w, scheme.group_size_for(in_f))
        wmin, wmax = g.amin(dim=2), g.amax(dim=2)
    return qparams_from_range(wmin, wmax, scheme.bits, scheme.symmetric)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, g_idx: torch.Tensor
) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] for ``w`` [out, in]: uint8 [out, in]."""
    s = scale[:, g_idx.long()]
    z = zero[:, g_idx.long()]
    q = torch.round(w.float() / s) + z
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """Float weight [out, in] from codes and per-group qparams."""
    idx = g_idx.long()
    return ((q.float() - zero[:, idx]) * scale[:, idx]).to(dtype)


def fake_quant(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize then dequantize ``w`` on ``scheme``'s grid, in ``w``'s dtype."""
    scale, zero = compute_qparams(w, scheme)
    g_idx = group_index(w.shape[1], scheme.group_size_for(w.shape[1]), w.device)
    return dequantize(quantize(w, scale, zero, scheme.bits, g_idx), scale, zero, g_idx, w.dtype)


# ---- activations: int8 (symmetric) or uint8 with a zero point (asymmetric) --------

ACT_QMAX = 127.0  # symmetric: round(x / s) in [-128, 127], zero point 0
ACT_UMAX = 255  # asymmetric: round(x / s) + z in [0, 255], integer zero point z in [0, 255]
MIN_ACT_SCALE = 1e-8


class ActQParams(NamedTuple):
    """Static per-tensor activation qparams: float32 scalar scale; uint8 scalar zero point (None: symmetric)."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None


def act_scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    return (absmax.float() / ACT_QMAX).clamp(min=MIN_ACT_SCALE)


def act_qparams_from_range(low: torch.Tensor, high: torch.Tensor, symmetric: bool) -> ActQParams:
    """Scale (and zero point) covering [low, high] (any shape); the range is widened to include 0.

    Asymmetric follows onnxruntime's uint8 QDQ: scale = (max - min) / 255, zero point = round(-min / scale),
    so 0.0 is exactly representable (it quantizes to the zero point).
    """
    low = torch.minimum(low.float(), torch.zeros_like(low, dtype=torch.float32))
    high = torch.maximum(high.float(), torch.zeros_like(high, dtype=torch.float32))
    if symmetric:
        return ActQParams(act_scale_from_absmax(torch.maximum(-low, high)), None)
    scale = ((high - low) / ACT_UMAX).clamp(min=MIN_ACT_SCALE)
    zero = torch.round(-low / scale).clamp(0, ACT_UMAX).to(torch.uint8)
    return ActQParams(scale, zero)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Integer activation codes as float: int8 range without a zero point, uint8 range with one."""
    if zero_point is None:
        return torch.round(x.float() / scale).clamp(-ACT_QMAX - 1, ACT_QMAX)
    return (torch.round(x.float() / scale) + zero_point.float()).clamp(0, ACT_UMAX)


def fake_quant_activation(
    x: torch.Tensor, acts: ActScheme, static_scale: torch.Tensor | None, static_zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Simulated 8-bit activation: static per-tensor qparams, or dynamic per-token range."""
    if acts.mode == "static":
        if static_scale is None:
            raise ValueError("static activation quantization needs a calibrated scale")
        if (static_zero_point is None) != acts.symmetric:
            raise ValueError(f"activation scheme {acts.name!r} is {'' if acts.symmetric else 'a'}symmetric but the "
                             f"layer {'has' if static_zero_point is not None else 'has no'} input zero point")
        scale = static_scale.to(x.device)
        zero = None if static_zero_point is None else static_zero_point.to(x.device)
    else:
        xd = x.detach()
        scale, zero = act_qparams_from_range(xd.amin(dim=-1, keepdim=True), xd.amax(dim=-1, keepdim=True),
                                             acts.symmetric)
    q = quantize_activation(x, scale, zero)
    return ((q if zero is None else q - zero.float()) * scale).to(x.dtype)


# ---- int32 bit packing (GPTQ layout) ---------------------------------------------


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2^32 as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide ints [n, m] into int32 [ceil(n*bits/32), m].

    Values form one little-endian bit stream down each column: value i occupies
    bits i*bits .. i*bits+bits-1. For 2/4/8 bits this is AutoGPTQ's packing, and
    for 3 bits it matches AutoGPTQ's 3-in-32 word cycle. A stream that does not
    end on a word boundary is zero-padded.
    """
    n, m = values.shape
    v = values.to(torch.int64)
    if (v < 0).any() or (v >> bits).any():
        raise ValueError(f"values do not fit in {bits} bits")
    words = -(-n * bits // 32)
    if 32 % bits == 0:
        per = 32 // bits
        v = torch.nn.functional.pad(v, (0, 0, 0, words * per - n)).reshape(words, per, m)
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        return _to_int32((v << shifts).sum(dim=1))
    bit_pos = torch.arange(bits, dtype=torch.int64).view(1, bits, 1)
    stream = ((v.unsqueeze(1) >> bit_pos) & 1).reshape(n * bits, m)
    stream = torch.nn.functional.pad(stream, (0, 0, 0, words * 32 - n * bits)).reshape(words, 32, m)
    shifts = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    return _to_int32((stream << shifts).sum(dim=1))


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [words, m] -> uint8 [n, m]."""
    words, m = packed.shape
    if words * 32 < n * bits:
        raise ValueError(f"{words} packed words cannot hold {n} values of {bits} bits")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        return ((w.unsqueeze(1) >> shifts) & mask).reshape(words * per, m)[:n].to(torch.uint8)
    shifts = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    stream = ((w.unsqueeze(1) >> shifts) & 1).reshape(words * 32, m)[: n * bits].reshape(n, bits, m)
    weights = (1 << torch.arange(bits, dtype=torch.int64)).view(1, bits, 1)
    return (stream * weights).sum(dim=1).to(torch.uint8)
