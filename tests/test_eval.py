"""Evaluation numbers against hand computation; windowing; determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import squeeze
from squeeze.eval.evaluate import evaluate_tokens
from squeeze.eval.metrics import windows


class TableLM(nn.Module):
    """A bigram 'model': logits of the next token are a fixed row per current token."""

    def __init__(self, vocab=6, seed=0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)), False)

    def forward(self, ids):
        return self.table[ids]


class FakeRuntime:
    name = "fake"
    max_context = None

    def __init__(self, model, vocab=6):
        self.model, self.vocab_size = model, vocab

    def logits(self, ids):
        return self.model(ids).detach()


def test_perplexity_matches_hand_computation():
    tokens = torch.tensor([0, 3, 1, 4, 1, 5, 2, 0, 3])
    model = TableLM()
    res = evaluate_tokens(FakeRuntime(model), tokens, ctx=4, progress=False)
    # windows: [0 3 1 4] [1 5 2 0] [3] -> the last has one token and scores nothing
    nll, n = 0.0, 0
    for window in ([0, 3, 1, 4], [1, 5, 2, 0]):
        for prev, nxt in zip(window, window[1:]):
            p = math.exp(model.table[prev, nxt].item()) / sum(math.exp(v) for v in model.table[prev].tolist())
            nll -= math.log(p)
            n += 1
    assert res.tokens == n == 6 and res.windows == 2
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-6)  # float32 log-softmax
    assert res.kld is None and res.top1_agreement is None


def test_kld_and_agreement_match_hand_computation():
    tokens = torch.tensor([0, 3, 1, 4, 1, 5, 2])
    model, ref = TableLM(seed=0), TableLM(seed=1)
    res = evaluate_tokens(FakeRuntime(model), tokens, ctx=7, reference=FakeRuntime(ref), progress=False)
    kl, agree = 0.0, 0
    for prev in tokens[:-1].tolist():
        p = torch.softmax(ref.table[prev].double(), 0)
        q = torch.softmax(model.table[prev].double(), 0)
        kl += float((p * (p / q).log()).sum())
        agree += int(p.argmax() == q.argmax())
    assert res.kld == pytest.approx(kl / 6, rel=1e-5)
    assert res.top1_agreement == agree / 6


def test_model_against_itself_has_zero_kld():
    tokens = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(0))
    rt = FakeRuntime(TableLM())
    res = evaluate_tokens(rt, tokens, ctx=8, reference=rt, progress=False)
    assert res.kld == pytest.approx(0.0, abs=1e-9) and res.top1_agreement == 1.0


def test_windows_are_consecutive_and_drop_single_token_tail():
    t = torch.arange(10)
    assert [w.tolist() for w in windows(t, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in windows(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_bundled_model_eval_is_deterministic_and_batching_invariant(stories_dir, short_text, monkeypatch):
    a = squeeze.evaluate(stories_dir, short_text, ctx=64, progress=False)
    b = squeeze.evaluate(stories_dir, short_text, ctx=64, progress=False)
    assert a.ppl == b.ppl and a.tokens == b.tokens
    import squeeze.eval.evaluate as ev

    monkeypatch.setattr(ev, "LOGITS_BUDGET_BYTES", 1)  # one window per batch
    c = squeeze.evaluate(stories_dir, short_text, ctx=64, progress=False)
    assert c.ppl == pytest.approx(a.ppl, rel=1e-6)
    # a real pretrained model on its own domain: low perplexity
    assert 1.5 < a.ppl < 8


def test_eval_with_reference_reports_kld(stories_dir, short_text):
    res = squeeze.evaluate(stories_dir, short_text, reference=stories_dir, progress=False)
    assert res.kld == pytest.approx(0.0, abs=1e-6) and res.top1_agreement == 1.0
    assert res.size_bytes == (stories_dir / "model.safetensors").stat().st_size
