"""The shared training loop (squeeze.train): schedule, data order, accumulation, resume after a kill."""

from __future__ import annotations

import math

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.train import STATE_FILE, TrainConfig, batch_order, learning_rate, train


def test_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=110, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(c, 0) == pytest.approx(1e-4)  # 1/10 of the peak on the first step
    assert learning_rate(c, 9) == pytest.approx(1e-3)
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way down the cosine
    assert learning_rate(c, 110) == pytest.approx(1e-4)


def test_batch_order_covers_every_example_once_per_epoch_and_is_seeded():
    c = TrainConfig(steps=10, batch_size=3, grad_accum=2, seed=5)
    seen = [i for step in range(2) for micro in range(2) for i in batch_order(12, c, step, micro)]
    assert sorted(seen) == list(range(12))  # 2 steps x 2 micro-batches x 3 = one epoch of 12
    assert batch_order(12, c, 1, 1) == batch_order(12, c, 1, 1)
    assert batch_order(12, TrainConfig(seed=6, batch_size=3), 0, 0) != batch_order(12, TrainConfig(seed=5, batch_size=3), 0, 0)


def _problem():
    """Least squares y = X w*: a loss the loop must drive down."""
    gen = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(64, 8, generator=gen), torch.randn(8, generator=gen)
    y = x @ w_true
    w = torch.nn.Parameter(torch.zeros(8))

    def loss_fn(rows):
        return (x[rows] @ w - y[rows]).pow(2).mean(), len(rows)

    return {"w": w}, loss_fn


def test_training_lowers_the_loss_and_logs_tokens():
    params, loss_fn = _problem()
    log = train(params, loss_fn, 64, TrainConfig(steps=60, lr=0.05, warmup=5, batch_size=8, checkpoint_every=0),
                progress=False)
    assert log.losses[-1] < 0.05 * log.losses[0]
    assert log.tokens == 60 * 8 and len(log.losses) == 60


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    """Stopped after step 7 (the state was saved at 5), started again: the same weights as an uninterrupted run."""
    config = TrainConfig(steps=12, lr=0.05, warmup=2, batch_size=8, checkpoint_every=5)
    params, loss_fn = _problem()
    whole = train(params, loss_fn, 64, config, progress=False)
    expected = params["w"].detach().clone()

    params, loss_fn = _problem()
    calls = {"n": 0}

    def dying(rows):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return loss_fn(rows)

    with pytest.raises(KeyboardInterrupt):
        train(params, dying, 64, config, state_dir=tmp_path, progress=False)
    assert (tmp_path / STATE_FILE).is_file()
    params, loss_fn = _problem()  # a fresh process: parameters back at their start
    resumed = train(params, loss_fn, 64, config, state_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 5
    assert torch.equal(params["w"].detach(), expected)
    assert resumed.losses == whole.losses


def test_a_state_from_other_settings_is_not_resumed(tmp_path):
    params, loss_fn = _problem()
    train(params, loss_fn, 64, TrainConfig(steps=6, lr=0.05, checkpoint_every=5), state_dir=tmp_path, progress=False)
    params, loss_fn = _problem()
    log = train(params, loss_fn, 64, TrainConfig(steps=6, lr=0.01, checkpoint_every=5), state_dir=tmp_path,
                progress=False)
    assert log.resumed_from == 0


def test_a_diverging_loss_stops_with_a_clear_error():
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(SqueezeError, match="loss became"):
        train({"w": w}, lambda rows: (w * math.inf, 1), 4, TrainConfig(steps=2), progress=False)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": 0.0}, {"batch_size": 0}, {"precision": "float16"},
                                 {"warmup": -1}, {"min_lr_ratio": 2.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SqueezeError):
        TrainConfig(**bad)


def test_keep_best_hands_back_the_best_evaluated_state():
    """An evaluation that only gets worse as training goes (minus the loss) keeps the starting parameters."""
    params, loss_fn = _problem()
    full = list(range(64))
    log = train(params, loss_fn, 64, TrainConfig(steps=10, lr=0.05, eval_every=5, checkpoint_every=0),
                eval_fn=lambda: -float(loss_fn(full)[0].detach()), keep_best=True, progress=False)
    assert [s for s, _ in log.evals] == [0, 5, 10] and log.best_step == 0
    assert torch.equal(params["w"].detach(), torch.zeros(8))
    params, loss_fn = _problem()  # and an evaluation that improves keeps the last state
    log = train(params, loss_fn, 64, TrainConfig(steps=10, lr=0.05, eval_every=5, checkpoint_every=0),
                eval_fn=lambda: float(loss_fn(full)[0].detach()), keep_best=True, progress=False)
    assert log.best_step == 10 and not torch.equal(params["w"].detach(), torch.zeros(8))
