"""Quantization math: error bounds per scheme, short last groups, packing against AutoGPTQ's layout."""

from __future__ import annotations

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.primitives import (
    compute_qparams,
    dequantize,
    fake_quant,
    group_index,
    pack_rows,
    quantize,
    unpack_rows,
)
from squeeze.scheme import PRESETS, QuantScheme, get_scheme

GRANULARITIES = [("tensor", None), ("channel", None), ("group", 32), ("group", 128)]


def _weight(out_f=96, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[3, 17] = 9.0  # an outlier, as real weights have
    return w


def _roundtrip(w, scheme):
    scale, zero = compute_qparams(w, scheme)
    g_idx = group_index(w.shape[1], scheme.group_size_for(w.shape[1]))
    q = quantize(w, scale, zero, scheme.bits, g_idx)
    return q, scale, zero, g_idx, dequantize(q, scale, zero, g_idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
def test_error_is_at_most_half_a_step(bits, symmetric, granularity, group_size):
    """Every element lands within scale/2 of its value.

    Plus the fp16 rounding of the scale (relative 2^-11), which moves the grid's
    end points by at most 2^(bits-1) steps times that.
    """
    w = _weight()
    scheme = QuantScheme(bits, symmetric, granularity, group_size)
    q, scale, zero, g_idx, dq = _roundtrip(w, scheme)
    assert int(q.max()) <= (1 << bits) - 1
    step = scale[:, g_idx.long()]
    slack = ((1 << bits) - 1) * 2.0**-11
    assert torch.all((w - dq).abs() <= step * (0.5 + slack) + 1e-7)


# Relative MSE ||W - Q(W)||^2 / ||W||^2 on N(0,1) weights with one outlier, 256 columns.
# Uniform rounding error has variance step^2/12; the bounds are the measured values
# (seed 0) with ~25% margin, and they order as they must: finer granularity and more bits -> less error.
REL_MSE_BOUNDS = {
    "w8": 6.7e-5,
    "w8-asym": 5.5e-5,
    "w4g128": 1.65e-2,
    "w4g32": 1.15e-2,
    "w4g32-asym": 8.3e-3,
    "w3g32-asym": 3.8e-2,
    "w2g32-asym": 2.1e-1,
    "w4-tensor": 1.5e-1,
}


@pytest.mark.parametrize("name", list(REL_MSE_BOUNDS))
def test_relative_mse_bounds(name):
    w = _weight()
    *_, dq = _roundtrip(w, get_scheme(name))
    rel = float((w - dq).pow(2).sum() / w.pow(2).sum())
    assert rel < REL_MSE_BOUNDS[name], f"{name}: relative MSE {rel:.3e}"


def test_asymmetric_beats_symmetric_on_skewed_weights():
    w = _weight().abs()  # all positive: a symmetric grid wastes half its codes
    *_, dq_sym = _roundtrip(w, get_scheme("w4g32"))
    *_, dq_asym = _roundtrip(w, get_scheme("w4g32-asym"))
    assert (w - dq_asym).pow(2).sum() < 0.5 * (w - dq_sym).pow(2).sum()


def test_symmetric_grid_is_gptq_convention():
    """Sym: zero point 2^(b-1), scale 2*absmax/(2^b-1) (AutoGPTQ's symmetric grid)."""
    w = torch.tensor([[-3.0, 1.0, 0.5, 2.0]])
    scale, zero = compute_qparams(w, QuantScheme(4, True, "channel", None))
    assert zero.item() == 8
    assert scale.item() == pytest.approx(2 * 3.0 / 15, rel=1e-3)


def test_zero_is_exactly_representable():
    w = _weight()
    w[:, :5] = 0.0
    for name in ("w4g32", "w4g32-asym", "w3g32-asym", "w8"):
        *_, dq = _roundtrip(w, get_scheme(name))
        assert torch.all(dq[:, :5] == 0.0), name


def test_short_last_group_uses_only_its_own_columns():
    """172 columns in groups of 32: five full groups and one of 12, whose range is its own."""
    w = _weight(8, 172)
    w[:, 160:] *= 0.01  # the short last group is much smaller than the rest
    scheme = get_scheme("w4g32-asym")
    scale, zero = compute_qparams(w, scheme)
    assert scale.shape == (8, 6)
    last_scale, last_zero = compute_qparams(w[:, 160:], QuantScheme(4, False, "channel", None))
    assert torch.equal(scale[:, 5:], last_scale) and torch.equal(zero[:, 5:], last_zero)
    g_idx = group_index(172, 32)
    assert g_idx[159] == 4 and g_idx[160] == 5 and g_idx[-1] == 5
    *_, dq = _roundtrip(w, scheme)
    assert (w[:, 160:] - dq[:, 160:]).abs().max() <= last_scale.max() / 2 * 1.001


def test_group_larger_than_row_is_per_channel():
    w = _weight(8, 64)
    assert torch.equal(fake_quant(w, get_scheme("w4g128")), fake_quant(w, get_scheme("w4")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quant_keeps_dtype(dtype):
    w = _weight().to(dtype)
    out = fake_quant(w, get_scheme("w4g32"))
    assert out.dtype == dtype
    # Same grid as in float32; only the final cast to the 16-bit dtype (< 0.4% relative) differs.
    assert torch.allclose(out.float(), fake_quant(w.float(), get_scheme("w4g32")), rtol=4e-3, atol=1e-6)


def test_scheme_validation():
    with pytest.raises(SqueezeError, match="bits"):
        QuantScheme(bits=9)
    with pytest.raises(SqueezeError, match="bits"):
        QuantScheme(bits=1)
    with pytest.raises(SqueezeError, match="group size"):
        QuantScheme(group_size=0)
    with pytest.raises(SqueezeError, match="granularity"):
        QuantScheme(granularity="block")
    with pytest.raises(SqueezeError, match="known schemes: .*w4g128"):
        get_scheme("w4g100")
    for name, scheme in PRESETS.items():
        assert scheme.name == name
        assert QuantScheme.from_dict(scheme.to_dict()) == scheme


# ---- packing ---------------------------------------------------------------------


def autogptq_pack_reference(intweight: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ's QuantLinear.pack loop (qweight, packed down rows), transcribed as plain Python."""
    n, m = len(intweight), len(intweight[0])
    rows = n * bits // 32
    out = [[0] * m for _ in range(rows)]
    for col in range(m):
        i = row = 0
        while row < rows:
            if bits in (2, 4, 8):
                for j in range(i, i + 32 // bits):
                    out[row][col] |= intweight[j][col] << (bits * (j - i))
                i += 32 // bits
                row += 1
            else:  # bits == 3: 32 values over three words
                for j in range(i, i + 10):
                    out[row][col] |= intweight[j][col] << (3 * (j - i))
                i += 10
                out[row][col] |= intweight[i][col] << 30
                row += 1
                out[row][col] |= (intweight[i][col] >> 2) & 1
                i += 1
                for j in range(i, i + 10):
                    out[row][col] |= intweight[j][col] << (3 * (j - i) + 1)
                i += 10
                out[row][col] |= intweight[i][col] << 31
                row += 1
                out[row][col] |= (intweight[i][col] >> 1) & 0x3
                i += 1
                for j in range(i, i + 10):
                    out[row][col] |= intweight[j][col] << (3 * (j - i) + 2)
                i += 10
                row += 1
    return [[v & 0xFFFFFFFF for v in r] for r in out]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_layout(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (64, 5), generator=g)
    ours = (pack_rows(values, bits).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert ours == autogptq_pack_reference(values.tolist(), bits)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 32, 172, 257])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    values = torch.randint(0, 1 << bits, (n, 3), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (-(-n * bits // 32), 3)
    assert torch.equal(unpack_rows(packed, bits, n).long(), values)


def test_pack_rejects_values_out_of_range():
    with pytest.raises(ValueError, match="4 bits"):
        pack_rows(torch.tensor([[16]]), 4)
