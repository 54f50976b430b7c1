"""The math of unstructured and N:M pruning for one linear layer: which weights become zero, and (SparseGPT)
how the others change to make up for them.

Weights are [out, in]; ``hessian`` is the layer's input Gram matrix H = 2/n X^T X as GPTQ accumulates it
(`squeeze.passes.gptq_core.HessianAccumulator`), whose diagonal is the input feature's energy.

* magnitude: score |W|, the smallest per layer go (the baseline every paper compares with).
* Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score |W_ij| * ||X_j||_2,
  compared within each output row; no weight update.
* SparseGPT (Frantar & Alistarh 2023): columns are visited left to right in blocks of ``block_size``; in each
  block the weights with the smallest w^2 / [H^-1]_jj^2 are masked (the same share in every block, or N of
  every M inputs), and each pruned weight's error is spread over the columns not yet visited through the
  inverse Hessian's Cholesky factor, exactly as GPTQ spreads rounding errors.

A pattern is a sparsity (the share of zeros, per row for Wanda and SparseGPT, per layer for magnitude) or an
N:M mask: of every M consecutive inputs of a row, N are kept (2:4 keeps half).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.errors import SqueezeError

MAX_SPARSITY = 0.9


@dataclass(frozen=True)
class Pattern:
    """What to remove: ``sparsity`` (0..0.9) unstructured, or ``n`` of every ``m`` inputs kept (N:M)."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.n is None):
            raise SqueezeError("give either a sparsity (e.g. --sparsity 0.5) or an N:M mask (e.g. --mask 2:4)")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= MAX_SPARSITY:
            raise SqueezeError(f"--sparsity must be from 0 to {MAX_SPARSITY}, got {self.sparsity}")
        if self.n is not None and not (self.m is not None and 0 < self.n < self.m):
            raise SqueezeError(f"an N:M mask keeps N of every M weights with 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse_mask(cls, text: str) -> "Pattern":
        """``"2:4"`` -> Pattern(n=2, m=4)."""
        try:
            n, m = (int(v) for v in str(text).split(":"))
        except ValueError:
            raise SqueezeError(f"--mask must look like N:M (e.g. 2:4), got {text!r}") from None
        return cls(n=n, m=m)

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"{self.sparsity:g}"

    @property
    def zero_share(self) -> float:
        return self.sparsity if self.sparsity is not None else 1.0 - self.n / self.m

    def check_columns(self, in_features: int, layer: str) -> None:
        if self.m is not None and in_features % self.m:
            raise SqueezeError(f"{layer}: {in_features} inputs do not split into groups of {self.m} for the "
                               f"{self.name} mask; leave it out (--ignore) or use --sparsity")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in every M consecutive inputs of a row, all but the N highest scores."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, grouped.topk(n, dim=2).indices, True)
    return ~keep.reshape(rows, cols)


def lowest_mask(scores: torch.Tensor, share: float, per_row: bool) -> torch.Tensor:
    """True for the ``share`` of lowest scores, per row or over the whole tensor (ties broken by position)."""
    if per_row:
        k = int(scores.shape[1] * share)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
        return mask
    k = int(scores.numel() * share)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[scores.reshape(-1).topk(k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool) -> torch.Tensor:
    if pattern.n is not None:
        return nm_mask(scores, pattern.n, pattern.m)
    return lowest_mask(scores, pattern.sparsity, per_row)


def input_norms(hessian: torch.Tensor) -> torch.Tensor:
    """||X_j|| up to a constant factor (the same for every j, so rankings are unchanged): sqrt(diag H)."""
    return hessian.diagonal().clamp(min=0).sqrt()


def magnitude_prune(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The pruned weight: |W| lowest per layer (N:M per group of inputs)."""
    w = weight.detach().float()
    return w.masked_fill(pattern_mask(w.abs(), pattern, per_row=False), 0.0)


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The pruned weight: |W_ij| * ||X_j|| lowest per output row (N:M per group of inputs)."""
    w = weight.detach().float()
    return w.masked_fill(pattern_mask(w.abs() * input_norms(hessian).unsqueeze(0), pattern, per_row=True), 0.0)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, block_size: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """The pruned and updated weight (float32, zeros exactly where pruned)."""
    from squeeze.passes.gptq_core import inverse_hessian_cholesky

    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv, _ = inverse_hessian_cholesky(h, damp)  # upper U, (H + damp)^-1 = U^T U
    del h
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        h1 = hinv[i1:i2, i1:i2]
        d = h1.diagonal()
        err1 = torch.zeros_like(w1)
        mask1 = None
        if pattern.n is None:
            mask1 = lowest_mask(w1.pow(2) / d.pow(2).unsqueeze(0), pattern.sparsity, per_row=False)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern.n is not None and i % pattern.m == 0:
                scores = w1[:, i:i + pattern.m].pow(2) / d[i:i + pattern.m].pow(2).unsqueeze(0)
                mask1[:, i:i + pattern.m] = nm_mask(scores, pattern.n, pattern.m)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.masked_fill(pruned | dead.unsqueeze(0), 0.0)


def sparsegpt_mask(pattern: Pattern):
    """SparseGPT's mask choice for a batch of columns inside the GPTQ sweep (`gptq_quantize`'s ``choose_mask``):
    the lowest w^2 / d^2 of the batch's current weights (N:M per group of inputs)."""

    def choose(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return pattern_mask(w.pow(2) / d.pow(2).unsqueeze(0), pattern, per_row=False)

    return choose


def outlier_share(scores: list[torch.Tensor], threshold: float) -> float:
    """OWL's layer outlier ratio: the share of a block's Wanda scores |W_ij| * ||X_j|| (all its layers
    together) above ``threshold`` times their mean (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity")."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / total
    return sum(int((s > threshold * mean).sum()) for s in scores) / total


def owl_sparsities(outliers: list[float], target: float, spread: float) -> list[float]:
    """Per-block sparsity averaging ``target``: blocks with more outliers keep more weights, linearly in their
    outlier share, from target - spread (most outliers) to target + spread (fewest), as OWL's reference does."""
    low, high = min(outliers), max(outliers)
    if high - low <= 0.0:
        return [target] * len(outliers)
    keep = [(o - low) / (high - low) * 2 * spread for o in outliers]
    mean = sum(keep) / len(keep)
    return [min(MAX_SPARSITY, max(0.0, target - (k - mean))) for k in keep]


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())
