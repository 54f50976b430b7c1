"""Static activation calibration: observe each layer's input range on calibration data, derive its qparams.

Symmetric schemes get an int8 scale from the range's absolute maximum; asymmetric ones ("azp") a uint8
scale and zero point spanning [min, max] (see `squeeze.primitives.act_qparams_from_range`).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from squeeze.errors import SqueezeError
from squeeze.primitives import ActQParams, act_qparams_from_range
from squeeze.scheme import ActScheme


def _kth_value(flat: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of a flat tensor (nearest rank; a selection, not a full sort)."""
    k = min(flat.numel(), max(1, int(round(percentile / 100.0 * flat.numel()))))
    return flat.kthvalue(k).values


def abs_percentile(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of |x|."""
    return _kth_value(x.detach().abs().flatten().float(), percentile)


class InputRangeObserver:
    """Running [low, high] of a layer's input: overall min/max (minmax), or the mean per-batch percentiles.

    The symmetric percentile observer keeps the percentile of |x| (low = -high); the asymmetric one the
    (100 - p)-th and p-th percentiles of x, one per tail.
    """

    def __init__(self, acts: ActScheme):
        self.acts = acts
        self.lows: list[torch.Tensor] = []
        self.highs: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if self.acts.observer == "minmax":
            low, high = x.amin().float(), x.amax().float()
        elif self.acts.symmetric:
            high = abs_percentile(x, self.acts.percentile)
            low = -high
        else:
            flat = x.flatten().float()
            low, high = _kth_value(flat, 100.0 - self.acts.percentile), _kth_value(flat, self.acts.percentile)
        self.lows.append(low)
        self.highs.append(high)

    def combine(self, dp) -> None:
        """Every rank's observations in one (`squeeze.distributed.DataParallel`), in batch order."""
        if dp is None:
            return
        gathered = dp.gather([(float(lo), float(hi)) for lo, hi in zip(self.lows, self.highs)])
        pairs = [p for rank_pairs in gathered for p in rank_pairs]
        self.lows = [torch.tensor(lo) for lo, _ in pairs]
        self.highs = [torch.tensor(hi) for _, hi in pairs]

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lows:
            raise SqueezeError("an activation observer saw no inputs; the layer never ran on the calibration data")
        lows, highs = torch.stack(self.lows), torch.stack(self.highs)
        if self.acts.observer == "minmax":
            return lows.min(), highs.max()
        return lows.mean(), highs.mean()

    def absmax(self) -> torch.Tensor:
        low, high = self.range()
        return torch.maximum(-low, high).clamp(min=0)

    def qparams(self) -> ActQParams:
        return act_qparams_from_range(*self.range(), self.acts.symmetric)


def install_input_qparams(layer: nn.Module, qparams: ActQParams) -> None:
    """Set a QuantLinear's static activation scale and (asymmetric only) zero point."""
    layer.input_scale = qparams.scale
    layer.input_zero_point = qparams.zero_point


@torch.no_grad()
def calibrate_input_qparams(
    model: nn.Module, layers: dict[str, nn.Module], calib, acts: ActScheme
) -> dict[str, ActQParams]:
    """Per-tensor static input qparams for each layer, from the float model on ``calib``."""
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
    return {name: obs.qparams() for name, obs in observers.items()}
