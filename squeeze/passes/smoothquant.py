"""SmoothQuant for W8A8: migrate activation outliers into the weights, then int8 weights and activations.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models" (2022): per input channel j,
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X is divided by s (folded into
the preceding norm or linear) and W multiplied by it, so the float model is
unchanged while the activations become easy to quantize. Weights are then
rounded on the scheme's grid and activations quantized to 8 bits (symmetric int8,
or uint8 with a zero point for an "azp" scheme), statically (per-tensor qparams
observed on the smoothed calibration inputs) or dynamically (per token), block by
block through the sequential runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import linear_weight, select_linears
from squeeze.passes.activations import InputRangeObserver, install_input_qparams
from squeeze.passes.common import install_rounded
from squeeze.passes.gptq_core import HessianAccumulator, output_rel_error
from squeeze.passes.scaling import fold_scales, mappings_for, relative_names, resolve
from squeeze.registry import register_pass
from squeeze.runner import BlockInputs, collect_inputs, run_sequential
from squeeze.scheme import QuantScheme, get_scheme


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant settings: ``alpha`` is the migration strength (0: none, 1: all onto the weights)."""

    scheme: QuantScheme = field(default_factory=lambda: get_scheme("w8a8"))
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    alpha: float = 0.5
    device: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SqueezeError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.scheme.activations is None:
            raise SqueezeError(f"SmoothQuant is for int8 activations but scheme {self.scheme.name!r} has none; "
                               "use --scheme w8a8 (or --act static|dynamic)")


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel; 1 where a channel is never active or has no weight."""
    s = act_absmax.float().pow(alpha) / weight_absmax.float().pow(1.0 - alpha)
    valid = (act_absmax > 0) & (weight_absmax > 0) & torch.isfinite(s)
    return torch.where(valid, s, torch.ones_like(s)).clamp(min=1e-5)


def _process_block(model: nn.Module, config: SmoothQuant, mappings):
    acts = config.scheme.activations

    def process(prefix: str, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> dict[str, dict]:
        device = inputs.hidden[0].device
        channel_max = {n: torch.zeros(linear_weight(m).shape[1], device=device) for n, m in layers.items()}

        def observe_channels(name: str, x: torch.Tensor) -> None:
            x = x.detach().abs().reshape(-1, x.shape[-1]).float()
            torch.maximum(channel_max[name], x.amax(0), out=channel_max[name])

        collect_inputs(block, inputs, layers, observe_channels)
        if inputs.dp is not None:
            for m in channel_max.values():
                inputs.dp.max_(m)
        names = relative_names(prefix, layers)
        for mapping in mappings:
            found = resolve(block, mapping, names)
            if found is None:
                continue
            prev, full = found
            w_max = torch.stack([linear_weight(layers[n]).detach().abs().float().amax(0) for n in full]).amax(0)
            fold_scales(prev, [layers[n] for n in full], smoothing_scales(channel_max[full[0]], w_max, config.alpha),
                        mapping.prev_part)

        # Observe the smoothed inputs: second moments for the error record, ranges for static scales.
        acc = {n: HessianAccumulator(linear_weight(m).shape[1], device) for n, m in layers.items()}
        ranges = {n: InputRangeObserver(acts) for n in layers}

        def observe_smoothed(name: str, x: torch.Tensor) -> None:
            acc[name].add(x)
            ranges[name](None, (x,))

        collect_inputs(block, inputs, layers, observe_smoothed)
        for n in layers:
            acc[n].combine(inputs.dp)
            ranges[n].combine(inputs.dp)
        records = {}
        for name, module in layers.items():
            w = linear_weight(module).detach().float()
            rec, values = install_rounded(model, name, module, config.scheme, w)
            if acts.mode == "static":
                install_input_qparams(model.get_submodule(name), ranges[name].qparams())
            rec["output_rel_mse"] = output_rel_error(w, values, acc[name].hessian)  # weight rounding only
            records[name] = rec
        return records

    return process


def apply_smoothquant(model: nn.Module, config: SmoothQuant, calib=None, io=None) -> dict[str, dict]:
    layers = select_linears(model, config.targets, config.ignore)
    mappings = mappings_for(model, "SmoothQuant")
    return run_sequential(model, layers, calib, _process_block(model, config, mappings), config.device,
                          desc="smoothquant", io=io)


register_pass("smoothquant", SmoothQuant, apply_smoothquant, lambda config: True)
