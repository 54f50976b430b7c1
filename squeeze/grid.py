"""The weight grid as an argument: what calibrated algorithms (GPTQ, AWQ) ask of a bit format.

A grid fits its parameters on a block of columns of a weight (one quantization
group for integer schemes; later a 32-wide legacy block or a 256-wide K-quant
super-block for GGUF types, whose sub-block scales are fitted together) and
answers "nearest representable value" for any columns inside that block. GPTQ
walks the columns one at a time and asks the grid at every step, so it never
knows whether it is rounding onto int4 or onto a Q4_K super-block.

`IntGrid` implements the protocol for a `QuantScheme` with the same math as
`primitives` (so GPTQ/AWQ codes go straight into `QuantLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from squeeze.errors import SqueezeError
from squeeze.primitives import qparams_from_range
from squeeze.scheme import QuantScheme


class WeightGrid(Protocol):
    """A bit format as seen by a calibrated quantizer.

    A grid whose ``fit`` already rounds (a GGUF block quantizer) may also define
    ``fitted(params) -> (codes, values)``; RTN then keeps exactly those codes.
    """

    def block_size(self, in_features: int) -> int:
        """Columns whose parameters are fitted together (a group, or a super-block)."""
        ...

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Any:
        """Grid parameters for one block of columns ``w`` [rows, block_size(in)] (float32).

        ``importance`` [block columns] weighs each column's squared error (the diagonal of the input
        Hessian, as llama.cpp's imatrix): a grid may use it to choose its parameters; None = plain fit.
        """
        ...

    def nearest(self, w: torch.Tensor, params: Any, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (uint8) and values (float32) nearest to ``w`` [rows, k], columns start..start+k of the block."""
        ...

    def layer_qparams(self, params: list, codes: torch.Tensor, g_idx: torch.Tensor) -> LayerQParams:
        """The whole layer's parameters (``params`` per block, ``g_idx`` the block of each column)."""
        ...


class LayerQParams(NamedTuple):
    """A layer's grid as QuantLinear holds it: value = scales * (code - zeros) [+ offsets], per group.

    ``blocks`` are the raw GGUF bytes (uint8 [rows, bytes per row]) for grids a GPTQ-layout checkpoint
    cannot hold (block mins, quantized sub-block scales); ``offsets`` the per-group additive term (the
    block mins) of such grids. ``lut`` [rows, 2^bits] is a lookup-table grid's table per row: value =
    lut[row, code] (scales 1 and zeros 0 then stand for nothing).
    """

    scales: torch.Tensor  # [rows, n_groups]
    zeros: torch.Tensor  # [rows, n_groups]
    g_idx: torch.Tensor  # int32 [cols]
    offsets: torch.Tensor | None = None  # [rows, n_groups]
    blocks: torch.Tensor | None = None  # uint8 [rows, bytes per row]
    lut: torch.Tensor | None = None  # float32 [rows, entries]


@dataclass(frozen=True)
class IntParams:
    """Per-row scale and zero point of one group: value = scale * (code - zero)."""

    scale: torch.Tensor  # [rows]
    zero: torch.Tensor  # [rows]


# Range shrink factors tried by an importance-weighted fit: 1.0 (min-max) down to 0.525 in steps of 0.025.
SHRINK_RATIOS = tuple(1.0 - i / 40 for i in range(20))
FIT_CHUNK_ELEMENTS = 1 << 24  # candidates x rows x columns evaluated at once by a weighted fit


@dataclass(frozen=True)
class IntGrid:
    """The integer grid of a `QuantScheme` (per-tensor, per-channel or per-group, sym or asym)."""

    scheme: QuantScheme

    def block_size(self, in_features: int) -> int:
        return self.scheme.group_size_for(in_features)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> IntParams:
        """Min-max parameters; with ``importance``, each row's range is shrunk by the factor in
        SHRINK_RATIOS that minimises sum_j importance_j * (w_j - q(w_j))^2 (per-tensor grids keep min-max)."""
        w = w.float()
        if self.scheme.granularity == "tensor":
            wmin, wmax = w.min().expand(w.shape[0]), w.max().expand(w.shape[0])
        else:
            wmin, wmax = w.amin(dim=1), w.amax(dim=1)
        scale, zero = qparams_from_range(wmin, wmax, self.scheme.bits, self.scheme.symmetric)
        if importance is None or self.scheme.granularity == "tensor":
            return IntParams(scale, zero)
        ratios = torch.tensor(SHRINK_RATIOS, device=w.device).unsqueeze(1)  # [R, 1]
        imp = importance.float().to(w.device)
        scale, zero = scale.clone(), zero.clone()  # filled row chunk by row chunk below
        step = max(1, FIT_CHUNK_ELEMENTS // (len(SHRINK_RATIOS) * w.shape[1]))
        for r0 in range(0, w.shape[0], step):  # all ratios at once, a bounded number of rows at a time
            rows = slice(r0, r0 + step)
            s, z = qparams_from_range(wmin[rows] * ratios, wmax[rows] * ratios, self.scheme.bits, self.scheme.symmetric)
            s3, z3 = s.unsqueeze(2), z.unsqueeze(2)
            d = torch.div(w[rows], s3).round_().add_(z3).clamp_(0, self.scheme.maxq)  # codes, [R, rows, g]
            err = d.sub_(z3).mul_(s3).sub_(w[rows]).square_().mul_(imp).sum(dim=2)  # [R, rows], in place
            pick = err.argmin(dim=0, keepdim=True)  # the first of equal errors: min-max wins ties
            scale[rows], zero[rows] = s.gather(0, pick)[0], z.gather(0, pick)[0]
        return IntParams(scale, zero)

    def nearest(self, w: torch.Tensor, params: IntParams, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = params.scale.unsqueeze(1), params.zero.unsqueeze(1)
        q = (torch.round(w.float() / s) + z).clamp(0, self.scheme.maxq)
        return q.to(torch.uint8), (q - z) * s

    def layer_qparams(self, params: list[IntParams], codes: torch.Tensor, g_idx: torch.Tensor) -> LayerQParams:
        """Stack per-group parameters (group order) into QuantLinear's scales/zeros [rows, n_groups]."""
        return LayerQParams(torch.stack([p.scale for p in params], 1), torch.stack([p.zero for p in params], 1), g_idx)


def grid_for(scheme: QuantScheme) -> WeightGrid:
    """The grid a calibrated pass rounds onto for ``scheme``."""
    if not isinstance(scheme, QuantScheme):
        raise SqueezeError(f"expected a QuantScheme, got {type(scheme).__name__}; build one with squeeze.get_scheme")
    if scheme.gguf is not None:  # llama.cpp's exact block grid (squeeze.exporters.gguf.grid)
        from squeeze.exporters.gguf.grid import GGUFGrid

        return GGUFGrid(scheme.gguf.upper())
    if scheme.lut_channels is not None:  # a lookup table per group of rows (squeeze.palette)
        from squeeze.palette import LutGrid

        return LutGrid(scheme)
    return IntGrid(scheme)


def quantize_rtn(grid: WeightGrid, w: torch.Tensor, importance: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Round every block of ``w`` [rows, in] to its nearest grid point: (codes, params per block, values).

    ``importance`` [in] (a Hessian diagonal) is handed to each block's fit (`WeightGrid.fit`); None = plain fit.
    """
    w = w.float()
    size = grid.block_size(w.shape[1])
    codes, values, params = torch.empty(w.shape, dtype=torch.uint8, device=w.device), torch.empty_like(w), []
    for start in range(0, w.shape[1], size):
        block = w[:, start : start + size]
        p = grid.fit(block, None if importance is None else importance[start : start + size])
        # A grid whose fit already rounds (a GGUF block quantizer) keeps its own codes, ties included.
        fitted = getattr(grid, "fitted", None)
        codes[:, start : start + size], values[:, start : start + size] = fitted(p) if fitted else grid.nearest(block, p, 0)
        params.append(p)
    return codes, params, values
