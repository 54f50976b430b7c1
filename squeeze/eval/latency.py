"""Latency measurement: warm-up, then N timed runs; percentiles; LM prefill/decode throughput.

Numbers from here are reported, never asserted in tests: these machines are noisy.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LatencyStats:
    """Per-call wall time over ``runs`` timed calls after ``warmup`` untimed ones."""

    warmup: int
    runs: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_calls(
    fn: Callable[[], object], warmup: int = 2, runs: int = 10, clock: Callable[[], float] = time.perf_counter
) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append((clock() - start) * 1000.0)
    times.sort()
    return LatencyStats(warmup, runs, percentile(times, 50), percentile(times, 95), sum(times) / runs, times[0])


@dataclass(frozen=True)
class ThroughputStats:
    """LM speed at a stated batch and context: prefill and decode tokens per second."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    forward: LatencyStats  # one full-prompt forward pass

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forward"] = self.forward.to_dict()
        return d


def measure_lm_throughput(
    runtime, batch: int = 1, prompt_tokens: int = 128, new_tokens: int = 32, warmup: int = 2, runs: int = 5, seed: int = 0
) -> ThroughputStats:
    """Prefill: forward of a [batch, prompt_tokens] prompt. Decode: ``runtime.decode`` of new tokens.

    A runtime without incremental decoding re-runs the growing sequence per token,
    which is what such a deployment would do.
    """
    vocab = runtime.vocab_size or 256
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (batch, prompt_tokens), generator=gen)
    forward = time_calls(lambda: runtime.logits(prompt), warmup, runs)
    decode_fn = getattr(runtime, "decode", None)
    if decode_fn is None:
        def decode_fn(p, n):
            ids = p
            for _ in range(n):
                nxt = runtime.logits(ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            return ids

    decode_fn(prompt, 2)  # warm-up of the decode path
    start = time.perf_counter()
    decode_fn(prompt, new_tokens)
    total = time.perf_counter() - start
    prefill_s = forward.p50_ms / 1000.0
    decode_s = max(total - prefill_s, 1e-9)
    return ThroughputStats(
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_tokens_per_s=batch * prompt_tokens / prefill_s,
        decode_tokens_per_s=batch * new_tokens / decode_s,
        forward=forward,
    )


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
