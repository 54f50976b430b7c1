"""Pruning passes: magnitude, Wanda and SparseGPT, unstructured (``sparsity``) or N:M (``mask="2:4"``).

    squeeze.prune(model, Wanda(sparsity=0.5), calib)
    squeeze.prune(model, SparseGPT(mask="2:4"), calib)

Weights become zeros in place; shapes stay. Wanda and SparseGPT run block by block through the sequential
runner like GPTQ (each group of layers sharing an input sees inputs that passed the already-pruned groups
before it), with the same Hessian statistics; magnitude needs no data. The math is in `prune_core`.
Zeros alone make a model neither smaller nor faster in any runtime squeeze exports to: see README.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from squeeze.errors import SqueezeError
from squeeze.model import linear_weight, select_linears
from squeeze.passes.gptq_core import HessianAccumulator
from squeeze.passes.prune_core import (Pattern, magnitude_prune, outlier_share, owl_sparsities, sparsegpt_mask,
                                       sparsegpt_prune, sparsity_of, wanda_prune)
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
        """What the records call the pattern ("0.5", "2:4", "0.5 owl0.08")."""
        owl = getattr(self, "owl", None)
        return self.pattern.name + (f" owl{owl:g}" if owl else "")


def check_owl(config) -> None:
    """OWL's options (``owl``: the spread of per-block sparsities; ``owl_threshold``: OWL's M) are sane."""
    if config.owl is None:
        return
    if config.mask is not None:
        raise SqueezeError("--owl sets a sparsity per block; it does not apply to N:M masks (use --sparsity)")
    if not 0.0 < config.owl < 0.5:
        raise SqueezeError(f"--owl is the spread of per-block sparsities around the target, in (0, 0.5); got "
                           f"{config.owl}")
    if config.owl_threshold <= 1.0:
        raise SqueezeError(f"owl_threshold (OWL's M: outliers are scores above M x the mean) must exceed 1, "
                           f"got {config.owl_threshold}")


@dataclass(frozen=True)
class Magnitude(_PruneConfig):
    """Zero the smallest |W| of each layer (no calibration data): the baseline."""


@dataclass(frozen=True)
class Wanda(_PruneConfig):
    """Zero the lowest |W_ij| * ||X_j|| of each output row (Sun et al. 2023); no weight update. ``owl``: per-block
    sparsities from the blocks' outlier shares, spread by that much around the target (OWL; 0.08 in the paper)."""

    calib_precision: str = "auto"
    owl: float | None = None
    owl_threshold: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_calib_precision(self.calib_precision)
        check_owl(self)


@dataclass(frozen=True)
class SparseGPT(_PruneConfig):
    """Mask and update with the inverse Hessian (Frantar & Alistarh 2023): ``block_size`` columns share a mask
    decision; ``damp`` is a fraction of the Hessian's mean diagonal, as in GPTQ. With a ``scheme`` the kept
    weights are quantized onto its grid in the same sweep (prune and quantize jointly, GPTQ's solver)."""

    block_size: int = 128
    damp: float = 0.01
    calib_precision: str = "auto"
    scheme: QuantScheme | None = None
    owl: float | None = None
    owl_threshold: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_calib_precision(self.calib_precision)
        check_owl(self)
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


class _Untouched:
    """A `squeeze.runner.BlockIO` seen through a pass that changes nothing: blocks are read and freed, and no
    block is recorded as done."""

    def __init__(self, io):
        self.io, self.dp = io, getattr(io, "dp", None)

    def finished(self, index: int) -> bool:
        return False

    def load(self, index: int, block: nn.Module, finished: bool) -> None:
        self.io.load(index, block, finished=False)

    def done(self, index: int, prefix: str, block: nn.Module, records) -> None:
        self.io.done(index, prefix, block, None)

    def outside_blocks(self):
        return self.io.outside_blocks()

    def activations(self, tokens: int, streams: int, device: torch.device):
        return self.io.activations(tokens, streams, device)


def owl_sparsity(model: nn.Module, layers: dict[str, nn.Module], config, calib, io=None) -> dict[str, float]:
    """OWL: block prefix -> its sparsity, from each block's outlier share of Wanda scores on the dense model."""
    shares: dict[str, float] = {}

    def process(prefix: str, block: nn.Module, block_layers: dict[str, nn.Module], inputs: BlockInputs):
        sumsq: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
            sumsq[name] = sumsq[name] + x if name in sumsq else x

        collect_inputs(block, inputs, block_layers, observe)
        if inputs.dp is not None:
            for t in sumsq.values():
                inputs.dp.sum_(t)
        scores = [linear_weight(m).detach().float().abs() * sumsq[n].sqrt().unsqueeze(0)
                  for n, m in block_layers.items()]
        shares[prefix] = outlier_share(scores, config.owl_threshold)
        return {}

    run_sequential(model, layers, calib, process, desc="owl outliers", precision=config.calib_precision,
                   io=None if io is None else _Untouched(io))
    return dict(zip(shares, owl_sparsities(list(shares.values()), config.pattern.sparsity, config.owl)))


def _calibrated(prune_layer):
    """apply(model, config, calib): Hessians per group of layers, block by block, then
    ``prune_layer(model, name, module, hessian, config)`` -> the layer's record."""

    def apply(model: nn.Module, config, calib=None, io=None) -> dict[str, dict]:
        layers = _select(model, config)
        per_block = owl_sparsity(model, layers, config, calib, io) if config.owl else None

        def process(prefix: str, block: nn.Module, block_layers: dict[str, nn.Module], inputs: BlockInputs):
            block_config = config if per_block is None else replace(config, sparsity=per_block[prefix], owl=None)
            records = {}
            for group in groups_by_shared_input(block, inputs, block_layers):
                device = inputs.hidden[0].device
                acc = HessianAccumulator(linear_weight(block_layers[group[0]]).shape[1], device, None)
                collect_inputs(block, inputs, {group[0]: block_layers[group[0]]}, lambda n, x: acc.add(x))
                acc.combine(inputs.dp)
                for name in group:
                    records[name] = prune_layer(model, name, block_layers[name], acc.hessian, block_config)
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
