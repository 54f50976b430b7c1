"""GGUF block codecs vs gguf-py (dequantizers) and llama.cpp's own quantizer (ggml_quantize_chunk)."""

from __future__ import annotations

import ctypes
import dataclasses
import os

import numpy as np
import pytest

from squeeze.exporters.gguf.codecs import (
    CODECS, FORMATS, QuantizedBlocks, dequantize_blocks, get_codec, get_format, group_params, nearest_codes, pack,
    quantize_blocks, unpack)

QUANT_TYPES = [name for name, fmt in FORMATS.items() if not fmt.is_float]
K_TYPES = [name for name in QUANT_TYPES if name.endswith("_K")]
FIELDS = ("codes", "d", "dmin", "scales", "mins")
# squeeze's squared error may exceed llama.cpp's by at most this relative amount (float64 summation noise).
ERR_RTOL = 1e-6


def make_tensor(seed: int, rows: int = 64, cols: int = 512) -> np.ndarray:
    """N(0,1) with ~1% outliers (x20), plus awkward rows: all zero, one huge value, tiny, positive, constant."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 20
    x[1] = 0.0
    x[2] = 0.0
    x[2, 37] = 1000.0
    x[3] *= 1e-6
    x[4] = np.abs(x[4])
    x[5] = 0.5
    x[6, : cols // 2] = -2.0
    x[7] *= rng.random(cols) < 0.05  # sparse, with -0.0 entries
    return x


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf", reason="gguf-py is not installed (pip install gguf==0.19.0); "
                                              "it provides the reference dequantizers")


def _load_ggml():
    from squeeze.errors import SqueezeError
    from squeeze.eval.llamacpp_backends import llama_cpp_backend

    paths = [os.environ.get("GGML_BASE_LIB", "")]
    try:  # the libggml-base beside the libllama squeeze runs (llama-cpp-python's, else llama-cpp-py-sync's)
        paths.append(str(llama_cpp_backend().ggml_base_library() or ""))
    except SqueezeError:
        pass
    for path in filter(None, paths):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        return fn
    return None


@pytest.fixture(scope="module")
def ggml_quantize():
    """llama.cpp's quantizer: ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix=NULL)."""
    fn = _load_ggml()
    if fn is None:
        pytest.skip("libggml-base (from llama-cpp-python or llama-cpp-py-sync, or $GGML_BASE_LIB) could not be "
                    "loaded with ggml_quantize_chunk; pip install 'squeeze-quant[gguf]' to compare against llama.cpp")

    def quantize(x: np.ndarray, name: str) -> np.ndarray:
        fmt = FORMATS[name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // fmt.block_size * fmt.type_size), np.uint8)
        assert fn(fmt.type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None) == out.size
        return out

    return quantize


def sq_err(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y.astype(np.float64) - x.astype(np.float64)) ** 2))


# ------------------------------------------------------------------------------------------- table


def test_format_table_matches_gguf(gguf):
    for name, fmt in FORMATS.items():
        qt = gguf.GGMLQuantizationType[name]
        assert fmt.type_id == int(qt)
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qt]
        assert CODECS[name].fmt is fmt


def test_unknown_type_lists_known_ones():
    with pytest.raises(ValueError, match="known types: .*Q4_K"):
        get_codec("Q4_X")
    with pytest.raises(ValueError, match="Q6_K"):
        get_format("iq2_xxs")


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_row_length_must_be_block_multiple(name):
    bs = FORMATS[name].block_size
    with pytest.raises(ValueError, match=f"not a multiple of the {name} block size {bs}"):
        CODECS[name].quantize(np.zeros((2, bs + 16), np.float32))


def test_float_types_have_no_blocks():
    with pytest.raises(ValueError, match="float type"):
        quantize_blocks(np.zeros((1, 32), np.float32), "F16")


# ---------------------------------------------------------------------- bit-exact vs gguf-py dequant


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_matches_gguf_py(gguf, name):
    codec = CODECS[name]
    for seed in range(2):
        x = make_tensor(seed)
        raw = codec.quantize(x)
        assert raw.dtype == np.uint8
        assert raw.shape == (x.shape[0], x.shape[1] // codec.fmt.block_size * codec.fmt.type_size)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
        ours = codec.dequantize(raw)
        assert ours.dtype == np.float32 and ours.shape == x.shape
        assert np.array_equal(ours, ref)
        if not codec.fmt.is_float:
            assert np.array_equal(dequantize_blocks(quantize_blocks(x, name)), ref)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_match_gguf_py(gguf, name):
    x = make_tensor(0)
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    assert np.array_equal(CODECS[name].quantize(x), np.ascontiguousarray(ref).view(np.uint8))


# --------------------------------------------------------------------------------------- round trip


def assert_same_blocks(a: QuantizedBlocks, b: QuantizedBlocks) -> None:
    assert a.qtype == b.qtype
    for field in FIELDS:
        u, v = getattr(a, field), getattr(b, field)
        assert (u is None) == (v is None), field
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape, field
            assert np.array_equal(u.view(np.uint16) if u.dtype == np.float16 else u,
                                  v.view(np.uint16) if v.dtype == np.float16 else v), field


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_unpack_pack_round_trip(name):
    x = make_tensor(3).reshape(2, 32, 512)  # any leading shape
    qb = quantize_blocks(x, name)
    fmt = FORMATS[name]
    assert qb.codes.shape == (2, 32, 512 // fmt.block_size, fmt.block_size) and qb.codes.dtype == np.uint8
    assert int(qb.codes.max()) <= fmt.qmax
    raw = pack(qb)
    assert np.array_equal(raw, CODECS[name].quantize(x))
    assert_same_blocks(unpack(raw, name), qb)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_pack_does_not_rerround(name):
    """Arbitrary valid codes and scales survive pack -> unpack unchanged."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(7)
    lead = (5, 3)
    sub_range = {"Q2_K": (0, 15), "Q3_K": (-32, 31), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}
    f16 = lambda: rng.standard_normal(lead).astype(np.float16)  # noqa: E731
    sub = lambda lo, hi: rng.integers(lo, hi + 1, lead + (fmt.n_groups,)).astype(np.int16)  # noqa: E731
    ref = quantize_blocks(np.zeros((5, 3 * fmt.block_size), np.float32), name)
    qb = QuantizedBlocks(
        name, rng.integers(0, fmt.qmax + 1, lead + (fmt.block_size,)).astype(np.uint8), f16(),
        None if ref.dmin is None else f16(),
        None if ref.scales is None else sub(*sub_range[name]),
        None if ref.mins is None else sub(0, sub_range[name][1]))
    assert_same_blocks(unpack(pack(qb), name), qb)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(dataclasses.replace(qb, codes=qb.codes.astype(np.int16) + fmt.qmax + 1))
    if qb.scales is not None:
        with pytest.raises(ValueError, match="scales must lie in"):
            pack(dataclasses.replace(qb, scales=qb.scales + 1000))


# -------------------------------------------------------------------------------- vs llama.cpp


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_error_no_worse_than_llama_cpp(gguf, ggml_quantize, name):
    qt = gguf.GGMLQuantizationType[name]
    for seed in range(4):
        x = make_tensor(seed)
        ours = sq_err(gguf.quants.dequantize(CODECS[name].quantize(x), qt), x)
        theirs = sq_err(gguf.quants.dequantize(ggml_quantize(x, name), qt), x)
        assert ours <= theirs * (1 + ERR_RTOL), (seed, ours, theirs)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_bytes_identical_to_llama_cpp(ggml_quantize, name):
    """Stronger than the error test: the reference quantizers are reproduced bit for bit.

    Holds for the x86-64 CPU wheel (ggml-base built without FMA contraction); a llama.cpp whose reference
    quantizers change would fail here but can still pass test_error_no_worse_than_llama_cpp.
    """
    rng = np.random.default_rng(11)
    tensors = [make_tensor(s) for s in range(3)] + [
        rng.standard_t(2, (16, 1024)).astype(np.float32),
        (rng.standard_normal((16, 1024)) * 1e-4).astype(np.float32),  # fp16-subnormal scales
        (rng.standard_normal((16, 1024)) * 3e4).astype(np.float32),
        (rng.integers(-8, 9, (16, 1024)) * 0.5).astype(np.float32),  # ties in the rounding
    ]
    for i, x in enumerate(tensors):
        ours, theirs = CODECS[name].quantize(x), ggml_quantize(x, name)
        bad = (ours.reshape(-1, FORMATS[name].type_size) != theirs.reshape(-1, FORMATS[name].type_size)).any(1)
        assert not bad.any(), f"tensor {i}: {int(bad.sum())} of {bad.size} blocks differ from llama.cpp"


@pytest.mark.parametrize("name", [n for n in QUANT_TYPES if not n.endswith("_K")])
def test_matches_gguf_py_quantize(gguf, name):
    """gguf-py has numpy quantizers for the legacy types: same bytes, and never a larger error.

    gguf-py ignores which of -0.0 / 0.0 comes first in a block (C keeps the first), so on blocks whose min is
    a signed zero its Q4_1/Q5_1 ``m`` can differ from llama.cpp's in the sign bit only; bytes are compared
    after mapping -0.0 to 0.0.
    """
    qt = gguf.GGMLQuantizationType[name]
    x = make_tensor(5)
    unsigned = x + np.float32(0)  # -0.0 -> 0.0
    assert np.array_equal(CODECS[name].quantize(unsigned), gguf.quants.quantize(unsigned, qt))
    ours = sq_err(CODECS[name].dequantize(CODECS[name].quantize(x)), x)
    assert ours <= sq_err(gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt), x) * (1 + ERR_RTOL)


# ------------------------------------------------------------------------------------ error floors

# Relative RMS error on N(0,1) data (256 x 4096, seed 1000).  Measured values (identical for llama.cpp's
# quantizer, since the bytes are identical) are in the comments; bounds add ~3% so an accuracy regression in
# the scale searches fails while seed-to-seed noise (< 0.5%) does not.
REL_RMS_BOUND = {
    "F32": 0.0,
    "F16": 0.00022,  # 0.00021: 10-bit mantissa
    "BF16": 0.0017,  # 0.00166: 7-bit mantissa
    "Q8_0": 0.0055,  # 0.00536
    "Q6_K": 0.0183,  # 0.01773
    "Q5_K": 0.0373,  # 0.03612
    "Q5_1": 0.0390,  # 0.03787
    "Q5_0": 0.0440,  # 0.04270
    "Q4_K": 0.0735,  # 0.07137
    "Q4_1": 0.0806,  # 0.07823
    "Q4_0": 0.0885,  # 0.08591
    "Q3_K": 0.1555,  # 0.15094
    "Q2_K": 0.3055,  # 0.29663
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_error_floor(name):
    x = np.random.default_rng(1000).standard_normal((256, 4096)).astype(np.float32)
    y = CODECS[name].dequantize(CODECS[name].quantize(x))
    rel = np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    assert rel <= REL_RMS_BOUND[name], rel


# ------------------------------------------------------------------------------- grid helpers (GPTQ)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_group_params_and_nearest_codes(name):
    fmt = FORMATS[name]
    x = make_tensor(2)
    qb = quantize_blocks(x, name)
    step, bias = group_params(qb)
    assert step.shape == qb.d.shape + (fmt.n_groups,)
    levels = (qb.codes.astype(np.float64) - fmt.zero).reshape(step.shape + (fmt.group_size,))
    manual = step[..., None] * levels + (0 if bias is None else bias[..., None])
    np.testing.assert_allclose(manual.reshape(x.shape), dequantize_blocks(qb), rtol=1e-6, atol=1e-6)
    # nearest codes on the fixed grid are at least as good per weight as the quantizer's own codes
    x2 = x + np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * 0.01
    for target in (x, x2):
        moved = dataclasses.replace(qb, codes=nearest_codes(target, qb))
        err_new = np.abs(dequantize_blocks(moved).astype(np.float64) - target)
        err_old = np.abs(dequantize_blocks(qb).astype(np.float64) - target)
        assert np.all(err_new <= err_old + 1e-5 * (1 + np.abs(target)))
    if name in K_TYPES:  # K-quants finish with exactly this rounding against the stored scales
        keep = np.repeat(step == 0, fmt.group_size, axis=-1)
        assert np.array_equal(np.where(keep, qb.codes, nearest_codes(x, qb)), qb.codes)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_weighted_symmetric_blocks_equal_llamacpp_with_an_imatrix(name):
    """quantize_sym_weighted is llama.cpp's imatrix fit: on rows of one block (where llama.cpp's per-row
    sigma2 is the block's) the bytes equal ggml_quantize_chunk's given the same importance."""
    from squeeze.exporters.gguf.codecs import WEIGHTED_SYMMETRIC, QuantizedBlocks, pack, quantize_sym_weighted

    fn = _load_ggml()
    if fn is None:
        pytest.skip("libggml-base (from llama-cpp-python) could not be loaded with ggml_quantize_chunk")
    fmt = FORMATS[name]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((512, fmt.block_size)) * rng.random((512, 1)) * 3).astype(np.float32)
    x[5] = 0.0  # an all-zero block
    importance = (rng.random(fmt.block_size) ** 3 + 1e-3).astype(np.float32)
    theirs = np.zeros((x.shape[0], fmt.type_size), np.uint8)
    assert fn(fmt.type_id, x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1],
              importance.ctypes.data) == theirs.size
    codes, d = quantize_sym_weighted(x, importance, WEIGHTED_SYMMETRIC[name])
    ours = pack(QuantizedBlocks(name, codes[:, None, :], d[:, None]))
    assert np.array_equal(ours.reshape(theirs.shape), theirs)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_importance_weighted_blocks_match_llamacpp_imatrix_quality(name):
    """quantize_blocks(importance=...) fits every quantized type for the importance-weighted error. Against
    llama.cpp's own imatrix quantizer on the same rows and importance: measured 0.999x its weighted error
    for the legacy types, 1.003-1.06x for the K types (whose super-block scales llama.cpp also searches),
    and 0.51-0.85x the reference (unweighted) fit's. Bounds: within 1.1x of llama.cpp, below 0.9x the reference."""
    fn = _load_ggml()
    if fn is None:
        pytest.skip("libggml-base (from llama-cpp-python) could not be loaded with ggml_quantize_chunk")
    fmt = FORMATS[name]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((128, 512)) * rng.uniform(0.5, 2, (1, 512))).astype(np.float32)
    importance = (rng.random(512) ** 4 + 1e-4).astype(np.float32)
    err = lambda y: float((((y - x) ** 2) * importance).sum())  # noqa: E731
    theirs = np.zeros((x.shape[0], 512 // fmt.block_size * fmt.type_size), np.uint8)
    assert fn(fmt.type_id, x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1],
              importance.ctypes.data) == theirs.size
    ours = err(dequantize_blocks(quantize_blocks(x, name, importance)))
    assert ours < 1.1 * err(get_codec(name).dequantize(theirs))
    assert ours < 0.9 * err(dequantize_blocks(quantize_blocks(x, name)))


@pytest.mark.parametrize("qtype", sorted(n for n, f in FORMATS.items() if not f.is_float))
def test_row_chunks_give_the_same_bytes(qtype, monkeypatch):
    # Large tensors are (de)quantized a few rows at a time to bound memory; rows are independent, so the
    # bytes and the values are those of one call over the whole tensor.
    from squeeze.exporters.gguf import codecs

    codec = get_codec(qtype)
    cols = 2 * FORMATS[qtype].block_size
    x = np.random.default_rng(0).standard_normal((37, cols)).astype(np.float32)
    whole_raw, whole = codec.quantize(x), codec.dequantize(codec.quantize(x))
    monkeypatch.setattr(codecs, "ROW_CHUNK_BYTES", 5 * cols * 4)  # 5 rows per chunk, the last one short
    assert np.array_equal(codec.quantize(x), whole_raw)
    assert np.array_equal(codec.dequantize(whole_raw), whole)
    assert np.array_equal(codec.quantize(x.reshape(1, 37, cols)), whole_raw.reshape(1, 37, -1))
