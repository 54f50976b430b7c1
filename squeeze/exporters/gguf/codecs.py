"""GGUF (llama.cpp / ggml) tensor codecs in vectorised numpy.

``FORMATS`` describes each supported ggml type (type id, weights per block, bytes per block, code grid) and
``CODECS`` maps a type name to a :class:`Codec` that turns float32 rows ``(..., cols)`` into GGUF bytes
``(..., n_blocks * type_size)`` and back.  Quantizers reproduce llama.cpp's reference quantizers
(``quantize_row_*_ref`` in ggml-quants.c, which is what ``ggml_quantize_chunk`` runs without an imatrix)
including their float32 rounding, so the bytes match llama.cpp's.

For calibrated quantization (e.g. GPTQ on the GGUF grid) the codec is split into pure steps::

    qb = quantize_blocks(x, "Q4_K")   # integer codes + quantized (sub-)block scales/mins
    step, bias = group_params(qb)     # the grid: weight = step * (code - fmt.zero) + bias, per group
    qb = dataclasses.replace(qb, codes=nearest_codes(x2, qb))  # or codes chosen by GPTQ
    raw = pack(qb)                    # bytes, without re-rounding anything
    unpack(raw, "Q4_K")               # the same fields as qb again
    y = dequantize_blocks(qb)         # exactly what llama.cpp's dequantize_row_* gives

Inputs are assumed finite; NaN/inf give whatever the emulated C code gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import kquants as kq
from .kquants import F32, Parts, f16_at, f16_bytes, first_pick, signed_absmax, to_f16


@dataclass(frozen=True)
class GGMLFormat:
    """One ggml tensor type: ids/sizes as in ggml.h and the shape of its code grid."""

    name: str
    type_id: int  # enum ggml_type / gguf.GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    bits: int = 0  # bits per code; 0 for float types
    zero: int = 0  # code offset: integer level = code - zero
    group_size: int = 0  # weights sharing one scale (the sub-block for K-quants)
    has_min: bool = False  # affine grid (block min) rather than symmetric

    @property
    def is_float(self) -> bool:
        return self.bits == 0

    @property
    def qmax(self) -> int:
        """Largest code value."""
        return (1 << self.bits) - 1

    @property
    def n_groups(self) -> int:
        """Scale groups per block."""
        return self.block_size // self.group_size if self.group_size else 1


FORMATS: dict[str, GGMLFormat] = {f.name: f for f in (
    GGMLFormat("F32", 0, 1, 4),
    GGMLFormat("F16", 1, 1, 2),
    GGMLFormat("BF16", 30, 1, 2),
    GGMLFormat("Q4_0", 2, 32, 18, bits=4, zero=8, group_size=32),
    GGMLFormat("Q4_1", 3, 32, 20, bits=4, group_size=32, has_min=True),
    GGMLFormat("Q5_0", 6, 32, 22, bits=5, zero=16, group_size=32),
    GGMLFormat("Q5_1", 7, 32, 24, bits=5, group_size=32, has_min=True),
    GGMLFormat("Q8_0", 8, 32, 34, bits=8, zero=128, group_size=32),
    GGMLFormat("Q2_K", 10, 256, 84, bits=2, group_size=16, has_min=True),
    GGMLFormat("Q3_K", 11, 256, 110, bits=3, zero=4, group_size=16),
    GGMLFormat("Q4_K", 12, 256, 144, bits=4, group_size=32, has_min=True),
    GGMLFormat("Q5_K", 13, 256, 176, bits=5, group_size=32, has_min=True),
    GGMLFormat("Q6_K", 14, 256, 210, bits=6, zero=32, group_size=16),
)}


def get_format(name: str) -> GGMLFormat:
    """Format by ggml type name; ValueError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown GGUF type {name!r}; known types: {', '.join(FORMATS)}") from None


@dataclass(frozen=True, eq=False)
class QuantizedBlocks:
    """Integer codes and quantized scales of a tensor, exactly as stored in its GGUF blocks.

    codes:  uint8 (..., n_blocks, block_size), stored level per weight (level = code - fmt.zero).
    d:      float16 (..., n_blocks), block scale (K-quants: super-block scale).
    dmin:   float16 (..., n_blocks) or None, Q4_1/Q5_1 block min ``m``; K-quants super-block min scale.
    scales: int16 (..., n_blocks, n_sub) or None, K-quant signed integer sub-block scales.
    mins:   int16 (..., n_blocks, n_sub) or None, K-quant integer sub-block mins (Q2_K, Q4_K, Q5_K).
    """

    qtype: str
    codes: np.ndarray
    d: np.ndarray
    dmin: Optional[np.ndarray] = None
    scales: Optional[np.ndarray] = None
    mins: Optional[np.ndarray] = None

    @property
    def fmt(self) -> GGMLFormat:
        return get_format(self.qtype)


# ------------------------------------------------------------------------- legacy 32-weight blocks


def _inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _quantize_sym(x: np.ndarray, half: int, qw: Optional[np.ndarray] = None) -> Parts:
    """quantize_row_q4_0_ref (half=8) / q5_0_ref (half=16): scale from the signed absmax; with importance
    ``qw`` (as x), llama.cpp's imatrix fit (`quantize_sym_weighted`)."""
    if qw is not None:
        codes, d = quantize_sym_weighted(x, qw, half)
        return codes, d, None, None, None
    d = signed_absmax(x) / F32(-half)
    t = np.trunc(x * _inverse(d)[:, None] + F32(half + 0.5)).astype(np.int32).astype(np.int8)
    return np.minimum(2 * half - 1, t).astype(np.uint8), to_f16(d), None, None, None


GROUP_MAX_EPS = 1e-15


def quantize_sym_weighted(x: np.ndarray, importance: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (half=8) / Q5_0 (half=16) blocks as llama.cpp fits them with an imatrix (quantize_row_q4_0_impl:
    make_qx_quants with weights importance * sqrt(sigma2 + x^2), sigma2 the mean square of the block).

    x: (N, block) float32, importance: (block,) or (N, block), >= 0. Returns (codes uint8 (N, block), d
    float16 (N,)).
    """
    x = np.ascontiguousarray(x, dtype=F32)

    def total(a):  # float32 sums in C's order (numpy's pairwise sums round differently)
        return np.cumsum(a, axis=1, dtype=F32)[:, -1]

    sigma2 = (total(x * x) / F32(x.shape[1]))[:, None]
    w = np.broadcast_to(importance.astype(F32), x.shape) * np.sqrt(sigma2 + x * x)
    mx = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
    live = np.abs(mx) >= GROUP_MAX_EPS
    safe_max = np.where(live, mx, F32(1))

    def levels(iscale):
        return np.clip(np.round(iscale[:, None] * x), -half, half - 1)

    levels_best = levels(-F32(half) / safe_max)
    sumlx, suml2 = total(w * x * levels_best), total(w * levels_best * levels_best)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv = levels(-(F32(half) + F32(0.1) * step) / safe_max)
        sumlx, suml2 = total(w * x * lv), total(w * lv * lv)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1), scale).astype(F32)
        best = np.where(better, scale * sumlx, best)
        levels_best = np.where(better[:, None], lv, levels_best)
    codes = np.where(live[:, None], levels_best + half, 0).astype(np.uint8)  # an all-zero block: codes 0
    return codes, to_f16(np.where(live, scale, 0).astype(F32))


# types whose blocks llama.cpp fits exactly as quantize_sym_weighted does given an imatrix
WEIGHTED_SYMMETRIC = {"Q4_0": 8, "Q5_0": 16}


def _quantize_asym(x: np.ndarray, nmax: int, qw: Optional[np.ndarray] = None) -> Parts:
    """quantize_row_q4_1_ref (nmax=15) / q5_1_ref (nmax=31): min/max affine grid. With importance ``qw``,
    a weighted (scale, min) least-squares search as quantize_row_q4_1_impl (weights: `imatrix_weights`)."""
    if qw is not None:
        xt = np.ascontiguousarray(x.T)
        w = kq.imatrix_weights(xt, np.ascontiguousarray(qw.T), 1, 1.0)
        scale, the_min, L = kq.make_qkx2_quants(xt, w, nmax, -0.9, 0.05, 36, False)
        return L.T.astype(np.uint8), to_f16(scale), to_f16(-the_min), None, None
    mn = first_pick(x, np.argmin)
    d = (first_pick(x, np.argmax) - mn) / F32(nmax)
    t = np.trunc((x - mn[:, None]) * _inverse(d)[:, None] + F32(0.5)).astype(np.int32)
    codes = np.minimum(15, t.astype(np.int8)) if nmax == 15 else t & 31
    return codes.astype(np.uint8), to_f16(d), to_f16(mn), None, None


def _quantize_q8_0(x: np.ndarray) -> Parts:
    """quantize_row_q8_0_ref: absmax / 127 with roundf (half away from zero)."""
    d = np.abs(x).max(axis=1) / F32(127)
    v = x * _inverse(d)[:, None]
    a = np.abs(v)
    fl = np.floor(a)
    r = np.copysign(fl + np.floor(F32(2) * (a - fl)), v)
    return (r.astype(np.int32) + 128).astype(np.uint8), to_f16(d), None, None, None


def _legacy_pack(fmt: GGMLFormat) -> Callable[[Parts], np.ndarray]:
    def pack(p: Parts) -> np.ndarray:
        codes, d, m = p[0].astype(np.uint8), p[1], p[2]
        out = [f16_bytes(d)] + ([f16_bytes(m)] if fmt.has_min else [])
        if fmt.bits == 8:
            out.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            if fmt.bits == 5:
                out.append(np.packbits((codes >> 4) & 1, axis=1, bitorder="little"))
            out.append((codes[:, :16] & 15) | (codes[:, 16:] & 15) << 4)
        return np.concatenate(out, axis=1)

    return pack


def _legacy_unpack(fmt: GGMLFormat) -> Callable[[np.ndarray], Parts]:
    def unpack(raw: np.ndarray) -> Parts:
        d = f16_at(raw, 0)
        m, o = (f16_at(raw, 2), 4) if fmt.has_min else (None, 2)
        if fmt.bits == 8:
            codes = (raw[:, o:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            return codes, d, None, None, None
        high = np.zeros((raw.shape[0], 32), np.uint8)
        if fmt.bits == 5:
            high = np.unpackbits(raw[:, o:o + 4], axis=1, bitorder="little") << 4
            o += 4
        qs = raw[:, o:o + 16]
        return np.concatenate([qs & 15, qs >> 4], axis=1) | high, d, m, None, None

    return unpack


# --------------------------------------------------------------------------------------- registry


class _Impl(NamedTuple):
    quantize: Callable[..., Parts]  # (N, block_size) float32 [, importance (N, block_size)] -> Parts
    pack: Callable[[Parts], np.ndarray]  # Parts -> (N, type_size) uint8
    unpack: Callable[[np.ndarray], Parts]  # (N, type_size) uint8 -> Parts


_IMPLS: dict[str, _Impl] = {
    "Q4_0": _Impl(lambda x, qw=None: _quantize_sym(x, 8, qw), _legacy_pack(FORMATS["Q4_0"]),
                  _legacy_unpack(FORMATS["Q4_0"])),
    "Q4_1": _Impl(lambda x, qw=None: _quantize_asym(x, 15, qw), _legacy_pack(FORMATS["Q4_1"]),
                  _legacy_unpack(FORMATS["Q4_1"])),
    "Q5_0": _Impl(lambda x, qw=None: _quantize_sym(x, 16, qw), _legacy_pack(FORMATS["Q5_0"]),
                  _legacy_unpack(FORMATS["Q5_0"])),
    "Q5_1": _Impl(lambda x, qw=None: _quantize_asym(x, 31, qw), _legacy_pack(FORMATS["Q5_1"]),
                  _legacy_unpack(FORMATS["Q5_1"])),
    "Q8_0": _Impl(lambda x, qw=None: _quantize_q8_0(x), _legacy_pack(FORMATS["Q8_0"]),  # llama.cpp: no imatrix
                  _legacy_unpack(FORMATS["Q8_0"])),
    "Q2_K": _Impl(kq.quantize_q2_k, kq.pack_q2_k, kq.unpack_q2_k),
    "Q3_K": _Impl(kq.quantize_q3_k, kq.pack_q3_k, kq.unpack_q3_k),
    "Q4_K": _Impl(kq.quantize_q4_k, kq.pack_q4_k, kq.unpack_q4_k),
    "Q5_K": _Impl(kq.quantize_q5_k, kq.pack_q5_k, kq.unpack_q5_k),
    "Q6_K": _Impl(kq.quantize_q6_k, kq.pack_q6_k, kq.unpack_q6_k),
}


def _quantized_format(qtype: str) -> GGMLFormat:
    fmt = get_format(qtype)
    if fmt.is_float:
        raise ValueError(f"{qtype} is a float type: it has no integer codes or scales")
    return fmt


def _check_cols(fmt: GGMLFormat, cols: int) -> int:
    if cols % fmt.block_size:
        raise ValueError(f"row length {cols} is not a multiple of the {fmt.name} block size {fmt.block_size}")
    return cols // fmt.block_size


_CHUNK_WEIGHTS = 1 << 18


def quantize_blocks(x: np.ndarray, qtype: str, importance: Optional[np.ndarray] = None) -> QuantizedBlocks:
    """Quantize float rows ``(..., cols)`` like llama.cpp's reference quantizer; returns codes and scales.

    ``importance`` (cols,) >= 0, e.g. an imatrix or a Hessian diagonal: blocks are fitted to minimise the
    importance-weighted error instead (Q4_0/Q5_0 exactly as llama.cpp does with an imatrix; Q8_0 ignores it).
    """
    fmt = _quantized_format(qtype)
    x = np.ascontiguousarray(x, dtype=F32)
    nb = _check_cols(fmt, x.shape[-1])
    lead = x.shape[:-1] + (nb,)
    blocks = x.reshape(-1, fmt.block_size)
    step = max(1, _CHUNK_WEIGHTS // fmt.block_size)  # bounded temporaries, cache-friendly
    impl = _IMPLS[qtype].quantize
    imp = None if importance is None else np.asarray(importance, dtype=F32).reshape(nb, fmt.block_size)
    chunks = []
    for i in range(0, len(blocks), step):
        chunk = blocks[i:i + step]
        # block j of the flattened rows holds column block j % nb
        chunks.append(impl(chunk) if imp is None else impl(chunk, imp[np.arange(i, i + len(chunk)) % nb]))
    if not chunks:  # no blocks: empty fields of the right dtypes, taken from a dummy block
        dummy = _IMPLS[qtype].quantize(np.zeros((1, fmt.block_size), F32))
        chunks = [tuple(None if f is None else f[:0] for f in dummy)]
    codes, d, dmin, sc, m = (None if c[0] is None else np.concatenate(c) for c in zip(*chunks))
    sub = lambda a: None if a is None else a.astype(np.int16).reshape(lead + (fmt.n_groups,))  # noqa: E731
    return QuantizedBlocks(qtype, codes.reshape(lead + (fmt.block_size,)), d.reshape(lead),
                           None if dmin is None else dmin.reshape(lead), sub(sc), sub(m))


# valid integer sub-block scales of the K-quants (mins run from 0 to the same upper end)
_SUB_RANGE = {"Q2_K": (0, 15), "Q3_K": (-32, 31), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}


def pack(qb: QuantizedBlocks) -> np.ndarray:
    """GGUF bytes ``(..., n_blocks * type_size)`` of the given codes and scales, without re-rounding."""
    fmt = _quantized_format(qb.qtype)
    lead = qb.d.shape
    flat = lambda a, *s: None if a is None else np.asarray(a).reshape((-1,) + s)  # noqa: E731
    codes = flat(qb.codes, fmt.block_size)
    scales, mins = flat(qb.scales, fmt.n_groups), flat(qb.mins, fmt.n_groups)
    lo, hi = _SUB_RANGE.get(qb.qtype, (0, 0))
    for label, a, a_lo, a_hi in (("codes", codes, 0, fmt.qmax), ("scales", scales, lo, hi), ("mins", mins, 0, hi)):
        if a is not None and a.size and (a.min() < a_lo or a.max() > a_hi):
            raise ValueError(f"{qb.qtype} {label} must lie in [{a_lo}, {a_hi}]")
    raw = _IMPLS[qb.qtype].pack((codes.astype(np.uint8), flat(qb.d), flat(qb.dmin), scales, mins))
    return raw.reshape(lead[:-1] + (lead[-1] * fmt.type_size,))


def unpack(raw: np.ndarray, qtype: str) -> QuantizedBlocks:
    """Inverse of :func:`pack`: GGUF bytes ``(..., nbytes)`` -> codes and scales."""
    fmt = _quantized_format(qtype)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % fmt.type_size:
        raise ValueError(f"{raw.shape[-1]} bytes per row is not a multiple of the {qtype} block size "
                         f"{fmt.type_size}")
    lead = raw.shape[:-1] + (raw.shape[-1] // fmt.type_size,)
    codes, d, dmin, sc, m = _IMPLS[qtype].unpack(raw.reshape(-1, fmt.type_size))
    shape = lambda a, *s: None if a is None else np.ascontiguousarray(a).reshape(lead + s)  # noqa: E731
    return QuantizedBlocks(qtype, shape(codes, fmt.block_size), shape(d), shape(dmin),
                           shape(sc, fmt.n_groups), shape(m, fmt.n_groups))


def group_params(qb: QuantizedBlocks) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Per scale group float32 ``step`` and ``bias`` (None if symmetric), shape (..., n_blocks, n_groups).

    Weight = step * (code - fmt.zero) + bias, computed in float32 exactly as ggml dequantizes.
    """
    fmt = _quantized_format(qb.qtype)
    d = qb.d.astype(F32)[..., None]
    if qb.scales is None:  # legacy: one group per block, min stored directly
        return d, (qb.dmin.astype(F32)[..., None] if fmt.has_min else None)
    step = d * qb.scales.astype(F32)
    if not fmt.has_min:
        return step, None
    return step, -(qb.dmin.astype(F32)[..., None] * qb.mins.astype(F32))


def dequantize_blocks(qb: QuantizedBlocks) -> np.ndarray:
    """float32 weights ``(..., cols)`` of the given codes and scales (bit-identical to ggml)."""
    fmt = _quantized_format(qb.qtype)
    step, bias = group_params(qb)
    levels = (qb.codes.astype(np.int16) - fmt.zero).astype(F32)
    levels = levels.reshape(levels.shape[:-1] + (fmt.n_groups, fmt.group_size))
    y = step[..., None] * levels
    if bias is not None:
        y = y + bias[..., None]
    return y.reshape(qb.codes.shape[:-2] + (qb.codes.shape[-2] * fmt.block_size,))


def nearest_codes(x: np.ndarray, qb: QuantizedBlocks) -> np.ndarray:
    """Nearest codes for weights ``x (..., cols)`` on the (fixed) grid of ``qb``; groups with step 0 keep qb's."""
    fmt = _quantized_format(qb.qtype)
    step, bias = group_params(qb)
    xs = np.asarray(x, dtype=F32).reshape(qb.codes.shape[:-1] + (fmt.n_groups, fmt.group_size))
    if bias is not None:
        xs = xs - bias[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(xs / np.where(step == 0, F32(1), step)[..., None]) + fmt.zero
    q = np.clip(q, 0, fmt.qmax).astype(np.uint8).reshape(qb.codes.shape)
    keep = np.repeat(step == 0, fmt.group_size, axis=-1)
    return np.where(keep, qb.codes, q)


# ----------------------------------------------------------------------------------------- codecs


def _float_to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: quiet NaNs, round to nearest even."""
    n = x.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    return ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


ROW_CHUNK_BYTES = 32 * 2**20  # float32 rows handed to the block (de)quantizers at once


def _by_rows(x: np.ndarray, convert, out_cols: int, out_dtype, row_bytes: int | None = None) -> np.ndarray:
    """``convert`` (rows are independent) applied to ``x``'s rows in chunks of about `ROW_CHUNK_BYTES` of float32."""
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    step = max(1, ROW_CHUNK_BYTES // (row_bytes or x.shape[-1] * 4))
    if flat.shape[0] <= step:
        return convert(x)
    out = np.empty((flat.shape[0], out_cols), dtype=out_dtype)
    for start in range(0, flat.shape[0], step):
        out[start:start + step] = convert(flat[start:start + step])
    return out.reshape(*x.shape[:-1], out_cols)


@dataclass(frozen=True)
class Codec:
    """Float rows <-> GGUF bytes for one ggml type."""

    fmt: GGMLFormat

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float rows ``(..., cols)`` -> uint8 ``(..., n_blocks * type_size)``; block types a few rows at a time
        (`ROW_CHUNK_BYTES` of input), so a 400 MB output layer costs 400 MB of temporaries, not a gigabyte."""
        x = np.ascontiguousarray(x, dtype=F32)
        if x.ndim == 0:
            raise ValueError("expected at least one dimension")
        _check_cols(self.fmt, x.shape[-1])
        if not self.fmt.is_float:
            return _by_rows(x, lambda rows: pack(quantize_blocks(rows, self.fmt.name)),
                            x.shape[-1] // self.fmt.block_size * self.fmt.type_size, np.uint8)
        y = {"F32": lambda: x, "F16": lambda: to_f16(x), "BF16": lambda: _float_to_bf16(x)}[self.fmt.name]()
        return np.ascontiguousarray(y).view(np.uint8)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """uint8 ``(..., nbytes)`` -> float32 ``(..., cols)``."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if not self.fmt.is_float:
            if raw.ndim == 0 or raw.shape[-1] % self.fmt.type_size:
                return dequantize_blocks(unpack(raw, self.fmt.name))  # unpack's error names the problem
            cols = raw.shape[-1] // self.fmt.type_size * self.fmt.block_size
            return _by_rows(raw, lambda rows: dequantize_blocks(unpack(rows, self.fmt.name)), cols, F32,
                            row_bytes=cols * 4)
        if raw.shape[-1] % self.fmt.type_size:
            raise ValueError(f"{raw.shape[-1]} bytes per row is not a multiple of {self.fmt.type_size}")
        if self.fmt.name == "F32":
            return raw.view(F32).copy()
        if self.fmt.name == "F16":
            return raw.view(np.float16).astype(F32)
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(F32)

    def quantize_blocks(self, x: np.ndarray) -> QuantizedBlocks:
        return quantize_blocks(x, self.fmt.name)

    def unpack(self, raw: np.ndarray) -> QuantizedBlocks:
        return unpack(raw, self.fmt.name)


CODECS: dict[str, Codec] = {name: Codec(fmt) for name, fmt in FORMATS.items()}


def get_codec(name: str) -> Codec:
    """Codec by ggml type name; ValueError naming the known ones otherwise."""
    return CODECS[get_format(name).name]
