"""GPTQ math: Hessian accumulation, damped inverse Cholesky, and the column-by-column solver.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022), Algorithm 1, with the lazy-batch updates,
act-order and static groups of the reference code (IST-DASLab/gptq) and
AutoGPTQ's g_idx convention. The bit format is a `WeightGrid` argument: the
solver asks it for a block's parameters and for the nearest representable
value of each column, and never assumes a particular integer width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from squeeze.errors import SqueezeError
from squeeze.grid import WeightGrid

log = logging.getLogger("squeeze")

MAX_DAMP_RETRIES = 8  # damping grows 10x per retry: 0.01 -> 1e6 x mean diagonal at most


def outlier_token_weights(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights [n] that bring tokens whose energy ||x||^2 exceeds ``cap`` x the median token's
    down to exactly that bound (1 for every other token).

    Attention-sink tokens carry massive activations (SmolLM2-135M: one token in a window of 512 holds
    99.8% of layer 11's down_proj input energy). Unweighted, such a token alone sets the Hessian and with
    it the damping, and GPTQ fits its output while every other token's error grows. Its output error
    matters little downstream: it lands on a residual stream of the same huge norm, which the next
    RMSNorm divides away.
    """
    return capped_token_weights(x.pow(2).sum(dim=1), cap)


def capped_token_weights(energy: torch.Tensor, cap: float) -> torch.Tensor:
    """`outlier_token_weights` from the tokens' energies ||x||^2 [n]."""
    bound = cap * energy.median()
    return torch.where(energy > bound, bound / energy.clamp(min=1e-30), torch.ones_like(energy))


def cap_outlier_tokens(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``x`` [n, in] with each token scaled by the square root of `outlier_token_weights`."""
    return x * outlier_token_weights(x, cap).sqrt().unsqueeze(1)


GRAM_BLOCK_MIN = 256  # narrowest block column of `add_gram_upper`


def add_gram_upper(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += x^T x [in, in] on the block rows of its upper block triangle only (diagonal blocks whole):
    with 4 block columns 10/16 of the full product's flops. `mirror_upper` completes the lower blocks."""
    width = _gram_block(x.shape[1])
    for i in range(0, x.shape[1], width):
        gram[i : i + width, i:].addmm_(x[:, i : i + width].t(), x[:, i:])


def mirror_upper(gram: torch.Tensor) -> None:
    """Fill the lower off-diagonal blocks of a matrix `add_gram_upper` accumulated, in place."""
    width = _gram_block(gram.shape[0])
    for i in range(0, gram.shape[0], width):
        gram[i + width :, i : i + width] = gram[i : i + width, i + width :].t()


def _gram_block(n: int) -> int:
    return max(GRAM_BLOCK_MIN, -(-n // 4))


class HessianAccumulator:
    """Running H = 2/n * sum(x x^T) over the inputs x [.., in_features] a layer sees.

    ``token_cap``: see `outlier_token_weights` (applied per batch of inputs); None keeps every token as is.
    """

    def __init__(self, in_features: int, device=None, token_cap: float | None = None):
        self._gram = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self._mirrored = True
        self.energy = torch.zeros(in_features, device=device, dtype=torch.float32)  # diag(H) without token caps
        self.count = 0
        self.token_cap = token_cap

    @property
    def hessian(self) -> torch.Tensor:
        """H so far (the running buffer itself, its lower blocks filled in from the upper ones)."""
        if not self._mirrored:
            mirror_upper(self._gram)
            self._mirrored = True
        return self._gram

    def _scaled(self, x: torch.Tensor, *paired: torch.Tensor) -> list[torch.Tensor]:
        """Take in a batch: rescale the running sums to the new count and return ``x`` (and ``paired``
        inputs of the same tokens) weighted for adding, token caps (from ``x``) included."""
        rows = [t.detach().reshape(-1, t.shape[-1]).float() for t in (x, *paired)]
        squares = rows[0].square()
        energy = squares.sum(0)
        token_energy = squares.sum(1)
        del squares
        n = rows[0].shape[0]
        for total in self._sums():
            total.mul_(self.count / (self.count + n))
        self.count += n
        self.energy.add_(energy, alpha=2.0 / self.count)
        factor = math.sqrt(2.0 / self.count)
        if self.token_cap is None:
            return [r * factor for r in rows]
        weight = capped_token_weights(token_energy, self.token_cap).sqrt_().mul_(factor).unsqueeze(1)
        return [r * weight for r in rows]

    def _sums(self) -> tuple[torch.Tensor, ...]:
        return (self._gram, self.energy)

    def _add_gram(self, x: torch.Tensor) -> None:
        add_gram_upper(self._gram, x)
        self._mirrored = False

    def add(self, x: torch.Tensor) -> None:
        (x,) = self._scaled(x)
        self._add_gram(x)

    def combine(self, dp) -> None:
        """Every rank's statistics in one (`squeeze.distributed.DataParallel`): count-weighted means of the
        running sums, so H is what one process would have accumulated over all ranks' tokens."""
        if dp is None:
            return
        total = dp.sum_int(self.count)
        for t in self._sums():
            dp.sum_(t.mul_(self.count)).div_(max(total, 1))
        self.count = total


class CrossAccumulator(HessianAccumulator):
    """H = 2/n sum(x x^T) and C = 2/n sum(x_ref x^T) for paired inputs: x the quantized model's, x_ref the
    float model's for the same token (asymmetric calibration, `float_target_weight`)."""

    def __init__(self, in_features: int, device=None, token_cap: float | None = None):
        super().__init__(in_features, device, token_cap)
        self.cross = torch.zeros_like(self._gram)

    def _sums(self) -> tuple[torch.Tensor, ...]:
        return (self._gram, self.energy, self.cross)

    def add_pair(self, x: torch.Tensor, x_ref: torch.Tensor) -> None:
        x, x_ref = self._scaled(x, x_ref)
        self._add_gram(x)
        self.cross.addmm_(x_ref.t(), x)


def float_target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight whose outputs on the quantized model's inputs best match the float model's outputs.

    min_Q sum_t ||Q x_t - W x_ref_t||^2 = ||(Q - W') X||^2 + const with W' = W C H^-1 (C = sum x_ref x^T,
    H = sum x x^T), so GPTQ on W' with H minimises the error against the float model's outputs, not against
    the float layer applied to already-perturbed inputs (GPTAQ, Li et al. 2025, in closed form). Written as
    W + W (C - H)(H + damp I)^-1 so that equal inputs give W back exactly.
    """
    W = weight.detach().float()
    n = hessian.shape[0]
    lam = damp * float(torch.diag(hessian).mean().clamp(min=1e-12))
    damped = hessian + lam * torch.eye(n, device=hessian.device, dtype=hessian.dtype)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return W
    correction = torch.cholesky_solve((cross - hessian).t() @ W.t(), chol).t()  # W (C - H) (H + lam I)^-1
    return W + correction


def check_shrink(shrink: float) -> None:
    """Raise unless ``shrink`` is a valid `shrink_to_diagonal` fraction (the --shrink flag)."""
    if not 0.0 <= shrink <= 1.0:
        raise SqueezeError(f"--shrink must be in [0, 1] (0: the full Hessian, 1: its diagonal), got {shrink}")


def shrink_to_diagonal(hessian: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) H + shrink diag(H): the calibration inputs' correlations, trusted only in part.

    GPTQ moves each rounding error onto the columns that correlate with it in the calibration inputs. Off
    the calibration domain those correlations do not hold, while the diagonal (each input's energy, what
    llama.cpp's imatrix keeps) does; shrink = 1 leaves plain rounding with importance-weighted scales.
    Covariance shrinkage towards the diagonal, as in Ledoit & Wolf (2004).
    """
    if shrink == 0.0:
        return hessian
    return (1.0 - shrink) * hessian + shrink * torch.diag(torch.diag(hessian))


def shrink_to_diagonal_(hessian: torch.Tensor, shrink: float) -> torch.Tensor:
    """`shrink_to_diagonal` in place (the same floating-point result), for matrices too large to copy."""
    if shrink == 0.0:
        return hessian
    diagonal = hessian.diagonal().clone()
    hessian.mul_(1.0 - shrink)
    hessian.diagonal().copy_((1.0 - shrink) * diagonal + shrink * diagonal)
    return hessian


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, and the damping actually used.

    Computed without forming the inverse: with J the order-reversing permutation and J H J = L L^T,
    H = (J L J)(J L J)^T with J L J upper triangular, so U = (J L J)^-1 = J L^-1 J: one Cholesky and one
    triangular solve (LAPACK's potri, which inverting through the inverse needs, ran up to 70x slower here).
    If the factorisation fails (H not positive definite in floating point) the damping is raised tenfold
    and the failure logged; it never returns NaN (an overflowing factor is an error).
    """
    return inverse_cholesky_of_flipped([hessian.flip(0, 1)], damp)


def inverse_cholesky_of_flipped(holder: list[torch.Tensor], damp: float) -> tuple[torch.Tensor, float]:
    """`inverse_hessian_cholesky` given J H J, the Hessian with its order reversed, as the one item of
    ``holder``: it is taken out and damped in place, so that it is freed before the triangular solve (n x n
    matrices are the solver's memory; the caller keeps no name for it)."""
    flipped = holder.pop()
    n = flipped.shape[0]
    mean_diag = float(torch.diag(flipped).mean().clamp(min=1e-12))
    diagonal = flipped.diagonal().clone()
    for _ in range(MAX_DAMP_RETRIES + 1):
        flipped.diagonal().copy_(diagonal + damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            del flipped
            eye = torch.eye(n, device=lower.device, dtype=lower.dtype)
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            del lower, eye
            upper = inverse.flip(0, 1)
            del inverse
            if not bool(torch.isfinite(upper).all()):  # L has a positive diagonal: only overflow gets here
                raise SqueezeError("GPTQ: the inverse Hessian factor overflows; check the calibration data "
                                   "(--calib) for extreme activations")
            return upper, damp
        log.warning("GPTQ: Cholesky factorisation failed at damp=%g; retrying with damp=%g", damp, damp * 10)
        damp *= 10
    raise SqueezeError(f"GPTQ: the Hessian is not positive definite even with damp={damp / 10:g}; "
                       "check the calibration data (--calib) for NaN/inf activations")


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [rows, cols], original column order
    values: torch.Tensor  # float32 [rows, cols], the dequantized weight
    params: list  # grid parameters per group, indexed by group id
    g_idx: torch.Tensor  # int32 [cols], group of each column (original order)
    damp: float  # damping used (raised above the requested one if Cholesky failed)


PRUNED_MIN_SHARE = 0.01  # a layer with this share of exact zeros is taken as pruned: its zeros are kept


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: WeightGrid,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    weighted_fit: bool = False,
    shrink: float = 0.0,
    importance: torch.Tensor | None = None,
    choose_mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mask_span: int | None = None,
) -> GPTQResult:
    """Quantize ``weight`` [rows, cols] onto ``grid``, minimising ||(W - Q) X||^2 with H ~ X X^T.

    ``weighted_fit``: each group's grid parameters are fitted with the Hessian diagonal as column
    importance (`WeightGrid.fit`), instead of on the group's range alone.
    ``shrink``: the error updates use `shrink_to_diagonal` (H, shrink); 1 gives importance-weighted rounding.
    ``importance`` [cols]: the weighted fit's column importance instead of H's diagonal.

    A pruned layer (at least `PRUNED_MIN_SHARE` of its weights exactly zero) keeps its zeros: they are rounded
    to the grid's value nearest 0 (0 itself on integer grids) whatever the updates did to them, and what that
    costs is passed on to the columns not yet quantized, as SparseGPT does for its masks. A dense layer's few
    exact zeros (SmolLM2 dequantized from Q4_1: at most 0.07% of a layer) are weights like any other.

    ``choose_mask(w, d)`` prunes in the same sweep (SparseGPT's joint mode, Frantar & Alistarh 2023, section
    3.5): every ``mask_span`` columns (None: each batch) it gets their current, error-updated weights [rows,
    span] and the inverse Hessian factor's diagonal [span], and returns their mask of weights to zero, which
    are then kept at zero as above. The columns stay in their order (no act-order), so N:M groups stay intact.
    """
    W = weight.detach().float().clone()
    pruned = W == 0
    pruned = pruned if float(pruned.float().mean()) >= PRUNED_MIN_SHARE else None
    if choose_mask is not None:
        if act_order:
            raise SqueezeError("pruning inside the GPTQ sweep keeps the columns in order; turn act_order off")
        pruned = torch.zeros_like(W, dtype=torch.bool)
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = grid.block_size(cols)
    n_groups = -(-cols // gs)
    params: list = [None] * n_groups
    if weighted_fit:
        importance = torch.diag(H) if importance is None else importance.float().to(H.device)
    else:
        importance = None

    def fit(w: torch.Tensor, columns: slice, order: torch.Tensor | None = None):
        if importance is None:
            return grid.fit(w)
        return grid.fit(w, (importance if order is None else importance[order])[columns])

    if static_groups:  # groups fitted once on the original weight, in original column order
        for g in range(n_groups):
            params[g] = fit(W[:, g * gs : (g + 1) * gs], slice(g * gs, (g + 1) * gs))
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W = W[:, perm]
    prunedT = pruned[:, perm].t().contiguous() if pruned is not None else None
    reverse = perm.flip(0)  # H in the reversed permuted order is what the Cholesky step factors
    holder = [H[reverse]]
    del H
    holder[0] = shrink_to_diagonal_(holder[0][:, reverse], shrink)
    Hinv, damp_used = inverse_cholesky_of_flipped(holder, damp)

    # Column-major work: column j of W is the contiguous row WT[j], so the per-column rank-1 update and the
    # per-batch update run in place as BLAS ger/gemm (the row-major outer-product subtraction was most of
    # the solver's time).
    WT = W.t().contiguous()
    # Groups never straddle a lazy batch: a group is fitted on fully updated columns.
    B = cols if gs >= cols else -(-block_size // gs) * gs
    codesT = torch.zeros(cols, rows, dtype=torch.uint8, device=W.device)
    QT = torch.zeros_like(WT)
    group_of = torch.empty(cols, dtype=torch.long, device=W.device)  # per permuted column
    order = perm.tolist()
    current = None
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1, Hinv1 = WT[i1:i2], Hinv[i1:i2, i1:i2]  # W1 is a view: its updates land in WT
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups:
                g, offset = divmod(order[col], gs)
                current = params[g]
            else:
                g, offset = divmod(col, gs)
                if offset == 0:
                    current = params[g] = fit(W1[i : i + gs].t(), slice(col, col + gs), perm)
            group_of[col] = g
            if choose_mask is not None and i % (mask_span or B) == 0:
                j2 = min(i + (mask_span or B), i2 - i1)
                prunedT[col : i1 + j2] = choose_mask(W1[i:j2].t(), Hinv1.diagonal()[i:j2]).t()
            c, q = grid.nearest(W1[i].unsqueeze(1), current, offset)
            if prunedT is not None and bool(prunedT[col].any()):
                c0, q0 = grid.nearest(torch.zeros_like(W1[i]).unsqueeze(1), current, offset)
                keep = prunedT[col].unsqueeze(1)
                c, q = torch.where(keep, c0, c), torch.where(keep, q0, q)
            codesT[col], QT[col] = c[:, 0], q[:, 0]
            err = torch.sub(W1[i], q[:, 0]).div_(Hinv1[i, i])
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1.0)
            Err1[i] = err
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)

    inv = torch.argsort(perm)
    g_idx = group_of[inv].to(torch.int32)
    return GPTQResult(codesT[inv].t().contiguous(), QT[inv].t().contiguous(), params, g_idx, damp_used)


def output_rel_error(weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(Q - W) X||^2 / ||W X||^2 on the inputs summarised by H ~ X X^T (relative output MSE)."""
    W, D = weight.float(), values.float() - weight.float()
    num = torch.einsum("ij,jk,ik->", D, hessian, D)
    den = torch.einsum("ij,jk,ik->", W, hessian, W)
    return float(num / den.clamp(min=1e-30))
