"""Pruning math on one layer (issue 13): masks, shares, and which method loses least of the layer's output."""

from __future__ import annotations

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.passes.prune_core import (Pattern, lowest_mask, magnitude_prune, nm_mask, sparsegpt_prune, sparsity_of,
                                       wanda_prune)


def _layer(rows=64, cols=256, tokens=2048, seed=0):
    """A weight and inputs whose features differ in scale (a few outlier features) and are correlated,
    as LLM activations are: what makes input-aware pruning matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[:8]] = 20.0
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    hessian = 2.0 / tokens * x.T @ x
    return w, x, hessian


def _output_error(w, pruned, x) -> float:
    return float(((w - pruned) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())


def test_nm_mask_keeps_n_of_every_m():
    scores = torch.randn(8, 32)
    mask = nm_mask(scores, 2, 4)
    assert mask.reshape(8, 8, 4).sum(-1).eq(2).all()
    kept = scores.masked_fill(mask, float("-inf")).reshape(8, 8, 4)
    dropped = scores.masked_fill(~mask, float("inf")).reshape(8, 8, 4)
    assert (kept.max(-1).values >= dropped.min(-1).values).all()  # the kept are the largest of their group
    assert nm_mask(scores, 1, 8).reshape(8, 4, 8).sum(-1).eq(7).all()


def test_lowest_mask_shares():
    scores = torch.randn(10, 100)
    assert lowest_mask(scores, 0.3, per_row=True).sum(1).eq(30).all()
    assert int(lowest_mask(scores, 0.3, per_row=False).sum()) == 300
    assert not lowest_mask(scores, 0.0, per_row=True).any()


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(n=2, m=4)], ids=["50%", "2:4"])
def test_input_aware_methods_lose_less_of_the_output(pattern):
    w, x, hessian = _layer()
    errors = {
        "magnitude": _output_error(w, magnitude_prune(w, pattern), x),
        "wanda": _output_error(w, wanda_prune(w, hessian, pattern), x),
        "sparsegpt": _output_error(w, sparsegpt_prune(w, hessian, pattern, block_size=64), x),
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_patterns_are_exact(method):
    w, _, hessian = _layer(rows=16, cols=128)
    run = {"magnitude": lambda p: magnitude_prune(w, p), "wanda": lambda p: wanda_prune(w, hessian, p),
           "sparsegpt": lambda p: sparsegpt_prune(w, hessian, p, block_size=32)}[method]
    half = run(Pattern(sparsity=0.5))
    assert sparsity_of(half) == 0.5
    zeros = half == 0
    if method == "wanda":  # compared within each output row
        assert zeros.sum(1).eq(64).all()
    if method == "sparsegpt":  # the same share in every block of 32 columns
        assert zeros.reshape(16, 4, 32).sum((0, 2)).eq(16 * 32 // 2).all()
    two_four = run(Pattern(n=2, m=4))
    assert (two_four.reshape(16, 32, 4) != 0).sum(-1).le(2).all() and sparsity_of(two_four) == 0.5


def test_sparsegpt_updates_the_kept_weights_and_zero_sparsity_keeps_them():
    w, x, hessian = _layer(rows=8, cols=64)
    pruned = sparsegpt_prune(w, hessian, Pattern(sparsity=0.5), block_size=16)
    kept = pruned != 0
    assert not torch.equal(pruned[kept], w[kept])  # the survivors absorbed the pruned weights' error
    assert torch.allclose(sparsegpt_prune(w, hessian, Pattern(sparsity=0.0)), w, atol=1e-5)


def test_dead_inputs_are_pruned_first():
    w, x, hessian = _layer(rows=8, cols=64)
    hessian[:, 3] = 0
    hessian[3, :] = 0
    assert (sparsegpt_prune(w, hessian, Pattern(sparsity=0.25), block_size=16)[:, 3] == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "either a sparsity"),
    ({"sparsity": 0.5, "n": 2, "m": 4}, "either a sparsity"),
    ({"sparsity": 0.95}, "from 0 to 0.9"),
    ({"n": 4, "m": 4}, "0 < N < M"),
])
def test_bad_patterns(kwargs, message):
    with pytest.raises(SqueezeError, match=message):
        Pattern(**kwargs)


def test_parse_mask():
    assert Pattern.parse_mask("2:4") == Pattern(n=2, m=4)
    with pytest.raises(SqueezeError, match="N:M"):
        Pattern.parse_mask("half")
    with pytest.raises(SqueezeError, match="groups of 4"):
        Pattern(n=2, m=4).check_columns(10, "layer")


def test_gptq_keeps_zeros_of_pruned_layers_only(monkeypatch):
    from squeeze.grid import grid_for
    from squeeze.passes import gptq_core
    from squeeze.scheme import get_scheme

    w, _, hessian = _layer(rows=16, cols=128)
    grid = grid_for(get_scheme("w4g32"))
    pruned = wanda_prune(w, hessian, Pattern(sparsity=0.5))
    kept = gptq_core.gptq_quantize(pruned, hessian, grid).values
    assert (kept[pruned == 0] == 0).all()
    dense = w.clone()
    dense[0, :3] = 0.0  # a dense layer's few exact zeros are ordinary weights
    pinned_dense = gptq_core.gptq_quantize(dense, hessian, grid).values
    monkeypatch.setattr(gptq_core, "PRUNED_MIN_SHARE", 2.0)  # never pin
    assert torch.equal(gptq_core.gptq_quantize(dense, hessian, grid).values, pinned_dense)
    revived = gptq_core.gptq_quantize(pruned, hessian, grid).values
    assert (revived[pruned == 0] != 0).any()  # without pinning GPTQ's updates revive pruned weights


def test_owl_sparsities_keep_the_mean_and_spare_outlier_blocks():
    from squeeze.passes.prune_core import outlier_share, owl_sparsities

    # OWL's reference: ratios scaled to [0, 2 * lambda], centred on 1 - target; more outliers, lower sparsity
    sparsities = owl_sparsities([0.01, 0.03, 0.02, 0.05], target=0.5, spread=0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.5)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert sparsities[3] == min(sparsities) and sparsities[0] == max(sparsities)
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    # one score of 10 among ninety-nine of 1: mean 1.09, so only it is above 5 x the mean
    assert outlier_share([torch.ones(99), torch.tensor([10.0])], 5.0) == pytest.approx(0.01)
