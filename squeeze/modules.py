"""QuantLinear: a Linear layer holding integer codes and per-group qparams.

value = scales * (code - zeros) per group (g_idx), plus ``offsets`` (per-group block mins) for GGUF
grids with mins; layers on such GGUF grids also keep their raw blocks (``gguf_blocks``) so checkpoints
and the GGUF exporter carry the exact bytes. On a lookup-table grid (``lut``) value = lut[row, code].

Its forward dequantizes on the fly (simulated quantization for evaluation);
the same codes are what the checkpoint packs, so a saved and reloaded model
computes exactly the same logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from squeeze.primitives import dequantize, fake_quant_activation, group_index
from squeeze.scheme import QuantScheme


class QuantLinear(nn.Module):
    """y = act_q(x) @ dequant(codes).T + bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        n_groups: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.compute_dtype = dtype
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        # Static activation scale (a scalar), set once calibrated; None otherwise.
        self.register_buffer("input_scale", None)
        # Its uint8 zero point (a scalar) for asymmetric activations; None for symmetric int8.
        self.register_buffer("input_zero_point", None)
        self.register_buffer("offsets", None)  # float32 [out, n_groups] for GGUF grids with block mins
        self.register_buffer("gguf_blocks", None)  # uint8 [out, bytes per row]: the layer as GGUF blocks
        self.register_buffer("lut", None)  # float32 [out, 2^bits]: each row's table on a lookup-table grid
        self._weight_cache: dict | None = None  # set inside `dequantize_once`

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        scheme: QuantScheme,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        offsets: torch.Tensor | None = None,
        gguf_blocks: torch.Tensor | None = None,
        lut: torch.Tensor | None = None,
    ) -> "QuantLinear":
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, scheme, scales.shape[1], bias is not None, dtype)
        layer.codes.copy_(codes)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        layer.g_idx.copy_(g_idx)
        if offsets is not None:
            layer.offsets = offsets.detach().float().clone()
        if gguf_blocks is not None:
            layer.gguf_blocks = gguf_blocks.detach().to(torch.uint8).clone()
        if lut is not None:
            layer.lut = lut.detach().float().clone()
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer.to(codes.device)

    def has_ordered_groups(self) -> bool:
        """Whether every group is a run of consecutive input columns (not GPTQ act-order's permuted g_idx)."""
        expected = group_index(self.in_features, self.scheme.group_size_for(self.in_features))
        return torch.equal(self.g_idx.cpu(), expected)

    def float32_weight(self) -> torch.Tensor:
        """The weight the codes stand for, in float32 (before the cast to the compute dtype)."""
        if self.lut is not None:
            return self.lut.gather(1, self.codes.long())
        w = dequantize(self.codes, self.scales, self.zeros, self.g_idx, torch.float32)
        return w if self.offsets is None else w + self.offsets[:, self.g_idx.long()]

    def dequantized_weight(self) -> torch.Tensor:
        return self.float32_weight().to(self.compute_dtype)

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self._weight_cache is None:
            return self.dequantized_weight().to(dtype)
        if dtype not in self._weight_cache:
            self._weight_cache[dtype] = self.dequantized_weight().to(dtype)
        return self._weight_cache[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.scheme.activations
        if acts is not None:
            x = fake_quant_activation(x, acts, self.input_scale, self.input_zero_point)
        return nn.functional.linear(x, self._weight_for(x.dtype), self.bias)

    def float_linear(self) -> nn.Linear:
        """An nn.Linear holding the float32 values of the codes (and the bias): what float graphs are built from."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.float32_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias.float())
        return linear.eval()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


@contextmanager
def dequantize_once(module: nn.Module) -> Iterator[None]:
    """Inside, each QuantLinear of ``module`` dequantizes its weight once instead of on every call (a
    calibration pass runs a block on many batches); the float copies are dropped on exit. The layers must not
    change inside (the runner enters it per pass)."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer._weight_cache = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._weight_cache = None
