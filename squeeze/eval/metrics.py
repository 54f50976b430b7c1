"""Language-model metrics over fixed token windows: perplexity, KL divergence, top-1 agreement.

Protocol: the text is one token stream, cut into consecutive windows of
``ctx`` tokens (the last one may be shorter); in every window each token after
the first is scored given the tokens before it in that window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def windows(tokens: torch.Tensor, ctx: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``ctx`` tokens; a last window shorter than 2 is dropped."""
    if ctx < 2:
        raise ValueError(f"context must be at least 2 tokens, got {ctx}")
    out = [tokens[i : i + ctx] for i in range(0, len(tokens), ctx)]
    return [w for w in out if len(w) >= 2]


@dataclass
class LMStats:
    """Running sums over scored positions."""

    nll_sum: float = 0.0
    kld_sum: float = 0.0
    agree: int = 0
    count: int = 0
    has_reference: bool = False

    def update(self, logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        """logits [b, L, V] predicting targets [b, L] (already shifted); ref_logits alike."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.nll_sum -= float(logp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64))
        self.count += targets.numel()
        if ref_logits is not None:
            self.has_reference = True
            ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            self.kld_sum += float(kl.sum(dtype=torch.float64))
            self.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.count)

    @property
    def kld(self) -> float | None:
        return self.kld_sum / self.count if self.has_reference else None

    @property
    def top1_agreement(self) -> float | None:
        return self.agree / self.count if self.has_reference else None
