"""Vectorised numpy K-quant block codecs (Q2_K .. Q6_K) plus the numeric helpers shared by all codecs.

Every quantizer follows llama.cpp's reference quantizer (``quantize_row_qN_K_ref`` in ggml-quants.c),
re-expressed over all super-blocks at once.  All arithmetic is float32 and every reduction runs in the
same sequential order as the C loops, so the produced bytes are bit-identical to llama.cpp's (for finite
inputs, on builds without FMA contraction, which is how ggml-base is compiled on x86-64 baseline).

All functions here work on flattened blocks: ``blocks`` is ``(N, 256)`` float32, and a quantized block set is
the tuple ``Parts = (codes, d, dmin, scales, mins)``:

* ``codes``  uint8 ``(N, 256)``: stored level per weight (weight level = code - format zero point),
* ``d``      float16 ``(N,)``: super-block scale,
* ``dmin``   float16 ``(N,)`` or None: super-block scale of the sub-block mins,
* ``scales`` int16 ``(N, n_sub)``: signed, effective integer sub-block scales,
* ``mins``   int16 ``(N, n_sub)`` or None: integer sub-block mins.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)

Parts = tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]


# ----------------------------------------------------------------------------------------- helpers


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even via the 1.5*2^23 trick, emulated bit-exactly (int32)."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.asarray(v, dtype=F32) + F32(12582912.0)
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Sum over the FIRST axis strictly in order from 0.0, like a plain C accumulation loop."""
    acc = np.zeros(terms.shape[1:], dtype=F32)
    for row in terms:
        acc += row
    return acc


def to_f16(v: np.ndarray) -> np.ndarray:
    """Round float32 to float16 (round to nearest even, like GGML_FP32_TO_FP16)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16)


def f16_bytes(d: np.ndarray) -> np.ndarray:
    """float16 ``(N,)`` -> its little-endian bytes ``(N, 2)``."""
    return np.ascontiguousarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def first_pick(x: np.ndarray, arg: Callable[..., np.ndarray], axis: int = -1) -> np.ndarray:
    """x at ``arg(x)`` along axis: C's ``if (v < m) m = v`` keeps the first of equal values (-0.0 vs 0.0)."""
    idx = np.expand_dims(arg(x, axis=axis), axis)
    return np.squeeze(np.take_along_axis(x, idx, axis=axis), axis)


def f16_at(raw: np.ndarray, offset: int) -> np.ndarray:
    """float16 ``(N,)`` stored at byte ``offset`` of each row of ``raw (N, type_size)``."""
    return raw[:, offset:offset + 2].copy().view(np.float16)[:, 0]


def signed_absmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``max = 0; amax = 0; for v: if |v| > amax: amax = |v|, max = v`` along axis (+0.0 if all zero)."""
    idx = np.expand_dims(np.argmax(np.abs(x), axis=axis), axis)
    v = np.squeeze(np.take_along_axis(x, idx, axis=axis), axis)
    return np.where(v == 0, F32(0), v)


def _first_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; for s in v: if s > m: m = s`` over the last axis."""
    m = np.max(v, axis=-1)
    return np.where(m > 0, m, F32(0))


# ------------------------------------------------------------------------------ scale searches


def make_qx_quants(x: np.ndarray, nmax: int, w: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted symmetric scale search of ``make_qx_quants(rmse_type=1)``: weights ``w`` (an imatrix's,
    as ``qw``), or x^2 without (``qw=NULL``).

    x, w: (n, M) float32, one group per column.  Returns (scale (M,), L (n, M) int32 in [0, 2*nmax-1]).
    """
    mx = signed_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe = np.where(zero, F32(1), mx)
    w = x * x if w is None else w
    wx = w * x

    def trial(iscale: np.ndarray):
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        return lv + nmax, seqsum(wx * lf), seqsum(w * lf * lf)

    L, sumlx, suml2 = trial(F32(-nmax) / safe)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            Lc, slx, sl2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / safe)
            upd = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(upd, Lc, L)
            scale = np.where(upd, slx / sl2, scale)
            best = np.where(upd, scale * slx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(do_rmse=true)``: weighted symmetric fit refined by coordinate descent.

    x: (n, M) float32, one group per column.  Returns (scale (M,), L (n, M) int32 in [0, 2*nmax-1]).
    """
    mx = signed_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    L = np.clip(nearest_int((F32(-nmax) / np.where(zero, F32(1), mx)) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.astype(F32)
    sumlx, suml2 = seqsum(wx * lf), seqsum(w * lf * lf)
    # The C loop stops after a sweep without changes; a further sweep from the same state changes
    # nothing either, so running all 5 sweeps everywhere gives the same result.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            for i in range(x.shape[0]):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w[i] * li * li
                new_l = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                slx2 = slx + wx[i] * nf
                sl22 = sl2 + w[i] * nf * nf
                upd = ((slx > 0) & (new_l != L[i]) & (sl22 > 0)
                       & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                L[i] = np.where(upd, new_l, L[i])
                sumlx = np.where(upd, slx2, sumlx)
                suml2 = np.where(upd, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search of ``make_qkx2_quants``.

    x, w: (n, M) float32, one group per column.
    Returns (scale (M,), the_min (M,) >= 0, L (n, M) int32 in [0, nmax]).
    """
    mn = first_pick(x, np.argmin, axis=0)
    mn = np.where(mn > 0, F32(0), mn)
    mx = first_pick(x, np.argmax, axis=0)
    sum_w, sum_x = w[0].copy(), w[0] * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]
    flat = mx == mn

    def err(scale, L, m):
        diff = scale * L.astype(F32) + m - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / np.where(flat, F32(1), mx - mn)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
    best = err(scale, L, mn)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            # `min` is updated inside the C loop, so range and offset follow the best fit so far
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(flat, F32(1), mx - mn)
            La = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
            lf = La.astype(F32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = err(this_scale, La, this_min)
            upd = (D > 0) & (cur < best) & ~flat
            L = np.where(upd, La, L)
            best = np.where(upd, cur, best)
            scale = np.where(upd, this_scale, scale)
            mn = np.where(upd, this_min, mn)
    return np.where(flat, F32(0), scale), -mn, np.where(flat, 0, L)


def imatrix_weights(xt: np.ndarray, qw: np.ndarray, per_block: int, factor: float) -> np.ndarray:
    """llama.cpp's weights given an importance matrix: qw * sqrt(sigma2 + x^2), with sigma2 = factor x the
    mean square of each block of ``per_block`` sub-blocks (columns of ``xt``, sums in C's order)."""
    sq = seqsum(xt * xt).reshape(-1, per_block)
    total = np.cumsum(sq, axis=1, dtype=F32)[:, -1]
    sigma2 = np.repeat(F32(factor) * total / F32(xt.shape[0] * per_block), per_block)
    return (qw * np.sqrt(sigma2[None, :] + xt * xt)).astype(F32)


# ------------------------------------------------------------------------------ bit packing helpers


def _pack_crumbs(L: np.ndarray) -> np.ndarray:
    """(N, 256) 2-bit values -> (N, 64): byte 32*h + l holds L[128h + l + 32k] at bit 2k."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _unpack_crumbs(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def _pack_nibbles64(L: np.ndarray) -> np.ndarray:
    """(N, 256) 4-bit values -> (N, 128): byte 32*k + l holds L[64k + l] | L[64k + l + 32] << 4."""
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _unpack_nibbles64(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 15).reshape(-1, QK_K)


def _pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4 layout)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | (sc[:, 4:8] >> 4) << 6
    out[:, 4:8] = (m[:, 0:4] & 63) | (m[:, 4:8] >> 4) << 6
    out[:, 8:12] = (sc[:, 4:8] & 15) | (m[:, 4:8] & 15) << 4
    return out


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6) << 4], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
    return sc.astype(np.int16), m.astype(np.int16)


def _groups(x: np.ndarray, size: int) -> np.ndarray:
    """(N, 256) blocks -> (size, N * 256 // size): one sub-block per column, so sums run over rows."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: Optional[np.ndarray],
                m: Optional[np.ndarray], lo: int, hi: int, offset: int) -> np.ndarray:
    """Final rounding against the stored scales; sub-blocks whose scale is 0 keep their search codes.

    L is the search result in group layout (size, n_groups)."""
    n_sub = sc.shape[1]
    xs = x.reshape(x.shape[0], n_sub, -1)
    dd = d.astype(F32)[:, None] * sc.astype(F32)
    v = xs
    if dmin is not None:
        v = xs + (dmin.astype(F32)[:, None] * m.astype(F32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nearest_int(v / np.where(dd == 0, F32(1), dd)[..., None]), lo, hi) + offset
    return np.where((dd == 0)[..., None], L.T.reshape(xs.shape), new).reshape(x.shape).astype(np.uint8)


# ------------------------------------------------------------------------------------------ Q2_K


def quantize_q2_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> Parts:
    """``quantize_row_q2_K_ref``: 16 sub-blocks of 16, 2-bit codes, 4-bit scales and mins. With importance
    ``qw`` (as x), the (scale, min) searches weigh each weight by `imatrix_weights` (least squares)."""
    n = x.shape[0]
    xt = _groups(x, 16)
    if qw is None:
        scales, mins, L = make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    else:
        scales, mins, L = make_qkx2_quants(xt, imatrix_weights(xt, _groups(qw, 16), 16, 1.0), 3, -0.5, 0.1, 15, False)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = _first_max(scales), _first_max(mins)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = nearest_int((F32(15) / max_scale)[:, None] * scales)
        lm = nearest_int((F32(15) / max_min)[:, None] * mins)
    byte = np.where((max_scale > 0)[:, None], ls, 0) & 0xFF
    byte = np.where((max_min > 0)[:, None], byte | (lm << 4), byte) & 0xFF
    d = np.where(max_scale > 0, to_f16(max_scale / F32(15)), np.float16(0))
    dmin = np.where(max_min > 0, to_f16(max_min / F32(15)), np.float16(0))
    sc, m = (byte & 15).astype(np.int16), (byte >> 4).astype(np.int16)
    return _requantize(x, L, d, sc, dmin, m, 0, 3, 0), d, dmin, sc, m


def pack_q2_k(p: Parts) -> np.ndarray:
    codes, d, dmin, sc, m = p
    scales = (sc.astype(np.uint8) & 15) | (m.astype(np.uint8) << 4)
    return np.concatenate([scales, _pack_crumbs(codes), f16_bytes(d), f16_bytes(dmin)], axis=1)


def unpack_q2_k(raw: np.ndarray) -> Parts:
    s = raw[:, 0:16]
    sc, m = (s & 15).astype(np.int16), (s >> 4).astype(np.int16)
    return _unpack_crumbs(raw[:, 16:80]), f16_at(raw, 80), f16_at(raw, 82), sc, m


# ------------------------------------------------------------------------------------------ Q3_K


def quantize_q3_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> Parts:
    """``quantize_row_q3_K_ref``: 16 sub-blocks of 16, 3-bit codes, signed 6-bit scales. With importance
    ``qw``, each sub-block's scale comes from make_qx_quants with `imatrix_weights` (quantize_row_q3_K_impl)."""
    n = x.shape[0]
    xt = _groups(x, 16)
    if qw is None:
        scales, L = make_q3_quants(xt, 4)
    else:
        scales, L = make_qx_quants(xt, 4, imatrix_weights(xt, _groups(qw, 16), 16, 2.0))
    scales = scales.reshape(n, 16)
    max_scale = signed_absmax(scales)
    nz = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / np.where(nz, max_scale, F32(1))
        l6 = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int16) + 32
        d = np.where(nz, to_f16(F32(1) / iscale), np.float16(0))
    sc = np.where(nz[:, None], l6, 0).astype(np.int16) - 32
    return _requantize(x, L, d, sc, None, None, -4, 3, 4), d, None, sc, None


def pack_q3_k(p: Parts) -> np.ndarray:
    codes, d, _, sc, _ = p
    n = codes.shape[0]
    hmask = np.zeros((n, 32), np.uint8)
    high = (codes > 3).reshape(n, 8, 32).astype(np.uint8)
    for bit in range(8):
        hmask |= high[:, bit] << bit
    l6 = (sc + 32).astype(np.uint8)
    scales = np.empty((n, 12), np.uint8)
    scales[:, 0:8] = (l6[:, 0:8] & 15) | (l6[:, 8:16] & 15) << 4
    hi = (l6 >> 4).reshape(n, 4, 4)  # [j // 4, j % 4]
    scales[:, 8:12] = hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6
    return np.concatenate([hmask, _pack_crumbs(codes & 3), scales, f16_bytes(d)], axis=1)


def unpack_q3_k(raw: np.ndarray) -> Parts:
    n = raw.shape[0]
    hmask, s = raw[:, 0:32], raw[:, 96:108]
    high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    codes = _unpack_crumbs(raw[:, 32:96]) | (high.reshape(n, QK_K) << 2)
    low = np.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=1)
    hi = ((s[:, 8:12][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3).reshape(n, 16)
    sc = (low | hi << 4).astype(np.int16) - 32
    return codes, f16_at(raw, 108), None, sc, None


# ------------------------------------------------------------------------------------ Q4_K / Q5_K


def _quantize_q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int, qw: Optional[np.ndarray] = None) -> Parts:
    n = x.shape[0]
    xt = _groups(x, 32)
    if qw is None:
        weights = np.sqrt(seqsum(xt * xt) / F32(32)) + np.abs(xt)
    else:
        weights = imatrix_weights(xt, _groups(qw, 32), 8, 2.0)
    scales, mins, L = make_qkx2_quants(xt, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = _first_max(scales), _first_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.int16)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.int16)
    d, dmin = to_f16(max_scale / F32(63)), to_f16(max_min / F32(63))
    return _requantize(x, L, d, ls, dmin, lm, 0, nmax, 0), d, dmin, ls, lm


def quantize_q4_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> Parts:
    """``quantize_row_q4_K_ref``: 8 sub-blocks of 32, 4-bit codes, 6-bit scales and mins; with importance
    ``qw``, the (scale, min) searches weigh each weight by `imatrix_weights`."""
    return _quantize_q45_k(x, 15, -1.0, 20, qw)


def quantize_q5_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> Parts:
    """``quantize_row_q5_K_ref``: 8 sub-blocks of 32, 5-bit codes, 6-bit scales and mins (``qw`` as Q4_K)."""
    return _quantize_q45_k(x, 31, -0.5, 15, qw)


def _head(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
    return [f16_bytes(d), f16_bytes(dmin), _pack_scale_min_k4(sc, m)]


def pack_q4_k(p: Parts) -> np.ndarray:
    codes, d, dmin, sc, m = p
    return np.concatenate(_head(d, dmin, sc, m) + [_pack_nibbles64(codes)], axis=1)


def unpack_q4_k(raw: np.ndarray) -> Parts:
    sc, m = _unpack_scale_min_k4(raw[:, 4:16])
    d, dmin = f16_at(raw, 0), f16_at(raw, 2)
    return _unpack_nibbles64(raw[:, 16:144]), d, dmin, sc, m


def pack_q5_k(p: Parts) -> np.ndarray:
    codes, d, dmin, sc, m = p
    high = (codes >> 4).reshape(-1, 8, 32).astype(np.uint8)  # bit k of qh[j] <- L[32k + j] >= 16
    qh = np.zeros((codes.shape[0], 32), np.uint8)
    for k in range(8):
        qh |= high[:, k] << k
    return np.concatenate(_head(d, dmin, sc, m) + [qh, _pack_nibbles64(codes & 15)], axis=1)


def unpack_q5_k(raw: np.ndarray) -> Parts:
    sc, m = _unpack_scale_min_k4(raw[:, 4:16])
    d, dmin = f16_at(raw, 0), f16_at(raw, 2)
    high = (raw[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _unpack_nibbles64(raw[:, 48:176]) | (high.reshape(-1, QK_K) << 4), d, dmin, sc, m


# ------------------------------------------------------------------------------------------ Q6_K


def quantize_q6_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> Parts:
    """``quantize_row_q6_K_ref``: 16 sub-blocks of 16, 6-bit codes, int8 scales; with importance ``qw``,
    the sub-block scale search weighs each weight by `imatrix_weights` instead of x^2."""
    n = x.shape[0]
    xt = _groups(x, 16)
    scales, L = make_qx_quants(xt, 32, None if qw is None else imatrix_weights(xt, _groups(qw, 16), 16, 2.0))
    scales = scales.reshape(n, 16)
    max_scale = signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d = np.where(zero, np.float16(0), to_f16(F32(1) / iscale))
    sc = np.where(zero[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * scales))).astype(np.int8)
    codes = _requantize(x, L, d, sc.astype(np.int16), None, None, -32, 31, 32)
    return np.where(zero[:, None], 0, codes).astype(np.uint8), d, None, sc.astype(np.int16), None


def pack_q6_k(p: Parts) -> np.ndarray:
    codes, d, _, sc, _ = p
    q = codes.reshape(-1, 2, 4, 32).astype(np.uint8)  # [half, quarter, l]
    lo, hi = q & 15, q >> 4
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=2)
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           f16_bytes(d)], axis=1)


def unpack_q6_k(raw: np.ndarray) -> Parts:
    ql = raw[:, 0:128].reshape(-1, 2, 2, 32)  # [half, first/second 32 bytes, l]
    qh = raw[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    lo = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    codes = (lo | (qh & 3) << 4).reshape(-1, QK_K)
    sc = raw[:, 192:208].copy().view(np.int8).astype(np.int16)
    return codes, f16_at(raw, 208), None, sc, None
