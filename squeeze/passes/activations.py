"""Static int8 activation calibration: observe each layer's input range on calibration data."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from squeeze.errors import SqueezeError
from squeeze.primitives import act_scale_from_absmax
from squeeze.scheme import ActScheme

def abs_percentile(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of |x| (nearest rank; a selection, not a full sort)."""
    flat = x.detach().abs().flatten().float()
    k = min(flat.numel(), max(1, int(round(percentile / 100.0 * flat.numel()))))
    return flat.kthvalue(k).values


class InputRangeObserver:
    """Running statistic of |input|: the max (minmax) or the mean per-batch percentile."""

    def __init__(self, acts: ActScheme):
        self.acts = acts
        self.values: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if self.acts.observer == "minmax":
            self.values.append(x.detach().abs().amax().float())
        else:
            self.values.append(abs_percentile(x, self.acts.percentile))

    def absmax(self) -> torch.Tensor:
        stacked = torch.stack(self.values)
        return stacked.max() if self.acts.observer == "minmax" else stacked.mean()


@torch.no_grad()
def calibrate_activation_scales(
    model: nn.Module, layers: dict[str, nn.Module], calib, acts: ActScheme
) -> dict[str, torch.Tensor]:
    """Per-tensor int8 input scale for each layer, from the float model on ``calib``."""
    if calib is None:
        raise SqueezeError("static activation quantization needs calibration data (--calib)")
    observers = {name: InputRangeObserver(acts) for name in layers}
    handles = [m.register_forward_pre_hook(observers[n]) for n, m in layers.items()]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(list(calib.batches()), desc="observe activations", unit="batch", leave=False):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: act_scale_from_absmax(obs.absmax()) for name, obs in observers.items()}
