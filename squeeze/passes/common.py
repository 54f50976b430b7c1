"""Wiring shared by the weight-quantization passes: swap a Linear for a QuantLinear."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from squeeze.model import linear_weight, select_linears, set_submodule
from squeeze.modules import QuantLinear
from squeeze.grid import LayerQParams, grid_for, quantize_rtn
from squeeze.primitives import group_index
from squeeze.scheme import GGUFMix, QuantScheme, gguf_scheme


class Rounded(NamedTuple):
    codes: torch.Tensor  # uint8 [out, in]
    qparams: LayerQParams  # scales, zeros, g_idx (+ offsets and raw blocks on GGUF grids with mins)
    values: torch.Tensor  # float32 [out, in]: what the codes dequantize to


def rtn_codes(weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None) -> Rounded:
    """Round-to-nearest codes, layer parameters and values for a [out, in] weight, on the scheme's grid.

    The grid is ``grid_for(scheme)``, as GPTQ and AWQ use: a GGUF-named scheme (q4_0, q4_k, ...) fits its
    blocks as llama.cpp does; ``importance`` [in] makes every fit importance-weighted (`WeightGrid.fit`).
    """
    grid = grid_for(scheme)
    codes, params, values = quantize_rtn(grid, weight, importance)
    g_idx = group_index(weight.shape[1], grid.block_size(weight.shape[1]), weight.device)
    return Rounded(codes, grid.layer_qparams(params, codes, g_idx), values)


def install_rounded(model: nn.Module, name: str, module: nn.Module, scheme: QuantScheme, weight: torch.Tensor,
                    importance: torch.Tensor | None = None):
    """Round ``weight`` (the layer's own, or a clipped/scaled copy) to the grid and install the QuantLinear.

    Returns the layer's error record and the rounded values.
    """
    r = rtn_codes(weight, scheme, importance)
    return replace_with_quant_linear(model, name, module, scheme, r.codes, r.qparams), r.values


def replace_with_quant_linear(
    model: nn.Module, name: str, module: nn.Module, scheme: QuantScheme, codes: torch.Tensor, qp: LayerQParams
) -> dict:
    """Install a QuantLinear in place of ``module``; returns the layer's error record."""
    weight = linear_weight(module).detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    layer = QuantLinear.from_codes(codes, qp.scales, qp.zeros, qp.g_idx, scheme, bias, weight.dtype,
                                   offsets=qp.offsets, gguf_blocks=qp.blocks, lut=qp.lut)
    err = (layer.dequantized_weight().float() - weight.float()).pow(2).sum()
    set_submodule(model, name, layer)
    return {"weight_rel_mse": float(err / weight.float().pow(2).sum().clamp(min=1e-30))}


def select_layers(model: nn.Module, config) -> tuple[dict[str, nn.Module], dict[str, QuantScheme]]:
    """The pass's target Linears and each one's grid (a GGUF mix drops the layers it keeps float)."""
    layers = select_linears(model, config.targets, config.ignore)
    schemes = layer_schemes(model, layers, config.scheme)
    return {n: m for n, m in layers.items() if n in schemes}, schemes


def layer_schemes(model: nn.Module, layers: dict[str, nn.Module], scheme) -> dict[str, QuantScheme]:
    """The grid of each layer: ``scheme`` for all, or per layer for a GGUF mix (layers it keeps float drop out)."""
    if isinstance(scheme, GGUFMix):
        from squeeze.exporters.gguf.mixes import layer_types

        types = layer_types(model, list(layers), scheme.mix)
        return {n: gguf_scheme(t) for n, t in types.items() if t is not None}
    return {n: scheme for n in layers}
