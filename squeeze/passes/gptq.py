"""GPTQ pass: second-order weight quantization, block by block through the sequential runner.

    squeeze.quantize(model, GPTQ(scheme=get_scheme("w4g32-asym"), act_order=True), calib)

The math lives in `gptq_core`; this module wires it to the runner and to
QuantLinear. The grid is the scheme's (`squeeze.grid.grid_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.grid import grid_for
from squeeze.model import linear_weight
from squeeze.passes.common import replace_with_quant_linear, select_layers
from squeeze.passes.gptq_core import (CrossAccumulator, GPTQResult, HessianAccumulator, check_shrink,
                                     float_target_weight,
                                     gptq_quantize, output_rel_error)
from squeeze.precision import check_calib_precision
from squeeze.registry import register_pass
from squeeze.lazy import release
from squeeze.runner import BlockInputs, collect_inputs, collect_paired_inputs, groups_by_shared_input, run_sequential
from squeeze.scheme import GGUFMix, QuantScheme, get_scheme


@dataclass(frozen=True)
class GPTQ:
    """GPTQ settings. ``damp`` is a fraction of the Hessian's mean diagonal; ``block_size`` the lazy-batch width.

    Defaults measured on SmolLM2-135M (bench/smollm2.py): act-order with static groups (scales fitted before
    the updates, so groups stay contiguous and every exporter takes the checkpoint), and the Hessian shrunk
    halfway to its diagonal for the updates: calibrated on stories and scored on WikiText at w4g128, shrink
    0 / 0.5 / 0.8 / 1 recover 34% / 57% / 59% / 45% of RTN's perplexity gap (64 x 512 tokens).

    ``token_cap``: a calibration token counts in the Hessian with at most this many times the median token's
    input energy (attention sinks, `cap_outlier_tokens`); None counts every token as it is.
    ``weighted_fit``: group scales are chosen by importance-weighted error (Hessian diagonal), not min-max.
    ``shrink``: the error updates trust the calibration inputs' correlations only in part
    (`shrink_to_diagonal`): 0 is GPTQ as published, 1 importance-weighted rounding without updates.
    ``uncapped_fit``: the weighted fit's column importance counts every calibration token as it is (the
    statistic llama-imatrix collects), while the Hessian for the updates keeps the token cap. None (default):
    on GGUF grids, whose importance-weighted fits are llama.cpp's own and made for that statistic, not on
    integer grids. Measured on SmolLM2 (stories 64 x 512, WikiText): q4_0-mix by llama-perplexity 25.96 capped,
    25.79 uncapped (llama.cpp with an imatrix 25.83); w4g128 in torch 35.36 capped, 36.41 uncapped.
    ``calib_precision``: the arithmetic of the calibration forwards (`squeeze.precision`; "auto": bfloat16
    matmuls where the CPU has them natively, which on SmolLM2 gives the same perplexity in less time).
    ``float_target``: each layer matches the float model's outputs rather than the float layer's outputs on
    the already-quantized inputs (`float_target_weight`); costs a float copy of the block stream.
    """

    scheme: QuantScheme | GGUFMix = field(default_factory=lambda: get_scheme("w4g128"))
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    token_cap: float | None = 100.0
    weighted_fit: bool = True
    shrink: float = 0.5
    float_target: bool = False
    uncapped_fit: bool | None = None
    device: str | None = None
    calib_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise SqueezeError(f"--block-size must be a positive integer, got {self.block_size}")
        if not 0.0 < self.damp < 1.0:
            raise SqueezeError(f"--damp must be in (0, 1) (a fraction of the mean Hessian diagonal), got {self.damp}")
        check_shrink(self.shrink)
        check_calib_precision(self.calib_precision)
        if self.token_cap is not None and self.token_cap < 1.0:
            raise SqueezeError(f"GPTQ token_cap must be at least 1 (times the median token energy), got {self.token_cap}")
        if self.scheme.activations is not None:
            raise SqueezeError("GPTQ quantizes weights only; for int8 activations use --method smoothquant or rtn")


def uses_uncapped_fit(config: GPTQ, scheme: QuantScheme) -> bool:
    """Whether the weighted fit takes the uncapped input energies (``config.uncapped_fit``; None: GGUF grids)."""
    return scheme.gguf is not None if config.uncapped_fit is None else config.uncapped_fit


def quantize_linear(module: nn.Module, hessian: torch.Tensor, config: GPTQ, scheme: QuantScheme,
                    cross: torch.Tensor | None = None, energy: torch.Tensor | None = None) -> GPTQResult:
    """GPTQ for one layer given its input Hessian (and with ``cross``, the float target's cross term).
    GGUF blocks hold contiguous columns, so act-order on a GGUF grid fits its blocks in the original column
    order (static groups)."""
    weight = linear_weight(module).detach()
    if cross is not None:
        weight = float_target_weight(weight, hessian, cross, config.damp)
    return gptq_quantize(
        weight,
        hessian,
        grid_for(scheme),
        block_size=config.block_size,
        damp=config.damp,
        act_order=config.act_order,
        static_groups=config.static_groups or (config.act_order and scheme.gguf is not None),
        weighted_fit=config.weighted_fit,
        shrink=config.shrink,
        importance=energy if uses_uncapped_fit(config, scheme) else None,
    )


def install(model: nn.Module, name: str, module: nn.Module, result: GPTQResult, hessian, scheme: QuantScheme) -> dict:
    """Replace ``module`` by a QuantLinear holding GPTQ's codes; returns the layer's record."""
    qp = grid_for(scheme).layer_qparams(result.params, result.codes, result.g_idx)
    weight = linear_weight(module).detach()
    record = replace_with_quant_linear(model, name, module, scheme, result.codes, qp)
    record["output_rel_mse"] = output_rel_error(weight, result.values, hessian)
    record["damp"] = result.damp
    del weight
    release(module)  # the float layer is out of the model; the runner's layer table would keep its weight alive
    return record


def _process_block(model: nn.Module, config: GPTQ, schemes: dict[str, QuantScheme]):
    def statistics(prefix, block, inputs: BlockInputs, groups: list[list[str]], layers):
        """One Hessian (and cross term) per group of layers fed the same input (q/k/v, gate/up), from one
        pass over the block."""
        device = inputs.hidden[0].device
        leaders = {g[0]: layers[g[0]] for g in groups}
        if config.float_target:
            acc = {n: CrossAccumulator(linear_weight(m).shape[1], device, config.token_cap) for n, m in leaders.items()}
            collect_paired_inputs(block, inputs, leaders, prefix, lambda n, x, x_ref: acc[n].add_pair(x, x_ref))
        else:
            acc = {n: HessianAccumulator(linear_weight(m).shape[1], device, config.token_cap) for n, m in leaders.items()}
            collect_inputs(block, inputs, leaders, lambda n, x: acc[n].add(x))
        for a in acc.values():
            a.combine(inputs.dp)
        return {n: (acc[g[0]].hessian, getattr(acc[g[0]], "cross", None), acc[g[0]].energy) for g in groups for n in g}

    def process(prefix: str, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> dict[str, dict]:
        groups = groups_by_shared_input(block, inputs, layers)
        # true sequential: each group's Hessian is taken on inputs that passed the quantized groups before it
        stages = [[g] for g in groups] if config.true_sequential else [groups]
        records = {}
        for i, stage in enumerate(stages):
            stats = statistics(prefix, block, inputs, stage, layers)
            if i == len(stages) - 1:
                inputs.replay = None  # no pass over this block replays anything now: free it before the solves
            for n in (n for g in stage for n in g):
                hessian, cross, energy = stats[n]
                result = quantize_linear(layers[n], hessian, config, schemes[n], cross, energy)
                records[n] = install(model, n, layers[n], result, hessian, schemes[n])
        return records

    return process


def apply_gptq(model: nn.Module, config: GPTQ, calib=None, io=None) -> dict[str, dict]:
    layers, schemes = select_layers(model, config)
    return run_sequential(model, layers, calib, _process_block(model, config, schemes), config.device, desc="gptq",
                          track_float=config.float_target, precision=config.calib_precision, io=io)


register_pass("gptq", GPTQ, apply_gptq, lambda config: True)
