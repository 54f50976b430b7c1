"""Calibration precision: which arithmetic the block forwards use, and that bfloat16 forwards calibrate as well.

Weights, statistics and the GPTQ solver stay float32 in every mode; only the block forwards of the runner
autocast. The numbers below are bounds on stories260K (a 260K-parameter model, 8 x 128 tokens): bfloat16
has an 8-bit mantissa (relative rounding 2^-9 per product), far below 4-bit quantization's error.
"""

from __future__ import annotations

import pytest
import torch

from squeeze import api
from squeeze.calib import CalibConfig, load_calibration
from squeeze.errors import SqueezeError
from squeeze.model import load_tokenizer, select_linears
from squeeze.modules import QuantLinear, dequantize_once
from squeeze.passes.awq import AWQ
from squeeze.passes.gptq import GPTQ
from squeeze.precision import calib_autocast, cpu_has_native_bf16
from squeeze.runner import run_sequential
from squeeze.scheme import get_scheme
from squeeze import precision

CPU = torch.device("cpu")


def test_modes_resolve(monkeypatch):
    assert calib_autocast("float32", CPU, torch.float32) is None
    assert calib_autocast("bfloat16", CPU, torch.float32) is torch.bfloat16
    # a model stored in half precision already computes in it: nothing to autocast
    assert calib_autocast("bfloat16", CPU, torch.bfloat16) is None
    assert calib_autocast("auto", CPU, torch.float16) is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert calib_autocast("auto", CPU, torch.float32) is torch.bfloat16
    assert calib_autocast("auto", torch.device("cuda"), torch.float32) is None  # not measured there: float32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert calib_autocast("auto", CPU, torch.float32) is None  # emulated bfloat16 would be slower


def test_cpu_flag_detection_reads_cpuinfo():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    assert cpu_has_native_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)


@pytest.mark.parametrize("config", [lambda: GPTQ(calib_precision="fp8"), lambda: AWQ(calib_precision="half")])
def test_unknown_precision_is_refused(config):
    with pytest.raises(SqueezeError, match="--calib-precision must be one of auto, float32, bfloat16"):
        config()


def _stories(stories_dir, n=8, seqlen=128):
    calib = load_calibration(load_tokenizer(stories_dir), CalibConfig(None, n, seqlen, 0))
    return calib


def test_bfloat16_forwards_stay_close_to_float32(stories_dir):
    """The inputs the runner hands each block under bfloat16 forwards match the float32 ones to bf16 rounding."""
    model = api.load(stories_dir)
    calib = _stories(stories_dir)
    layers = select_linears(model)
    seen: dict[str, list[torch.Tensor]] = {"float32": [], "bfloat16": []}
    for mode in seen:
        def record(prefix, block, block_layers, inputs, mode=mode):
            assert all(h.dtype == torch.float32 for h in inputs.hidden)  # the stream between blocks stays float32
            seen[mode].append(torch.cat(inputs.hidden))
            return {}

        run_sequential(model, layers, calib, record, precision=mode)
    assert torch.equal(seen["float32"][0], seen["bfloat16"][0])  # the embeddings: no block ran yet
    for i, (ref, got) in enumerate(zip(seen["float32"][1:], seen["bfloat16"][1:]), 1):
        rel = float((got - ref).norm() / ref.norm())
        assert 0 < rel < 2e-2, (i, rel)  # different (bf16 ran) but within bf16's rounding, compounded per block


def test_gptq_with_bfloat16_forwards_matches_float32(stories_dir, short_text):
    """Same perplexity to 1% and nearly the same codes: bf16 forwards perturb the Hessians only slightly."""
    calib = _stories(stories_dir)
    ppl, codes = {}, {}
    for mode in ("float32", "bfloat16"):
        model = api.load(stories_dir)
        api.quantize(model, GPTQ(scheme=get_scheme("w4g32"), calib_precision=mode), calib)
        codes[mode] = torch.cat([m.codes.flatten() for m in model.modules() if isinstance(m, QuantLinear)])
        ppl[mode] = api.evaluate(model, short_text, tokenizer=load_tokenizer(stories_dir), progress=False).ppl
    same = float((codes["float32"] == codes["bfloat16"]).float().mean())
    assert 0.9 < same < 1.0, same
    assert abs(ppl["bfloat16"] / ppl["float32"] - 1) < 0.01, ppl


def test_dequantize_once_computes_each_weight_once(stories_dir, monkeypatch):
    model = api.load(stories_dir)
    api.quantize(model, GPTQ(scheme=get_scheme("w4g32"), calib_precision="float32"), _stories(stories_dir, 4, 64))
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    calls = []
    real = QuantLinear.dequantized_weight
    monkeypatch.setattr(QuantLinear, "dequantized_weight", lambda self: calls.append(1) or real(self))
    x = torch.randn(3, layer.in_features)
    plain = layer(x)
    assert len(calls) == 1
    with dequantize_once(model):
        outs = [layer(x) for _ in range(3)]
    assert len(calls) == 2  # once for the three calls inside
    assert all(torch.equal(o, plain) for o in outs)
    assert layer._weight_cache is None  # the float copy is dropped on exit
    layer(x)
    assert len(calls) == 3
