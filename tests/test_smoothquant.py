"""SmoothQuant: the migration formula, config validation, and W8A8 quality on the bundled model."""

from __future__ import annotations

import pytest
import torch

from squeeze import api
from squeeze.calib import CalibConfig, load_calibration
from squeeze.errors import SqueezeError
from squeeze.model import load_tokenizer
from squeeze.modules import QuantLinear
from squeeze.passes.smoothquant import SmoothQuant, smoothing_scales
from squeeze.scheme import get_scheme


def test_smoothing_scales_formula():
    # s = max|X|^a / max|W|^(1-a): with a = 0.5, act [4, 1], weight [1, 4] -> [2, 0.5];
    # a dead channel (act 0) or an empty weight column keeps s = 1.
    act = torch.tensor([4.0, 1.0, 0.0, 3.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    assert torch.allclose(smoothing_scales(act, weight, 0.5), torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(smoothing_scales(act, weight, 1.0)[:2], torch.tensor([4.0, 1.0]))


def test_config_validation():
    with pytest.raises(SqueezeError, match="--alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(SqueezeError, match="int8 activations"):
        SmoothQuant(scheme=get_scheme("w8"))


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-dynamic"])
def test_w8a8_smoothquant_within_one_percent_of_float(stories_dir, short_text, scheme):
    # Measured on the short eval text with 32 x 512 calibration tokens: float 3.1295; SmoothQuant static
    # +0.60%, dynamic +0.25% (RTN static: +1.30%). The bound is 1%; full eval text: reports/quality.md.
    tok = load_tokenizer(stories_dir)
    model = api.load(stories_dir)
    base = api.evaluate(model, short_text, tokenizer=tok, progress=False).ppl
    calib = load_calibration(tok, CalibConfig(nsamples=32, seqlen=512))
    records = api.quantize(model, SmoothQuant(scheme=get_scheme(scheme)), calib)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(records) == 35
    assert all((m.input_scale is not None) == (scheme == "w8a8") for m in layers)
    ppl = api.evaluate(model, short_text, tokenizer=tok, progress=False).ppl
    assert ppl / base - 1 < 0.01, (base, ppl)
