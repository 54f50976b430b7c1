"""RTN: round-to-nearest post-training quantization of weights (and int8 activations)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from squeeze.model import linear_weight
from squeeze.passes.activations import calibrate_input_qparams, install_input_qparams
from squeeze.passes.common import install_rounded, select_layers
from squeeze.registry import register_pass
from squeeze.scheme import GGUFMix, QuantScheme, get_scheme


@dataclass(frozen=True)
class RTN:
    """Round every targeted Linear's weight to the nearest point of ``scheme``'s grid."""

    scheme: QuantScheme | GGUFMix = field(default_factory=lambda: get_scheme("w4g128"))
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()


def apply_rtn(model: nn.Module, config: RTN, calib=None) -> dict[str, dict]:
    layers, schemes = select_layers(model, config)
    act_qparams = {}
    if config.scheme.activations is not None and config.scheme.activations.mode == "static":
        act_qparams = calibrate_input_qparams(model, layers, calib, config.scheme.activations)
    records = {}
    for name, module in tqdm(layers.items(), desc="rtn", unit="layer", leave=False):
        records[name], _ = install_rounded(model, name, module, schemes[name], linear_weight(module).detach())
        if name in act_qparams:
            install_input_qparams(model.get_submodule(name), act_qparams[name])
    return records


def _needs_calibration(config: RTN) -> bool:
    acts = config.scheme.activations
    return acts is not None and acts.mode == "static"


register_pass("rtn", RTN, apply_rtn, _needs_calibration)
