"""GGUF block types as a `squeeze.grid.WeightGrid`: GPTQ/AWQ round onto the exact llama.cpp grid.

A block (32 weights for legacy types, a 256-weight super-block for K-quants) is fitted with llama.cpp's
own reference quantizer, so its scales are already what the file stores (K-quants: 6-bit / 4-bit / 8-bit
sub-block scales and mins, fp16 super-block scales). Each column is then rounded to the nearest level of
that fixed grid, and `GGUFGrid.blocks` assembles the chosen codes with the fitted scales into
`QuantizedBlocks` that `codecs.pack` writes without re-rounding.

    result = gptq_quantize(weight, hessian, GGUFGrid("Q4_K"))
    raw = pack(GGUFGrid("Q4_K").blocks(result.params, result.codes))   # == result.values in llama.cpp
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.exporters.gguf.codecs import QuantizedBlocks, get_format, group_params, pack, quantize_blocks
from squeeze.grid import LayerQParams


@dataclass(frozen=True)
class BlockParams:
    """One fitted block per row: its quantized scales (``blocks``) and the per-group float32 step/bias."""

    blocks: QuantizedBlocks  # fields shaped (rows, 1, ...)
    step: torch.Tensor  # [rows, n_groups]
    bias: torch.Tensor | None  # [rows, n_groups]


@dataclass(frozen=True)
class GGUFGrid:
    """The grid of one quantized ggml type (Q4_0 ... Q6_K)."""

    qtype: str

    def __post_init__(self) -> None:
        try:
            fmt = get_format(self.qtype)
        except ValueError as e:
            raise SqueezeError(str(e)) from None
        if fmt.is_float:
            raise SqueezeError(f"{self.qtype} is a float type; a calibrated grid needs a quantized GGUF type")

    def block_size(self, in_features: int) -> int:
        size = get_format(self.qtype).block_size
        if in_features % size:
            raise SqueezeError(f"rows of {in_features} weights do not split into {self.qtype} blocks of {size}; "
                               "llama.cpp's mixes write such layers in a fallback type — quantize them with that "
                               "type's grid or leave them out (--ignore)")
        return size

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> BlockParams:
        """llama.cpp's reference quantizer's blocks; with ``importance`` [block columns], the importance-weighted
        fit (`codecs.quantize_blocks`: for Q4_0/Q5_0 exactly the scales llama.cpp chooses given that imatrix)."""
        x = w.detach().float().cpu().numpy()
        imp = None if importance is None else importance.detach().float().cpu().numpy()
        qb = quantize_blocks(x, self.qtype, imp)
        step, bias = group_params(qb)
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a[:, 0])).to(w.device)  # noqa: E731
        return BlockParams(qb, to_t(step), None if bias is None else to_t(bias))

    def nearest(self, w: torch.Tensor, params: BlockParams, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = get_format(self.qtype)
        groups = (start + torch.arange(w.shape[1], device=w.device)) // fmt.group_size
        step = params.step[:, groups]
        bias = params.bias[:, groups] if params.bias is not None else torch.zeros_like(step)
        safe = torch.where(step == 0, torch.ones_like(step), step)
        q = (torch.round((w.float() - bias) / safe) + fmt.zero).clamp(0, fmt.qmax)
        fitted = torch.from_numpy(params.blocks.codes[:, 0, start:start + w.shape[1]].astype(np.float32)).to(w.device)
        q = torch.where(step == 0, fitted, q)  # a zero-scale group keeps the quantizer's own codes
        return q.to(torch.uint8), step * (q - fmt.zero) + bias

    def fitted(self, params: BlockParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes llama.cpp's own quantizer chose when fitting (RTN), and their values."""
        fmt = get_format(self.qtype)
        q = torch.from_numpy(params.blocks.codes[:, 0].astype(np.float32)).to(params.step.device)
        groups = torch.arange(q.shape[1], device=q.device) // fmt.group_size
        bias = params.bias[:, groups] if params.bias is not None else 0.0
        return q.to(torch.uint8), params.step[:, groups] * (q - fmt.zero) + bias

    def layer_qparams(self, params: list[BlockParams], codes: torch.Tensor, g_idx: torch.Tensor) -> LayerQParams:
        """QuantLinear's parameters. Q4_0/Q5_0/Q8_0: d per block with the fixed zero (the GPTQ layout holds
        them; act-order g_idx passes through). Other types: per (sub-)group step, zero and bias, plus the raw
        blocks; their columns must sit in their own blocks (GPTQ act-order needs static groups here)."""
        fmt = get_format(self.qtype)
        if not (fmt.has_min or fmt.n_groups != 1):
            scales = torch.stack([p.step[:, 0] for p in params], 1)
            return LayerQParams(scales, torch.full_like(scales, float(fmt.zero)), g_idx)
        cols = codes.shape[1]
        own = torch.arange(cols, device=g_idx.device) // fmt.block_size
        if not torch.equal(g_idx.long(), own):
            raise SqueezeError(f"{self.qtype} blocks hold contiguous columns; these codes were fitted on permuted "
                               "groups (GPTQ act-order without static groups)")
        raw = torch.from_numpy(pack(self.blocks(params, codes)).reshape(codes.shape[0], -1))
        step = torch.cat([p.step for p in params], 1)
        bias = torch.cat([p.bias for p in params], 1) if params[0].bias is not None else None
        sub = (torch.arange(cols, device=g_idx.device) // fmt.group_size).to(torch.int32)
        return LayerQParams(step, torch.full_like(step, float(fmt.zero)), sub, bias, raw.to(codes.device))

    def blocks(self, params: list[BlockParams], codes: torch.Tensor) -> QuantizedBlocks:
        """The layer's blocks (rows, n_blocks, ...) with the calibrated ``codes`` [rows, cols] (original order)."""
        fmt = get_format(self.qtype)
        cat = lambda name: (None if getattr(params[0].blocks, name) is None  # noqa: E731
                            else np.concatenate([getattr(p.blocks, name) for p in params], axis=1))
        rows = codes.shape[0]
        qb = QuantizedBlocks(self.qtype, cat("codes"), cat("d"), cat("dmin"), cat("scales"), cat("mins"))
        return replace(qb, codes=codes.cpu().numpy().astype(np.uint8).reshape(rows, -1, fmt.block_size))
