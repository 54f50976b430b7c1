"""Wiring shared by the weight-quantization passes: swap a Linear for a QuantLinear."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from squeeze.model import linear_weight, set_submodule
from squeeze.modules import QuantLinear
from squeeze.grid import grid_for, quantize_rtn
from squeeze.primitives import dequantize, group_index
from squeeze.scheme import QuantScheme


class Rounded(NamedTuple):
    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor  # [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    values: torch.Tensor  # float32 [out, in]: what the codes dequantize to


def rtn_codes(weight: torch.Tensor, scheme: QuantScheme) -> Rounded:
    """Round-to-nearest codes, scales, zeros, g_idx and values for a [out, in] weight, on the scheme's grid.

    The grid is ``grid_for(scheme)``, as GPTQ and AWQ use: a GGUF-named scheme (q4_0, ...) fits its
    blocks as llama.cpp does.
    """
    grid = grid_for(scheme)
    codes, params, values = quantize_rtn(grid, weight)
    scales, zeros = grid.layer_qparams(params)
    g_idx = group_index(weight.shape[1], grid.block_size(weight.shape[1]), weight.device)
    return Rounded(codes, scales, zeros, g_idx, values)


def install_rounded(model: nn.Module, name: str, module: nn.Module, scheme: QuantScheme, weight: torch.Tensor):
    """Round ``weight`` (the layer's own, or a clipped/scaled copy) to the grid and install the QuantLinear.

    Returns the layer's error record and the rounded values.
    """
    r = rtn_codes(weight, scheme)
    return replace_with_quant_linear(model, name, module, scheme, r.codes, r.scales, r.zeros, r.g_idx), r.values


def replace_with_quant_linear(
    model: nn.Module, name: str, module: nn.Module, scheme: QuantScheme, codes, scales, zeros, g_idx
) -> dict:
    """Install a QuantLinear in place of ``module``; returns the layer's error record."""
    weight = linear_weight(module).detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, scheme, bias, weight.dtype)
    err = (dequantize(codes, scales, zeros, g_idx) - weight.float()).pow(2).sum()
    set_submodule(model, name, layer)
    return {"weight_rel_mse": float(err / weight.float().pow(2).sum().clamp(min=1e-30))}
