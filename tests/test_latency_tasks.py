"""Measurement machinery (never timings themselves): warm-up exclusion, counts, percentiles; task scoring."""

from __future__ import annotations

import json

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.eval.device import describe_device
from squeeze.eval.latency import measure_lm_throughput, percentile, time_calls
from squeeze.eval.tasks import Choice, evaluate_multiple_choice, load_multiple_choice


class FakeClock:
    """Each call of the timed function advances time by the next duration in the list."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_warmup_calls_are_not_timed():
    clock = FakeClock()
    durations = iter([100.0, 100.0, 0.001, 0.002, 0.003, 0.004])  # two slow warm-up calls, then fast ones
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(durations)

    stats = time_calls(fn, warmup=2, runs=4, clock=clock)
    assert len(calls) == 6 and stats.runs == 4 and stats.warmup == 2
    assert stats.min_ms == pytest.approx(1.0) and stats.mean_ms == pytest.approx(2.5)
    assert stats.p50_ms == pytest.approx(2.5) and stats.p95_ms == pytest.approx(3.85)


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    with pytest.raises(ValueError):
        time_calls(lambda: None, runs=0)


class CountingRuntime:
    name, vocab_size, max_context = "fake", 16, None

    def __init__(self):
        self.calls = []

    def logits(self, ids):
        self.calls.append(tuple(ids.shape))
        return torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)


def test_throughput_counts_tokens_at_stated_batch_and_context():
    rt = CountingRuntime()
    stats = measure_lm_throughput(rt, batch=2, prompt_tokens=8, new_tokens=3, warmup=1, runs=2)
    assert stats.batch == 2 and stats.prompt_tokens == 8 and stats.new_tokens == 3
    assert rt.calls[:3] == [(2, 8)] * 3  # warm-up + timed prefill forwards
    # without a decode() the runtime re-runs the growing sequence, one token per step
    assert rt.calls[-3:] == [(2, 8), (2, 9), (2, 10)]
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    json.dumps(stats.to_dict())


def test_device_description_schema():
    d = describe_device()
    assert {"cpu", "cores", "torch_threads", "gpu", "os", "python", "versions"} <= set(d)
    assert "torch" in d["versions"]


class CharTokenizer:
    """One token per character (id = byte value), BOS = 1."""

    def __call__(self, text, add_special_tokens=True, **_):
        return {"input_ids": ([1] if add_special_tokens else []) + [min(ord(c), 127) for c in text]}


class PreferRuntime(CountingRuntime):
    """Puts all probability on token 'x' (120) after any token."""

    vocab_size = 128

    def logits(self, ids):
        out = torch.full((ids.shape[0], ids.shape[1], self.vocab_size), -20.0)
        out[..., 120] = 0.0
        return out


def test_multiple_choice_picks_the_likeliest_continuation():
    items = [Choice("ab", ("xxx", "yyy"), 0), Choice("ab", ("qq", "x"), 1), Choice("ab", ("xx", "q"), 1)]
    res = evaluate_multiple_choice(PreferRuntime(), CharTokenizer(), items, progress=False)
    assert res.items == 3 and res.accuracy == pytest.approx(2 / 3)


def test_task_file_validation(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 1}) + "\n")
    assert load_multiple_choice(good) == [Choice("a", ("b", "c"), 1)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 2}) + "\n")
    with pytest.raises(SqueezeError, match="bad.jsonl:1"):
        load_multiple_choice(bad)
