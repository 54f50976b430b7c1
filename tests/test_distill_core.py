"""Distillation math and the teacher-target cache (squeeze.passes.distill_core)."""

from __future__ import annotations

import pytest
import torch

from squeeze.passes.distill_core import (compute_targets, hidden_mse, kd_loss, model_fingerprint, open_targets,
                                         targets_key)


def test_kd_loss_with_the_whole_vocabulary_is_the_exact_kl():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 30, generator=gen), torch.randn(2, 5, 30, generator=gen)
    for t in (1.0, 2.0):
        top = teacher.topk(30, dim=-1)
        exact = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                           log_target=True, reduction="none").sum(-1).mean() * t * t
        assert float(kd_loss(student, top.values, top.indices, t)) == pytest.approx(float(exact), rel=1e-5)


def test_kd_loss_is_zero_for_the_teacher_itself_and_grows_with_the_difference():
    teacher = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1))
    top = teacher.topk(8, dim=-1)
    assert float(kd_loss(teacher, top.values, top.indices)) >= 0
    # top-k renormalised: the full-vocabulary student's probabilities on those 8 sum to less than 1
    assert float(kd_loss(teacher, top.values, top.indices)) < float(kd_loss(teacher + torch.randn_like(teacher),
                                                                            top.values, top.indices))


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
    key = targets_key(model_fingerprint(teacher), ids, 4, (1,))
    assert open_targets(tmp_path, key) is None
    made = compute_targets(teacher, ids, tmp_path, key, 4, (1,), batch_size=2, progress=False)
    again = open_targets(tmp_path, key)
    assert again == made and not list(tmp_path.glob(".*.tmp"))
    values, indices = again.top([3, 1])
    full = teacher(ids[[3, 1]]).logits
    assert torch.equal(values, full.topk(4, dim=-1).values) and torch.equal(indices, full.topk(4, dim=-1).indices)
    assert torch.allclose(again.hidden(1, [2]), torch.tanh(teacher.emb(ids[[2]])), atol=1e-3)  # stored as float16
    with torch.no_grad():
        teacher.head.weight.add_(1.0)
    assert targets_key(model_fingerprint(teacher), ids, 4, (1,)) != key  # another teacher
    assert targets_key(model_fingerprint(_Tiny()), ids[:4], 4, (1,)) != key  # other tokens
