"""Weight-only int2/4/8 as ONNX Runtime's ``com.microsoft::MatMulNBits``, with squeeze's own integers.

The operator (onnxruntime docs/ContribOperators.md) computes ``Y = A @ dequant(B).T`` with
  B            uint8 [N, n_blocks, blob]  codes packed low bits first along K, blob = block_size*bits/8
  scales       [N * n_blocks]             in A's dtype
  zero_points  uint8 [N * ceil(n_blocks*bits/8)]  packed the same way, each row padded to whole bytes
  attributes   K, N, bits, block_size (a power of two >= 16), accuracy_level
and dequantizes ``(code - zero_point) * scale`` — squeeze's grid exactly, with block_size = group size.
A row whose K is not a multiple of the group size has a short last group (stories260K's down_proj:
K=172, group 32): its blob is padded with codes equal to that group's zero point, which dequantize to
exactly 0.0; A itself keeps K columns (ONNX Runtime takes K as is).
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.modules import QuantLinear
from squeeze.primitives import group_index

SUPPORTED_BITS = (2, 4, 8)
MIN_BLOCK_SIZE = 16


def _pack_low_first(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., m] (m a multiple of 8/bits) -> uint8 [..., m*bits/8], value i in bits (i%per)*bits.."""
    per = 8 // bits
    v = values.to(torch.int32).reshape(*values.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (v << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_low_first(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def pack_weight(codes: torch.Tensor, zeros: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Codes [N, K] -> B [N, n_blocks, block_size*bits/8]; a short last block is padded with its zero point."""
    n, k = codes.shape
    n_blocks = -(-k // block_size)
    pad = n_blocks * block_size - k
    if pad:
        filler = zeros[:, -1:].to(torch.uint8).expand(n, pad)
        codes = torch.cat([codes, filler], dim=1)
    return _pack_low_first(codes.reshape(n, n_blocks, block_size), bits)


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points [N, n_blocks] -> uint8 [N * ceil(n_blocks*bits/8)] (rows padded to whole bytes)."""
    n, n_blocks = zeros.shape
    per = 8 // bits
    padded = torch.zeros(n, -(-n_blocks // per) * per, dtype=torch.uint8)
    padded[:, :n_blocks] = zeros.to(torch.uint8)
    return _pack_low_first(padded, bits).reshape(-1)


def unpack_weight(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_weight`: B [N, n_blocks, blob] -> codes [N, K]."""
    return _unpack_low_first(packed, bits).reshape(packed.shape[0], -1)[:, :k]


def unpack_zero_points(packed: torch.Tensor, bits: int, n: int, n_blocks: int) -> torch.Tensor:
    return _unpack_low_first(packed.reshape(n, -1), bits)[:, :n_blocks]


def check_matmulnbits(layer: QuantLinear, name: str) -> None:
    """Raise (with how to fix it) if ``layer`` cannot be written as MatMulNBits exactly."""
    s = layer.scheme
    if layer.gguf_blocks is not None:
        raise SqueezeError(f"{name}: the {s.name} grid (GGUF blocks with sub-block scales or mins) has no "
                           "MatMulNBits form; export it with --to gguf, or quantize with q4_0 / w4g32 for ONNX")
    if s.granularity != "group":
        raise SqueezeError(f"{name}: MatMulNBits needs group-wise weights, the checkpoint is {s.granularity}-wise")
    if s.bits not in SUPPORTED_BITS:
        raise SqueezeError(f"{name}: MatMulNBits takes {SUPPORTED_BITS}-bit weights, not {s.bits}; "
                           "quantize with --bits 4")
    gs = s.group_size_for(layer.in_features)
    if gs < MIN_BLOCK_SIZE or gs & (gs - 1):
        raise SqueezeError(f"{name}: MatMulNBits block size must be a power of two >= 16, the group size is {gs}; "
                           "quantize with --group-size 32, 64 or 128")
    if not torch.equal(layer.g_idx.cpu().sort().values, group_index(layer.in_features, gs)):
        raise SqueezeError(f"{name}: its group index (g_idx) does not give every group {gs} columns, "
                           "which MatMulNBits needs; re-quantize with --group-size a power of two")


def input_permutation(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """None for ordered groups; for act-order (desc_act) g_idx, the column order that makes groups contiguous.

    MatMulNBits' blocks are contiguous runs of K; sorting the columns by group (stably) and gathering
    A's columns in the same order gives the same product with every group in one block.
    """
    k = g_idx.numel()
    if torch.equal(g_idx, group_index(k, group_size)):
        return None
    return torch.sort(g_idx.to(torch.int64), stable=True).indices


def traced_output(x: torch.Tensor, n: int) -> torch.Tensor:
    """What a lowered layer's forward returns while torch.onnx traces it: the right shape, no numbers.

    The trace keeps only the symbolic's node; computing the real product would dequantize the layer's
    weight inside the trace, and the trace holds such values until it ends (the whole model's weights
    in float). Numbers are checked afterwards, in onnxruntime against the torch reference.
    """
    return x.new_zeros(*x.shape[:-1], n)


class _MatMulNBitsFn(torch.autograd.Function):
    """Forward: the operator's semantics in torch (what tracing runs); symbolic: the ONNX node."""

    @staticmethod
    def forward(ctx, x, packed, scales, zero_points, k: int, n: int, bits: int, block_size: int):
        if torch.jit.is_tracing():
            return traced_output(x, n)
        n_blocks = packed.shape[1]
        codes = _unpack_low_first(packed, bits).reshape(n, -1)[:, :k].float()
        zeros = unpack_zero_points(zero_points, bits, n, n_blocks).float()
        idx = torch.arange(k) // block_size
        weight = (codes - zeros[:, idx]) * scales.reshape(n, n_blocks)[:, idx].float()
        return torch.matmul(x, weight.to(x.dtype).t())

    @staticmethod
    def symbolic(g, x, packed, scales, zero_points, k, n, bits, block_size):
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, zero_points,
                 K_i=k, N_i=n, bits_i=bits, block_size_i=block_size, accuracy_level_i=0)
        sizes = x.type().varyingSizes() if hasattr(x.type(), "varyingSizes") else None
        if sizes is not None:
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return y


class MatMulNBitsLinear(nn.Module):
    """Stands in for a QuantLinear during export; holds exactly the initializers the ONNX node gets."""

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__()
        bits, gs = layer.scheme.bits, layer.scheme.group_size_for(layer.in_features)
        self.k, self.n, self.bits, self.block_size = layer.in_features, layer.out_features, bits, gs
        zeros = layer.zeros.round().to(torch.uint8).cpu()
        perm = input_permutation(layer.g_idx.cpu(), gs)
        codes = layer.codes.cpu() if perm is None else layer.codes.cpu()[:, perm]
        self.register_buffer("input_perm", perm)
        self.register_buffer("packed_weight", pack_weight(codes, zeros, bits, gs))
        self.register_buffer("scales", layer.scales.detach().cpu().reshape(-1).to(dtype))
        self.register_buffer("zero_points", pack_zero_points(zeros, bits))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = torch.index_select(x, -1, self.input_perm)
        y = _MatMulNBitsFn.apply(x, self.packed_weight, self.scales, self.zero_points,
                                 self.k, self.n, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias
