"""RTN: round-to-nearest post-training quantization of weights (and int8 activations)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from squeeze.model import linear_weight
from squeeze.passes.activations import InputRangeObserver, calibrate_input_qparams, install_input_qparams
from squeeze.passes.common import install_rounded, select_layers
from squeeze.registry import register_pass
from squeeze.runner import collect_inputs, run_blockwise, run_sequential
from squeeze.scheme import GGUFMix, QuantScheme, get_scheme


@dataclass(frozen=True)
class RTN:
    """Round every targeted Linear's weight to the nearest point of ``scheme``'s grid."""

    scheme: QuantScheme | GGUFMix = field(default_factory=lambda: get_scheme("w4g128"))
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()


def apply_rtn(model: nn.Module, config: RTN, calib=None, io=None) -> dict[str, dict]:
    """``io`` (a streamed model): block by block; static activation ranges are then observed block by block on
    the float model's stream (`run_sequential` with ``feed_float``), the same inputs the whole model gives."""
    layers, schemes = select_layers(model, config)
    static = config.scheme.activations is not None and config.scheme.activations.mode == "static"
    if io is None:
        act_qparams = calibrate_input_qparams(model, layers, calib, config.scheme.activations) if static else {}
        records = {}
        for name, module in tqdm(layers.items(), desc="rtn", unit="layer", leave=False):
            records[name], _ = install_rounded(model, name, module, schemes[name], linear_weight(module).detach())
            if name in act_qparams:
                install_input_qparams(model.get_submodule(name), act_qparams[name])
        return records

    def process(prefix: str, block: nn.Module, block_layers: dict[str, nn.Module], inputs) -> dict[str, dict]:
        observers = {n: InputRangeObserver(config.scheme.activations) for n in block_layers} if static else {}
        if static:
            collect_inputs(block, inputs, block_layers, lambda n, x: observers[n](None, (x,)))
            for observer in observers.values():
                observer.combine(inputs.dp)
        records = {}
        for name, module in block_layers.items():
            records[name], _ = install_rounded(model, name, module, schemes[name], linear_weight(module).detach())
            if name in observers:
                install_input_qparams(model.get_submodule(name), observers[name].qparams())
        return records

    if static:
        return run_sequential(model, layers, calib, process, desc="rtn", io=io, feed_float=True)
    return run_blockwise(model, layers, process, io, desc="rtn")


def _needs_calibration(config: RTN) -> bool:
    acts = config.scheme.activations
    return acts is not None and acts.mode == "static"


register_pass("rtn", RTN, apply_rtn, _needs_calibration)
