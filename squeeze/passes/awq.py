"""AWQ: activation-aware per-input-channel scaling, then an optional weight-clipping search.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration" (2023), following AutoAWQ's search (scales
x_mean^r / w_mean^(1-r) over a grid of exponents r, then per-group clipping).
Both searches score candidates by the layers' output error on all
calibration tokens, computed exactly from each layer's input second moment
H = X^T X: ||X (Q - W)^T||^2 = tr((Q - W) H (Q - W)^T). Scales are folded
into the preceding op, so the float model is unchanged before rounding; the
weights are then rounded on the scheme's grid into the usual QuantLinear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.grid import WeightGrid, grid_for, quantize_rtn
from squeeze.model import linear_weight
from squeeze.passes.common import install_rounded, select_layers
from squeeze.passes.gptq_core import HessianAccumulator, check_shrink, output_rel_error, shrink_to_diagonal
from squeeze.passes.scaling import fold_scales, mappings_for, relative_names, resolve
from squeeze.precision import check_calib_precision
from squeeze.registry import register_pass
from squeeze.runner import BlockInputs, collect_inputs, groups_by_shared_input, run_sequential
from squeeze.scheme import GGUFMix, QuantScheme, get_scheme

# Layers whose clipping AutoAWQ skips: q/k errors are amplified by the attention softmax.
NO_CLIP_SUFFIXES = ("q_proj", "k_proj", "c_attn", "query", "key")


@dataclass(frozen=True)
class AWQ:
    """AWQ settings: ``n_grid`` exponents in [0, 1) for the scale search; ``clip`` enables the clipping search.

    ``token_cap`` bounds each calibration token's weight in the input statistics as for GPTQ
    (`squeeze.passes.gptq_core.cap_outlier_tokens`); None (default) counts every token as it is, as
    llama-imatrix does: with shrink 1 the searches use only the per-input energies (the diagonal), which the
    attention-sink tokens do not destabilise as they do GPTQ's full Hessian (measured, w4g128 64 x 512:
    37.90 capped at 100, 37.74 uncapped).
    ``shrink``: both searches score candidates on `shrink_to_diagonal` (H, shrink), trusting the calibration
    inputs' correlations only in part. Default 1 (the importance-weighted weight error, as llama.cpp's
    imatrix): on SmolLM2 calibrated on stories, scored on WikiText, w4g128 with 64 x 512 tokens, the full
    output error (0) recovers 2% of RTN's perplexity gap, the diagonal 12.5%.
    ``weighted_fit``: every candidate's grid (and the final one) is fitted for the importance-weighted error
    (`WeightGrid.fit` with the scaled layer's Hessian diagonal), so the identity candidate is llama.cpp-style
    weighted rounding and each scale is judged on the grid it will really get: 12.5% -> 40% there.
    ``clip`` (off by default): with the weighted fit and shrink 1 it repeats the fit's own range search on the
    same objective (measured: 37.95 with it, 37.90 without).
    ``calib_precision``: the arithmetic of the calibration forwards, as for GPTQ (`squeeze.precision`). Default
    float32: AWQ's time is its scale search, not its one forward pass per block, and its discrete scale
    choices moved with bfloat16 forwards (SmolLM2 w4g128, 128 x 512: 37.85 against 37.47 in float32).
    """

    scheme: QuantScheme | GGUFMix = field(default_factory=lambda: get_scheme("w4g128"))
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = False
    max_shrink: float = 0.5
    token_cap: float | None = None
    shrink: float = 1.0
    weighted_fit: bool = True
    device: str | None = None
    calib_precision: str = "float32"

    def __post_init__(self) -> None:
        check_shrink(self.shrink)
        check_calib_precision(self.calib_precision)
        if self.n_grid < 1:
            raise SqueezeError(f"AWQ n_grid must be at least 1, got {self.n_grid}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise SqueezeError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.scheme.activations is not None:
            raise SqueezeError("AWQ quantizes weights only; for int8 activations use --method smoothquant or rtn")


# ---- math -----------------------------------------------------------------------------


def weighted_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row output error tr over tokens of (X delta^T)^2, from H = X^T X: [rows].

    A 1-D ``hessian`` is a diagonal one (its diagonal alone): the importance-weighted squared error.
    """
    if hessian.dim() == 1:
        return delta.square() @ hessian
    return torch.einsum("ok,kl,ol->o", delta, hessian, delta)


def scoring_hessian(hessian: torch.Tensor, shrink: float) -> torch.Tensor:
    """What the searches score on: `shrink_to_diagonal` (H, shrink), kept as a vector when it is diagonal."""
    return torch.diagonal(hessian) if shrink == 1.0 else shrink_to_diagonal(hessian, shrink)


def _diagonal(hessian: torch.Tensor) -> torch.Tensor:
    return hessian if hessian.dim() == 1 else torch.diagonal(hessian)


def weight_mean(weights: list[torch.Tensor], group: int) -> torch.Tensor:
    """AutoAWQ's w_mean: |w| normalised by its group's absmax, averaged over all output rows: [in]."""
    w = torch.cat(weights).abs()
    rows, cols = w.shape
    if cols % group == 0:
        g = w.reshape(rows, cols // group, group)
        w = (g / (g.amax(dim=2, keepdim=True) + 1e-6)).reshape(rows, cols)
    else:
        w = w / (w.amax(dim=1, keepdim=True) + 1e-6)
    return w.mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int, duo: bool):
    """Identity first, then x_mean^r (/ w_mean^(1-r)) for r = 0, 1/n, ..., normalised to a geometric mean of ~1."""
    yield torch.ones_like(x_mean)
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if duo else x_mean.pow(r)
        s = s.clamp(min=1e-4)
        yield s / (s.max() * s.min()).sqrt()


def _scaled_loss(weights, hessians, grids, s: torch.Tensor, weighted_fit: bool) -> float:
    loss = 0.0
    for w, h, grid in zip(weights, hessians, grids):
        # the scaled layer sees x / s: its importance is diag(H) / s^2
        importance = _diagonal(h) / s.square() if weighted_fit else None
        q = quantize_rtn(grid, w * s, importance)[2] / s
        loss += float(weighted_error(q - w, h).sum())
    return loss


def search_scales(weights, hessians, x_mean, grids: list[WeightGrid], config: AWQ) -> tuple[torch.Tensor, float]:
    """The input-channel scales minimising the summed output error of ``weights`` (all fed the same input;
    each rounded on its own grid, as a GGUF mix may give q/k and v different types)."""
    w_mean = weight_mean(weights, grids[0].block_size(weights[0].shape[1]))
    best, best_loss = None, float("inf")
    for s in candidate_scales(x_mean, w_mean, config.n_grid, config.duo_scaling):
        loss = _scaled_loss(weights, hessians, grids, s, config.weighted_fit)
        if loss < best_loss:  # the first of equal losses: identity wins ties
            best, best_loss = s, loss
    return best, best_loss


def search_clip(w: torch.Tensor, hessian: torch.Tensor, grid: WeightGrid, max_shrink: float, n_grid: int,
                weighted_fit: bool = False) -> torch.Tensor:
    """``w`` with each (row, group) range shrunk by the ratio in [1 - max_shrink, 1] that minimises output error
    (each candidate's grid fitted with the Hessian diagonal as importance when ``weighted_fit``)."""
    size = grid.block_size(w.shape[1])
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid))] or [1.0]
    out = w.clone()
    for start in range(0, w.shape[1], size):
        wg = w[:, start : start + size]
        hg = hessian[start : start + size] if hessian.dim() == 1 else hessian[start : start + size, start : start + size]
        importance = _diagonal(hg) if weighted_fit else None
        lo, hi = wg.amin(dim=1, keepdim=True), wg.amax(dim=1, keepdim=True)
        best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
        for r in ratios:
            clipped = torch.maximum(torch.minimum(wg, hi * r), lo * r)
            _, q = grid.nearest(clipped, grid.fit(clipped, importance), 0)
            err = weighted_error(q - wg, hg)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            out[better, start : start + size] = clipped[better]
    return out


# ---- wiring ---------------------------------------------------------------------------


def _process_block(model: nn.Module, config: AWQ, mappings, schemes: dict[str, QuantScheme]):
    grids = {n: grid_for(s) for n, s in schemes.items()}

    def process(prefix: str, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> dict[str, dict]:
        device = inputs.hidden[0].device
        # layers fed the same input (q/k/v, gate/up) share one set of statistics, taken at the first of them
        leader = {n: g[0] for g in groups_by_shared_input(block, inputs, layers) for n in g}
        firsts = sorted(set(leader.values()), key=list(layers).index)
        acc = {n: HessianAccumulator(linear_weight(layers[n]).shape[1], device, config.token_cap) for n in firsts}
        abs_sum = {n: torch.zeros(linear_weight(layers[n]).shape[1], device=device) for n in firsts}

        def observe(name: str, x: torch.Tensor) -> None:
            acc[name].add(x)
            abs_sum[name] += x.detach().abs().reshape(-1, x.shape[-1]).float().sum(0)

        collect_inputs(block, inputs, {n: layers[n] for n in firsts}, observe)
        if inputs.dp is not None:
            for n in firsts:
                acc[n].combine(inputs.dp)
                inputs.dp.sum_(abs_sum[n])
        hessian = {n: acc[leader[n]].hessian for n in layers}
        count = {n: acc[leader[n]].count for n in layers}
        abs_sum = {n: abs_sum[leader[n]] for n in layers}
        names = relative_names(prefix, layers)
        plans = []  # search every mapping on the unscaled block first, then fold (as AutoAWQ)
        for mapping in mappings:
            found = resolve(block, mapping, names)
            if found is None:
                continue
            prev, full = found
            weights = [linear_weight(layers[n]).detach().float() for n in full]
            x_mean = abs_sum[full[0]] / max(count[full[0]], 1)
            searched = [scoring_hessian(hessian[n], config.shrink) for n in full]
            scales, _ = search_scales(weights, searched, x_mean, [grids[n] for n in full], config)
            plans.append((prev, full, scales, mapping.prev_part))
        for prev, full, scales, part in plans:
            fold_scales(prev, [layers[n] for n in full], scales, part)
            for n in full:  # the layer now sees x / s: H' = diag(1/s) H diag(1/s)
                inv = 1.0 / scales
                hessian[n] = hessian[n] * inv.unsqueeze(0) * inv.unsqueeze(1)
        records = {}
        for name, module in layers.items():
            w = linear_weight(module).detach().float()
            target = w
            if config.clip and not name.endswith(NO_CLIP_SUFFIXES):
                target = search_clip(w, scoring_hessian(hessian[name], config.shrink), grids[name],
                                     config.max_shrink, config.n_grid, config.weighted_fit)
            importance = torch.diagonal(hessian[name]) if config.weighted_fit else None
            rec, values = install_rounded(model, name, module, schemes[name], target, importance)
            rec["output_rel_mse"] = output_rel_error(w, values, hessian[name])
            records[name] = rec
        return records

    return process


def apply_awq(model: nn.Module, config: AWQ, calib=None, io=None) -> dict[str, dict]:
    layers, schemes = select_layers(model, config)
    mappings = mappings_for(model, "AWQ")
    process = _process_block(model, config, mappings, schemes)
    return run_sequential(model, layers, calib, process, config.device, desc="awq",
                          precision=config.calib_precision, io=io)


register_pass("awq", AWQ, apply_awq, lambda config: True)
