"""Distillation math and the teacher-target cache (squeeze.passes.distill_core)."""

from __future__ import annotations

import pytest
import torch

from squeeze.passes.distill_core import (compute_targets, hidden_mse, kd_loss, model_fingerprint, open_targets,
                                         tail_logit, targets_key)


def _loss(student, teacher, k, t=1.0):
    top = teacher.topk(k, dim=-1)
    return kd_loss(student, top.values, top.indices, tail_logit(teacher, top.indices, t), t)


def test_kd_loss_with_the_whole_vocabulary_is_the_exact_kl():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 30, generator=gen), torch.randn(2, 5, 30, generator=gen)
    for t in (1.0, 2.0):
        exact = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                           log_target=True, reduction="none").sum(-1).mean() * t * t
        assert float(_loss(student, teacher, 30, t)) == pytest.approx(float(exact), rel=1e-5)
        assert float(_loss(student, teacher, 6, t)) <= float(exact) + 1e-6  # binning never adds divergence


def test_kd_loss_is_zero_with_zero_gradient_for_the_teacher_itself():
    teacher = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1))
    student = teacher.clone().requires_grad_(True)
    loss = _loss(student, teacher, 8)
    loss.backward()
    assert abs(float(loss)) < 1e-6 and float(student.grad.abs().max()) < 1e-6
    assert float(_loss(teacher + torch.randn_like(teacher), teacher, 8)) > 1e-3


def test_kd_loss_does_not_reward_draining_the_mass_outside_the_top_k():
    """A student that copies the teacher's top-k logits but pushes every other token down is more confident,
    not closer: its loss must be higher than the teacher's own (the truncated top-k loss rewarded it)."""
    teacher = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(2))
    top = teacher.topk(5, dim=-1)
    drained = torch.full_like(teacher, -30.0).scatter(-1, top.indices, top.values)
    assert float(_loss(drained, teacher, 5)) > float(_loss(teacher, teacher, 5)) + 0.1


def test_hidden_mse_is_scale_free():
    t = torch.randn(2, 3, 16)
    assert float(hidden_mse(t, t)) == 0.0
    assert float(hidden_mse(2 * t + 0.1, 2 * t)) == pytest.approx(float(hidden_mse(t + 0.05, t)), rel=1e-5)


class _Tiny(torch.nn.Module):
    """A causal LM stand-in: embeddings straight to logits, with hidden states."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)
        self.head = torch.nn.Linear(6, 20)

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids, output_hidden_states=False, use_cache=False):
        from types import SimpleNamespace

        h = self.emb(ids)
        return SimpleNamespace(logits=self.head(h), hidden_states=(h, torch.tanh(h)))


def test_targets_are_cached_streamed_and_keyed_by_teacher_and_tokens(tmp_path):
    torch.manual_seed(0)
    teacher = _Tiny()
    ids = torch.randint(0, 20, (5, 7))
    key = targets_key(model_fingerprint(teacher), ids, 4, (1,), 2.0)
    assert open_targets(tmp_path, key) is None
    made = compute_targets(teacher, ids, tmp_path, key, 4, (1,), 2.0, batch_size=2, progress=False)
    again = open_targets(tmp_path, key)
    assert again == made and again.temperature == 2.0 and not list(tmp_path.glob(".*.tmp"))
    values, indices, tail = again.top([3, 1])
    full = teacher(ids[[3, 1]]).logits
    assert torch.equal(values, full.topk(4, dim=-1).values) and torch.equal(indices, full.topk(4, dim=-1).indices)
    assert torch.allclose(tail, tail_logit(full, indices, 2.0))
    assert targets_key(model_fingerprint(teacher), ids, 4, (1,), 1.0) != key  # another temperature
    assert torch.allclose(again.hidden(1, [2]), torch.tanh(teacher.emb(ids[[2]])), atol=1e-3)  # stored as float16
    with torch.no_grad():
        teacher.head.weight.add_(1.0)
    assert targets_key(model_fingerprint(teacher), ids, 4, (1,)) != key  # another teacher
    assert targets_key(model_fingerprint(_Tiny()), ids[:4], 4, (1,)) != key  # other tokens
