"""Group-wise 4-bit symmetric weights as ONNX ``DequantizeLinear`` (opset 21, INT4, ``block_size``) -> MatMul.

This is the form TensorRT reads as INT4 weight-only quantization. What it takes, and where that is
written down:
  * TensorRT docs, "Quantization Schemes" (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
    quantized-types-schemes.html): INT4 is signed [-8, 7], dequantized as x_q * s, weight-only, with
    per-block scales; "the supported block sizes are {64, 128}"; the block dimension is one of the last two.
  * TensorRT operator docs, Dequantize (docs.nvidia.com/deeplearning/tensorrt/operators/docs/Dequantize.html):
    the scale is a build-time constant, 2-D for block quantization (INT4 only), float16/bfloat16/float32;
    a zero point is optional and must be all zeros.
  * NVIDIA TensorRT-Model-Optimizer's ONNX INT4 export (modelopt/onnx/quantization/int4.py, qdq_utils.py):
    the MatMul weight initializer [K, N] as INT4 without a zero point, ``DequantizeLinear(axis=0,
    block_size=B)`` with scales [K/B, N], feeding MatMul directly (no Transpose).
  * ONNX DequantizeLinear-21: blocked scales have the input's rank with ceil(D_axis / block_size) blocks,
    so a short last group (stories260K's down_proj, K=172) is simply a short block.

squeeze's symmetric 4-bit grid is codes 0..15 with zero point 8, so the signed int4 ``code - 8`` with
zero point 0 is the same number; squeeze's fp16 scales are written as they are. Asymmetric grids (a
zero point per group), act-order column orders and GGUF block layers have no such form and are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.exporters.onnx.matmulnbits import traced_output
from squeeze.modules import QuantLinear
from squeeze.primitives import group_index
from squeeze.scheme import QuantScheme

DQ_BLOCK_OPSET = 21  # first DequantizeLinear with INT4 inputs and the block_size attribute
SYMMETRIC_ZERO_POINT = 8  # squeeze's symmetric 4-bit grid: codes 0..15, zero point 2^(4-1)
INT4_RANGE = (-8, 7)


def check_int4_scheme(scheme: QuantScheme, name: str, block_sizes: tuple[int, ...] | None = None) -> None:
    """Raise (with how to fix it) if layers on ``scheme`` cannot be blocked INT4 DequantizeLinear exactly.

    ``block_sizes``: the group sizes a consumer accepts (TensorRT: 64, 128); None accepts any.
    """
    fix = f"re-quantize with --scheme w4g{max(block_sizes) if block_sizes else 128}"
    if scheme.gguf_blocks:
        raise SqueezeError(f"{name}: the {scheme.name} grid (GGUF blocks with sub-block scales or mins) has no "
                           f"INT4 DequantizeLinear form; export it with --to gguf, or {fix}")
    if scheme.bits != 4 or scheme.granularity != "group":
        raise SqueezeError(f"{name}: INT4 DequantizeLinear takes group-wise 4-bit weights, the layer is "
                           f"{scheme.name}; {fix}")
    if not scheme.symmetric:
        raise SqueezeError(f"{name}: INT4 DequantizeLinear has no zero point (TensorRT takes zero point 0 only), "
                           f"and {scheme.name} is asymmetric; {fix} (symmetric)")
    if block_sizes is not None and scheme.group_size not in block_sizes:
        sizes = " or ".join(str(b) for b in block_sizes)
        raise SqueezeError(f"{name}: TensorRT's INT4 block size must be {sizes}, the group size is "
                           f"{scheme.group_size} ({scheme.name}); {fix} or --scheme w4g64")


def check_dq_block(layer: QuantLinear, name: str) -> None:
    """Raise (with how to fix it) if ``layer`` cannot be written as INT4 DequantizeLinear -> MatMul exactly."""
    check_int4_scheme(layer.scheme, name)  # GGUF block layers have gguf_blocks schemes: refused there
    gs = layer.scheme.group_size_for(layer.in_features)
    if not torch.equal(layer.g_idx.cpu(), group_index(layer.in_features, gs)):
        raise SqueezeError(f"{name}: its groups are not contiguous runs of {gs} columns (act-order g_idx), which "
                           "blocked DequantizeLinear needs; re-quantize without --act-order (or with --static-groups)")
    if not bool((layer.zeros == SYMMETRIC_ZERO_POINT).all()):
        raise SqueezeError(f"{name}: a symmetric 4-bit layer must have zero point {SYMMETRIC_ZERO_POINT} everywhere; "
                           "the checkpoint is inconsistent, re-quantize it")


def int4_weight(layer: QuantLinear) -> torch.Tensor:
    """Signed int4 values ``code - 8`` as int8 [K, N] (MatMul's weight layout)."""
    return (layer.codes.cpu().to(torch.int16) - SYMMETRIC_ZERO_POINT).to(torch.int8).t().contiguous()


class _BlockDequantMatMulFn(torch.autograd.Function):
    """Forward: the graph's numbers in torch (what tracing runs); symbolic: DequantizeLinear -> MatMul."""

    @staticmethod
    def forward(ctx, x, weight, scales, block_size: int):
        if torch.jit.is_tracing():
            return traced_output(x, weight.shape[1])
        k = weight.shape[0]
        per_row = scales.repeat_interleave(block_size, dim=0)[:k]
        return torch.matmul(x, (weight.to(scales.dtype) * per_row).to(x.dtype))

    @staticmethod
    def symbolic(g, x, weight, scales, block_size):
        w = g.op("DequantizeLinear", weight, scales, axis_i=0, block_size_i=block_size)
        return g.op("MatMul", x, w)


class DQBlockLinear(nn.Module):
    """Stands in for a 4-bit symmetric QuantLinear during export; its buffers become the graph's initializers.

    ``weight_q`` is traced as int8 and written as an INT4 initializer by `weights.write_model`
    (torch has no int4 dtype); ``weight_scale`` holds squeeze's scales, one row per block of K.
    """

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.block_size = layer.scheme.group_size_for(layer.in_features)
        self.register_buffer("weight_q", int4_weight(layer))
        self.register_buffer("weight_scale", layer.scales.detach().cpu().t().contiguous().to(dtype))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _BlockDequantMatMulFn.apply(x, self.weight_q, self.weight_scale, self.block_size)
        return y if self.bias is None else y + self.bias


def pack_int4_pairs(values) -> bytes:
    """Signed int4 values (an int8 numpy vector) -> ONNX's INT4 bytes: two per byte, the first in the low nibble."""
    import numpy as np

    nibbles = (values.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
