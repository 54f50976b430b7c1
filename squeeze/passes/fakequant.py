"""Fake quantization on a QuantLinear's own grid, for training (QAT): prepare -> train -> convert.

`FakeQuantLinear.prepare(layer)` turns a `QuantLinear` (from RTN, GPTQ or AWQ, on an integer grid or a GGUF
block grid) into a trainable twin: a float latent weight that starts exactly on the layer's grid, and the
layer's own scales, zero points and block mins. Every forward rounds the latent weight onto that grid and
computes exactly what `QuantLinear` computes for those codes; gradients pass the rounding straight through
(STE, zero outside the grid's range). `convert()` returns the `QuantLinear` of the current codes, so the
checkpoint and every exporter take the result as they take any pass's, and its logits equal the trained
model's bit for bit.

Learned scales (LSQ, Esser et al. 2020) are trained on the grid the checkpoint stores them on, so what is
trained is what is saved: every forward uses the scale as stored and passes the rounding straight through.
- integer grids and Q4_0/Q5_0/Q8_0: a float16 scale per group (`d` per block); learned zero points of
  asymmetric grids are rounded to integers;
- Q4_1/Q5_1: the block scale `d` and block minimum `m`, both float16;
- K-quants: the integer sub-block scales (and mins of Q2_K/Q4_K/Q5_K) under their super-block's float16
  `d` (`dmin`), which stay as initialised: a sub-block's step is d * clamp(round(s / d)) in the type's
  range (Q4_K 0..63, Q3_K -32..31, Q6_K -128..127, Q2_K 0..15), its min -dmin * clamp(round(-m / dmin)).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.modules import QuantLinear
from squeeze.primitives import MIN_SCALE, SCALE_DTYPE, dequantize, fake_quant_activation


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(nn.Module):
    """y = act_q(x) @ grid(latent).T + bias; the twin of a QuantLinear while it trains."""

    def __init__(self, layer: QuantLinear, learn_scales: bool = False, keep_zeros: bool = False):
        super().__init__()
        if layer.lut is not None:
            raise SqueezeError(f"QAT trains integer and GGUF grids; {layer.scheme.name} is a lookup-table grid, whose "
                               "tables it cannot train yet: quantize with GPTQ on the table instead")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.scheme, self.compute_dtype = layer.scheme, layer.compute_dtype
        self.maxq = _code_max(layer)
        weight = layer.float32_weight()
        self.latent = nn.Parameter(weight.clone())
        self.learn_scales = learn_scales
        self.learn_zeros = learn_scales and not layer.scheme.symmetric
        self.scales = nn.Parameter(layer.scales.detach().float().clone(), requires_grad=learn_scales)
        self.zeros = nn.Parameter(layer.zeros.detach().float().clone(), requires_grad=self.learn_zeros)
        self.register_buffer("g_idx", layer.g_idx.detach().clone())
        self.offsets = None if layer.offsets is None else nn.Parameter(layer.offsets.detach().float().clone(),
                                                                       requires_grad=learn_scales)
        self.register_buffer("gguf_blocks", None if layer.gguf_blocks is None else layer.gguf_blocks.detach().clone())
        # K-quants: each group's super-block d (dmin), the fixed float16 unit of its integer sub-block scale (min)
        self.register_buffer("scale_unit", None)
        self.register_buffer("offset_unit", None)
        self.sub_range = None
        if layer.gguf_blocks is not None:
            self._units(layer)
        self.register_buffer("input_scale", layer.input_scale)
        self.register_buffer("input_zero_point", layer.input_zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        # pruned weights (exact zeros of a sparse layer) stay zero: their gradient is masked
        self.register_buffer("keep", (weight != 0) if keep_zeros else None)
        if keep_zeros:
            self.latent.register_hook(lambda g: g * self.keep)

    def _units(self, layer: QuantLinear) -> None:
        from squeeze.exporters.gguf.codecs import _SUB_RANGE, unpack

        qb = unpack(layer.gguf_blocks.cpu().numpy(), self.scheme.gguf.upper())
        if qb.scales is None:  # Q4_1 / Q5_1: float16 d and m per block, no second grid
            return
        per_group = lambda a: torch.from_numpy(
            np.repeat(a.astype(np.float32), qb.scales.shape[-1], axis=-1).reshape(layer.scales.shape).copy())
        self.scale_unit = per_group(qb.d).to(layer.scales.device)
        if qb.dmin is not None:
            self.offset_unit = per_group(qb.dmin).to(layer.scales.device)
        self.sub_range = _SUB_RANGE[self.scheme.gguf.upper()]

    def _stored_scales(self) -> torch.Tensor:
        """Per group: the learned scales as the checkpoint stores them (differentiable, rounding straight through)."""
        s = self.scales
        if self.scale_unit is None:
            s = _away_from_zero(s)
            exact = s.detach().to(SCALE_DTYPE).float()
        else:
            exact = self.scale_unit * _sub_codes(s.detach(), self.scale_unit, *self.sub_range)
        return s + (exact - s).detach()

    def _stored_offsets(self) -> torch.Tensor | None:
        """Per group: the block mins as stored (float16 m of Q4_1/Q5_1; -dmin * integer min of the K-quants)."""
        m = self.offsets
        if m is None or not self.learn_scales:
            return None if m is None else m.detach()
        if self.offset_unit is None:
            exact = m.detach().to(SCALE_DTYPE).float()
        else:
            exact = -self.offset_unit * _sub_codes(-m.detach(), self.offset_unit, 0, self.sub_range[1])
        return m + (exact - m).detach()

    def _grid(self) -> tuple[torch.Tensor, ...]:
        """Per column: the scales, zeros and offsets in use (learned ones as the checkpoint stores them), and the
        differentiable twins of scales and zeros (the rounding passed straight through)."""
        idx = self.g_idx.long()
        if self.learn_scales:
            s_grad = self._stored_scales()
            s_exact = s_grad.detach()
        else:
            s_exact = s_grad = self.scales.detach()
        z_exact = torch.round(self.zeros.detach()).clamp(0, self.maxq)
        z_grad = _ste_round(self.zeros).clamp(0, self.maxq) if self.learn_zeros else z_exact
        off = self._stored_offsets()
        off = None if off is None else off[:, idx]
        return s_exact[:, idx], z_exact[:, idx], s_grad[:, idx], z_grad[:, idx], off

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The codes the latent weight rounds to now: uint8 [out, in]."""
        s, z, _, _, off = self._grid()
        return self._codes(self.latent.detach(), s, z, off)

    def _codes(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, off: torch.Tensor | None) -> torch.Tensor:
        if off is not None:
            w = w - off.detach()
        safe = torch.where(s == 0, torch.ones_like(s), s)
        return (torch.round(w.float() / safe) + z).clamp(0, self.maxq).to(torch.uint8)

    def weight_value(self) -> torch.Tensor:
        """The weight the current codes dequantize to (QuantLinear's arithmetic), with straight-through grads."""
        s, z, s_grad, z_grad, off = self._grid()
        w = self.latent
        codes = self._codes(w.detach(), s, z, off)
        # QuantLinear.dequantized_weight's arithmetic, on per-column parameters (so the column index is arange)
        value = dequantize(codes, s, z, torch.arange(w.shape[1], dtype=torch.int32, device=w.device), torch.float32)
        w_rel = w
        if off is not None:  # the min's gradient reaches a learned offset through the surrogate below
            value = value + off.detach()
            w_rel = w - off
        if self.learn_scales:  # a sub-block scale rounded to 0 still learns (d(q * s)/ds = q), its weights not
            x = w_rel / torch.where(s == 0, torch.ones_like(s), s_grad)
            surrogate = ((x + (torch.round(x) - x).detach() + z_grad).clamp(0, self.maxq) - z_grad) * s_grad
        else:  # straight through inside the grid's range, nothing outside it (the clamp's own gradient)
            raw = torch.round(w_rel.detach() / torch.where(s == 0, torch.ones_like(s), s)) + z
            surrogate = w * ((raw >= 0) & (raw <= self.maxq))
        return value + (surrogate - surrogate.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.scheme.activations
        if acts is not None:
            x = fake_quant_activation(x, acts, self.input_scale, self.input_zero_point)
        w = self.weight_value().to(self.compute_dtype)
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    @torch.no_grad()
    def convert(self) -> QuantLinear:
        """The QuantLinear of the current codes (and float16 scales, integer zeros): the trained layer."""
        s = self._stored_scales().detach() if self.learn_scales else self.scales.detach()
        z = torch.round(self.zeros).clamp(0, self.maxq)
        off = self._stored_offsets()
        codes = self.codes()
        blocks = None
        if self.gguf_blocks is not None:
            fields = self._block_scales(s, off) if self.learn_scales else None
            blocks = _repack_blocks(self.gguf_blocks, self.scheme.gguf, codes, fields)
        layer = QuantLinear.from_codes(codes, s, z, self.g_idx, self.scheme,
                                       None if self.bias is None else self.bias.detach(), self.compute_dtype,
                                       offsets=off, gguf_blocks=blocks)
        if self.input_scale is not None:
            layer.input_scale = self.input_scale.clone()
        if self.input_zero_point is not None:
            layer.input_zero_point = self.input_zero_point.clone()
        return layer

    def _block_scales(self, s: torch.Tensor, off: torch.Tensor | None) -> dict:
        """The GGUF block fields of learned scales (and mins): float16 d/m per block, or integer sub-block codes."""
        if self.scale_unit is None:  # Q4_1 / Q5_1: one group per block
            return {"d": s.to(SCALE_DTYPE).cpu().numpy(), "dmin": off.to(SCALE_DTYPE).cpu().numpy()}
        lo, hi = self.sub_range
        fields = {"scales": _sub_codes(s, self.scale_unit, lo, hi).to(torch.int16).cpu().numpy()}
        if off is not None:
            fields["mins"] = _sub_codes(-off, self.offset_unit, 0, hi).to(torch.int16).cpu().numpy()
        return fields

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"learn_scales={self.learn_scales}")


def _away_from_zero(scales: torch.Tensor) -> torch.Tensor:
    """Scales kept at least MIN_SCALE in magnitude, sign kept (llama.cpp's Q4_0 ``d`` may be negative)."""
    return torch.where(scales.abs() < MIN_SCALE, torch.full_like(scales, MIN_SCALE).copysign(scales), scales)


def _sub_codes(value: torch.Tensor, unit: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The integer sub-block code nearest ``value`` in steps of ``unit`` (float32); groups whose unit is 0 keep
    code 0 (an all-zero super-block)."""
    safe = torch.where(unit == 0, torch.ones_like(unit), unit)
    return torch.where(unit == 0, torch.zeros_like(value), torch.round(value / safe).clamp(lo, hi))


def _code_max(layer: QuantLinear) -> int:
    if layer.scheme.gguf is not None:
        from squeeze.exporters.gguf.codecs import get_format

        return get_format(layer.scheme.gguf.upper()).qmax
    return layer.scheme.maxq


def _repack_blocks(raw: torch.Tensor, qtype: str, codes: torch.Tensor, fields: dict | None = None) -> torch.Tensor:
    """The layer's GGUF blocks with new codes, and the same (quantized) scales and mins unless ``fields`` gives
    new ones per group (d/dmin for Q4_1/Q5_1, integer scales/mins for the K-quants)."""
    from dataclasses import replace

    from squeeze.exporters.gguf.codecs import pack, unpack

    qb = unpack(raw.cpu().numpy(), qtype.upper())
    new = {"codes": codes.cpu().numpy().astype(np.uint8).reshape(qb.codes.shape)}
    for name, value in (fields or {}).items():
        new[name] = value.reshape(getattr(qb, name).shape).astype(getattr(qb, name).dtype)
    qb = replace(qb, **new)
    return torch.from_numpy(pack(qb).reshape(raw.shape)).to(raw.device)


def prepare(model: nn.Module, learn_scales: bool = False, sparse: set[str] = frozenset()) -> dict[str, FakeQuantLinear]:
    """Replace every QuantLinear of ``model`` by its FakeQuantLinear (layers named in ``sparse`` keep their
    zeros); returns them by name."""
    from squeeze.model import set_submodule

    out = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            out[name] = FakeQuantLinear(module, learn_scales, name in sparse)
            set_submodule(model, name, out[name])
    return out


def convert(model: nn.Module) -> dict[str, QuantLinear]:
    """Replace every FakeQuantLinear of ``model`` by the QuantLinear of its current codes; returns them."""
    from squeeze.model import set_submodule

    out = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            out[name] = module.convert()
            set_submodule(model, name, out[name])
    return out
