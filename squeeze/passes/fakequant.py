"""Fake quantization on a QuantLinear's own grid, for training (QAT): prepare -> train -> convert.

`FakeQuantLinear.prepare(layer)` turns a `QuantLinear` (from RTN, GPTQ or AWQ, on an integer grid or a GGUF
block grid) into a trainable twin: a float latent weight that starts exactly on the layer's grid, and the
layer's own scales, zero points and block mins. Every forward rounds the latent weight onto that grid and
computes exactly what `QuantLinear` computes for those codes; gradients pass the rounding straight through
(STE, zero outside the grid's range). `convert()` returns the `QuantLinear` of the current codes, so the
checkpoint and every exporter take the result as they take any pass's, and its logits equal the trained
model's bit for bit.

Learned scales (LSQ, Esser et al. 2020) are offered where the checkpoint stores a float16 scale per group
(integer grids, and Q4_0/Q5_0/Q8_0, whose `d` is a float16 per block): each forward uses the scale rounded
to float16, so what is trained is what is saved. Learned zero points (asymmetric integer grids) are rounded
to integers the same way. GGUF types with quantized sub-block scales or block mins (K-quants, Q4_1, Q5_1)
keep the scales they were initialised with (their 6-bit sub-block scales are a second grid).
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


def learnable_scales(layer: QuantLinear) -> bool:
    """Whether the layer's scales are free float16 values per group (not sub-block codes, no block mins)."""
    return layer.offsets is None and layer.gguf_blocks is None


class FakeQuantLinear(nn.Module):
    """y = act_q(x) @ grid(latent).T + bias; the twin of a QuantLinear while it trains."""

    def __init__(self, layer: QuantLinear, learn_scales: bool = False, keep_zeros: bool = False):
        super().__init__()
        if learn_scales and not learnable_scales(layer):
            raise SqueezeError(f"learned scales need a float16 scale per group; {layer.scheme.name} stores quantized "
                               "sub-block scales or block mins: train it with fixed scales (no --learn-scales)")
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
        self.register_buffer("offsets", None if layer.offsets is None else layer.offsets.detach().clone())
        self.register_buffer("gguf_blocks", None if layer.gguf_blocks is None else layer.gguf_blocks.detach().clone())
        self.register_buffer("input_scale", layer.input_scale)
        self.register_buffer("input_zero_point", layer.input_zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        # pruned weights (exact zeros of a sparse layer) stay zero: their gradient is masked
        self.register_buffer("keep", (weight != 0) if keep_zeros else None)
        if keep_zeros:
            self.latent.register_hook(lambda g: g * self.keep)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per column: the scales and zeros in use (learned ones rounded as the checkpoint stores them: float16
        scales, integer zeros), and their differentiable twins (the rounding passed straight through)."""
        idx = self.g_idx.long()
        if self.learn_scales:
            s = _away_from_zero(self.scales)
            s_exact = s.detach().to(SCALE_DTYPE).float()
            s_grad = s + (s_exact - s).detach()
        else:
            s_exact = s_grad = self.scales.detach()
        z_exact = torch.round(self.zeros.detach()).clamp(0, self.maxq)
        z_grad = _ste_round(self.zeros).clamp(0, self.maxq) if self.learn_zeros else z_exact
        return s_exact[:, idx], z_exact[:, idx], s_grad[:, idx], z_grad[:, idx]

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The codes the latent weight rounds to now: uint8 [out, in]."""
        s, z, _, _ = self._grid()
        return self._codes(self.latent.detach(), s, z)

    def _codes(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.offsets is not None:
            w = w - self.offsets[:, self.g_idx.long()]
        safe = torch.where(s == 0, torch.ones_like(s), s)
        return (torch.round(w.float() / safe) + z).clamp(0, self.maxq).to(torch.uint8)

    def weight_value(self) -> torch.Tensor:
        """The weight the current codes dequantize to (QuantLinear's arithmetic), with straight-through grads."""
        s, z, s_grad, z_grad = self._grid()
        w = self.latent
        codes = self._codes(w.detach(), s, z)
        # QuantLinear.dequantized_weight's arithmetic, on per-column parameters (so the column index is arange)
        value = dequantize(codes, s, z, torch.arange(w.shape[1], dtype=torch.int32, device=w.device), torch.float32)
        w_rel = w
        if self.offsets is not None:
            value = value + self.offsets[:, self.g_idx.long()]
            w_rel = w - self.offsets[:, self.g_idx.long()]
        if self.learn_scales:
            x = w_rel / s_grad
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
        s = _away_from_zero(self.scales).to(SCALE_DTYPE).float() if self.learn_scales else self.scales
        z = torch.round(self.zeros).clamp(0, self.maxq)
        codes = self.codes()
        blocks = None if self.gguf_blocks is None else _repack_blocks(self.gguf_blocks, self.scheme.gguf, codes)
        layer = QuantLinear.from_codes(codes, s, z, self.g_idx, self.scheme,
                                       None if self.bias is None else self.bias.detach(), self.compute_dtype,
                                       offsets=self.offsets, gguf_blocks=blocks)
        if self.input_scale is not None:
            layer.input_scale = self.input_scale.clone()
        if self.input_zero_point is not None:
            layer.input_zero_point = self.input_zero_point.clone()
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"learn_scales={self.learn_scales}")


def _away_from_zero(scales: torch.Tensor) -> torch.Tensor:
    """Scales kept at least MIN_SCALE in magnitude, sign kept (llama.cpp's Q4_0 ``d`` may be negative)."""
    return torch.where(scales.abs() < MIN_SCALE, torch.full_like(scales, MIN_SCALE).copysign(scales), scales)


def _code_max(layer: QuantLinear) -> int:
    if layer.scheme.gguf is not None:
        from squeeze.exporters.gguf.codecs import get_format

        return get_format(layer.scheme.gguf.upper()).qmax
    return layer.scheme.maxq


def _repack_blocks(raw: torch.Tensor, qtype: str, codes: torch.Tensor) -> torch.Tensor:
    """The layer's GGUF blocks with new codes and the same (quantized) scales and mins."""
    from dataclasses import replace

    from squeeze.exporters.gguf.codecs import pack, unpack

    qb = unpack(raw.cpu().numpy(), qtype.upper())
    qb = replace(qb, codes=codes.cpu().numpy().astype(np.uint8).reshape(qb.codes.shape))
    return torch.from_numpy(pack(qb).reshape(raw.shape)).to(raw.device)


def prepare(model: nn.Module, learn_scales: bool = False, sparse: set[str] = frozenset()) -> dict[str, FakeQuantLinear]:
    """Replace every QuantLinear of ``model`` by its FakeQuantLinear (layers named in ``sparse`` keep their
    zeros); returns them by name."""
    from squeeze.model import set_submodule

    out = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            out[name] = FakeQuantLinear(module, learn_scales and learnable_scales(module), name in sparse)
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
