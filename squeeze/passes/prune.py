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
from squeeze.passes.prune_core import Pattern, magnitude_prune, sparsegpt_prune, sparsity_of, wanda_prune
from squeeze.precision import check_calib_precision
from squeeze.registry import register_pass
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
    decision; ``damp`` is a fraction of the Hessian's mean diagonal, as in GPTQ."""

    block_size: int = 128
    damp: float = 0.01
    calib_precision: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_calib_precision(self.calib_precision)
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
    """apply(model, config, calib): Hessians per group of layers, block by block, then ``prune_layer``."""

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
                    module = block_layers[name]
                    records[name] = _set_weight(module, prune_layer(linear_weight(module), acc.hessian, config))
            return records

        return run_sequential(model, layers, calib, process, desc=type(config).__name__.lower(),
                              precision=config.calib_precision, io=io)

    return apply


apply_wanda = _calibrated(lambda w, h, c: wanda_prune(w, h, c.pattern))
apply_sparsegpt = _calibrated(lambda w, h, c: sparsegpt_prune(w, h, c.pattern, c.block_size, c.damp))

register_pass("magnitude", Magnitude, apply_magnitude, lambda config: False)
register_pass("wanda", Wanda, apply_wanda, lambda config: True)
register_pass("sparsegpt", SparseGPT, apply_sparsegpt, lambda config: True)
