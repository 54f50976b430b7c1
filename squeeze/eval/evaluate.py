"""Perplexity / KLD / top-1 agreement of a runtime on a text, optionally against a reference."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from squeeze.eval.metrics import LMStats, windows

DEFAULT_MAX_CONTEXT = 2048
# Logits kept per batch are capped near this many bytes (batch x ctx x vocab x 4 bytes, twice with a reference).
LOGITS_BUDGET_BYTES = 64 << 20


@dataclass
class EvalResult:
    ppl: float
    kld: float | None
    top1_agreement: float | None
    tokens: int
    windows: int
    ctx: int
    size_bytes: int | None
    runtime: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def choose_context(runtime, requested: int | None) -> int:
    if requested is not None:
        return requested
    return min(runtime.max_context or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)


def evaluate_tokens(
    runtime, tokens: torch.Tensor, ctx: int, reference=None, size_bytes: int | None = None, progress: bool = True
) -> EvalResult:
    """Score ``tokens`` (a 1-D stream) in windows of ``ctx`` tokens."""
    start = time.perf_counter()
    wins = windows(tokens, ctx)
    vocab = runtime.vocab_size or 32000
    batch_size = max(1, LOGITS_BUDGET_BYTES // (ctx * vocab * 4 * (2 if reference else 1)))
    stats = LMStats()
    bar = tqdm(total=len(wins), desc="eval", unit="window", disable=not progress, leave=False)
    i = 0
    while i < len(wins):
        # Batch only windows of equal length (all but possibly the last one).
        j = i + 1
        while j < len(wins) and j - i < batch_size and len(wins[j]) == len(wins[i]):
            j += 1
        batch = torch.stack(wins[i:j])
        logits = runtime.logits(batch)[:, :-1]
        ref = reference.logits(batch)[:, :-1] if reference is not None else None
        stats.update(logits, batch[:, 1:], ref)
        bar.update(j - i)
        i = j
    bar.close()
    return EvalResult(
        ppl=stats.ppl,
        kld=stats.kld,
        top1_agreement=stats.top1_agreement,
        tokens=stats.count,
        windows=len(wins),
        ctx=ctx,
        size_bytes=size_bytes,
        runtime=runtime.name,
        seconds=time.perf_counter() - start,
    )
