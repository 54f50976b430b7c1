"""Pruning passes: magnitude, Wanda and SparseGPT, unstructured (``sparsity``) or N:M (``mask="2:4"``).

    squeeze.prune(model, Wanda(sparsity=0.5), calib)
    squeeze.prune(model, SparseGPT(mask="2:4"), calib)

Weights become zeros in place; shapes stay. Wanda and SparseGPT run block by block through the sequential
runner like GPTQ (each group of layers sharing an input sees inputs that passed the already-pruned groups
before it), with the same Hessian statistics; magnitude needs no data. The math is in `prune_core`.
Zeros alone make a model neither smaller nor faster in any runtime squeeze exports to: see README.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from squeeze.errors import SqueezeError
from squeeze.model import linear_weight, select_linears
from squeeze.passes.gptq_core import HessianAccumulator
from squeeze.passes.prune_core import (Pattern, magnitude_prune, sparsegpt_mask, sparsegpt_prune, sparsity_of,
                                       wanda_prune)
from squeeze.precision import check_calib_precision
from squeeze.registry import register_pass
from squeeze.scheme import GGUFMix, QuantScheme
from squeeze.runner import BlockInputs, collect_inputs, groups_by_shared_input, run_blockwise, run_sequential


@dataclass(frozen=True)
class _PruneConfig:
    sparsity: float | None = None  # share of zeros, 0..0.9
    mask: str | None = None  # "N:M": N of every M consecutive inputs kept
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.pattern  # noqa: B018 -- validates sparsity / mask

    @property
    def pattern(self) -> Pattern:
        if self.mask is not None:
            if self.sparsity is not None:
                raise SqueezeError("give either --sparsity or --mask, not both")
            return Pattern.parse_mask(self.mask)
        return Pattern(sparsity=self.sparsity if self.sparsity is not None else 0.5)

    @property
    def label(self) -> str:
        """What the records call the pattern ("0.5", "2:4")."""
        return self.pattern.name


@dataclass(frozen=True)
class Magnitude(_PruneConfig):
    """Zero the smallest |W| of each layer (no calibration data): the baseline."""


@dataclass(frozen=True)
class Wanda(_PruneConfig):
    """Zero the lowest |W_ij| * ||X_j|| of each output row (Sun et al. 2023); no weight update."""

    calib_precision: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_calib_precision(self.calib_precision)


@dataclass(frozen=True)
class SparseGPT(_PruneConfig):
    """Mask and update with the inverse Hessian (Frantar & Alistarh 2023): ``block_size`` columns share a mask
    decision; ``damp`` is a fraction of the Hessian's mean diagonal, as in GPTQ. With a ``scheme`` the kept
    weights are quantized onto its grid in the same sweep (prune and quantize jointly, GPTQ's solver)."""

    block_size: int = 128
    damp: float = 0.01
    calib_precision: str = "auto"
    scheme: QuantScheme | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_calib_precision(self.calib_precision)
        if self.scheme is not None and isinstance(self.scheme, GGUFMix):
            raise SqueezeError("SparseGPT quantizes jointly onto one grid; give a scheme such as w4g128 or q4_k, "
                               "not a GGUF mix")
        if self.block_size <= 0:
            raise SqueezeError(f"SparseGPT block_size must be a positive integer, got {self.block_size}")
        if not 0.0 < self.damp < 1.0:
            raise SqueezeError(f"SparseGPT damp must be in (0, 1), got {self.damp}")


def _select(model: nn.Module, config: _PruneConfig) -> dict[str, nn.Module]:
    layers = select_linears(model, config.targets, config.ignore)
    if not layers:
        raise SqueezeError("no linear layers match --targets/--ignore; nothing to prune")
    for name, layer in layers.items():
        config.pattern.check_columns(linear_weight(layer).shape[1], name)
    return layers


def _set_weight(module: nn.Module, pruned: torch.Tensor) -> dict:
    weight = linear_weight(module)
    before = weight.detach().float()
    err = float((pruned - before).pow(2).sum() / before.pow(2).sum().clamp(min=1e-30))
    # Conv1D (GPT-2) stores [in, out]; linear_weight gives [out, in] either way
    target = module.weight
    target.data.copy_(pruned.t() if target.shape != pruned.shape else pruned)
    return {"sparsity": sparsity_of(pruned), "weight_rel_mse": err}


def apply_magnitude(model: nn.Module, config: Magnitude, calib=None, io=None) -> dict[str, dict]:
    """``io`` (a streamed model): block by block."""
    layers = _select(model, config)
    if io is None:
        return {name: _set_weight(m, magnitude_prune(linear_weight(m), config.pattern))
                for name, m in tqdm(layers.items(), desc="magnitude", unit="layer", leave=False)}

    def process(prefix, block, block_layers, inputs):
        return {name: _set_weight(m, magnitude_prune(linear_weight(m), config.pattern)) for name, m in block_layers.items()}

    return run_blockwise(model, layers, process, io, desc="magnitude")


def _calibrated(prune_layer):
    """apply(model, config, calib): Hessians per group of layers, block by block, then
    ``prune_layer(model, name, module, hessian, config)`` -> the layer's record."""

    def apply(model: nn.Module, config, calib=None, io=None) -> dict[str, dict]:
        layers = _select(model, config)

        def process(prefix: str, block: nn.Module, block_layers: dict[str, nn.Module], inputs: BlockInputs):
            records = {}
            for group in groups_by_shared_input(block, inputs, block_layers):
                device = inputs.hidden[0].device
                acc = HessianAccumulator(linear_weight(block_layers[group[0]]).shape[1], device, None)
                collect_inputs(block, inputs, {group[0]: block_layers[group[0]]}, lambda n, x: acc.add(x))
                acc.combine(inputs.dp)
                for name in group:
                    records[name] = prune_layer(model, name, block_layers[name], acc.hessian, config)
            return records

        return run_sequential(model, layers, calib, process, desc=type(config).__name__.lower(),
                              precision=config.calib_precision, io=io)

    return apply


def _joint(model: nn.Module, name: str, module: nn.Module, hessian: torch.Tensor, config: SparseGPT) -> dict:
    """SparseGPT's masks chosen inside GPTQ's sweep onto ``config.scheme``'s grid; the QuantLinear installed."""
    from squeeze.grid import grid_for
    from squeeze.passes.gptq import install
    from squeeze.passes.gptq_core import gptq_quantize

    grid, pattern = grid_for(config.scheme), config.pattern
    cols = linear_weight(module).shape[1]
    group = grid.block_size(cols)
    batch = cols if group >= cols else -(-config.block_size // group) * group
    if pattern.n is not None and batch % pattern.m:
        raise SqueezeError(f"{name}: {pattern.name} groups do not line up with batches of {batch} columns; "
                           "use a group size that is a multiple of M")
    result = gptq_quantize(linear_weight(module), hessian, grid, block_size=config.block_size, damp=config.damp,
                           choose_mask=sparsegpt_mask(pattern), mask_span=pattern.m)
    return {**install(model, name, module, result, hessian, config.scheme), "sparsity": sparsity_of(result.values)}


def _sparsegpt_layer(model, name, module, hessian, config: SparseGPT) -> dict:
    if config.scheme is not None:
        return _joint(model, name, module, hessian, config)
    return _set_weight(module, sparsegpt_prune(linear_weight(module), hessian, config.pattern, config.block_size,
                                               config.damp))


apply_wanda = _calibrated(lambda model, name, module, h, c: _set_weight(module, wanda_prune(linear_weight(module),
                                                                                           h, c.pattern)))
apply_sparsegpt = _calibrated(_sparsegpt_layer)

register_pass("magnitude", Magnitude, apply_magnitude, lambda config: False)
register_pass("wanda", Wanda, apply_wanda, lambda config: True)
register_pass("sparsegpt", SparseGPT, apply_sparsegpt, lambda config: True)
