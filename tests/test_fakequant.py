"""Fake quantization on a QuantLinear's own grid: forward equal to the QuantLinear before and after training
steps (torch.equal), for every grid kind; GGUF blocks rebuilt with the trained codes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import linear_weight
from squeeze.modules import QuantLinear
from squeeze.passes.common import install_rounded
from squeeze.passes.fakequant import FakeQuantLinear, convert, prepare
from squeeze.scheme import get_scheme

GRIDS = ["w3g32", "w2g32-asym", "w4g128", "w8", "w4-tensor", "w3g32-asym", "w8a8", "w8a8-dynamic",
         "q4_0", "q5_0", "q8_0", "q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _quantized(scheme_name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 40))
    install_rounded(model, "0", model[0], get_scheme(scheme_name), linear_weight(model[0]).detach())
    if model[0].scheme.activations is not None and model[0].scheme.activations.mode == "static":
        model[0].input_scale = torch.tensor(0.03)
    return model


def _train_steps(model: nn.Module, x: torch.Tensor, steps: int = 4) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    target = torch.randn(x.shape[0], 40, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("learn", [False, True], ids=["fixed-scales", "learned-scales"])
@pytest.mark.parametrize("scheme", GRIDS)
def test_fake_quant_forward_equals_the_converted_layer(scheme, learn):
    model = _quantized(scheme)
    layer = model[0]
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    before = layer(x)
    fake = copy.deepcopy(model)
    prepare(fake, learn_scales=learn)
    assert torch.equal(fake(x), before)  # prepared: exactly the QuantLinear it came from
    _train_steps(fake, x)
    trained = fake(x)
    assert not torch.equal(trained, before)  # the steps changed codes (or scales)
    convert(fake)
    assert isinstance(fake[0], QuantLinear)
    assert torch.equal(fake[0](x), trained)  # converted: exactly the trained fake-quant model
    codes = fake[0].codes
    assert codes.dtype == torch.uint8 and int(codes.max()) <= fake[0].scheme.maxq or scheme.startswith("q")
    if learn:
        s = fake[0].scales
        assert not torch.equal(s, layer.scales)  # the scales moved
        if fake[0].gguf_blocks is None:
            assert torch.equal(s, s.half().float())  # learned scales are float16 values, as the checkpoint stores
        else:  # float16 d/m or integer sub-block scales/mins: the blocks decode to exactly the layer's weights
            _assert_blocks_decode_to(fake[0])


def _assert_blocks_decode_to(layer: QuantLinear) -> None:
    from squeeze.exporters.gguf.codecs import dequantize_blocks, unpack

    qb = unpack(layer.gguf_blocks.numpy(), layer.scheme.gguf.upper())
    assert np.array_equal(dequantize_blocks(qb), layer.dequantized_weight().numpy())  # llama.cpp's decoding


@pytest.mark.parametrize("learn", [False, True], ids=["fixed-scales", "learned-scales"])
@pytest.mark.parametrize("scheme", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q5_1"])
def test_trained_gguf_blocks_hold_the_trained_codes(scheme, learn):
    from squeeze.exporters.gguf.codecs import unpack

    model = _quantized(scheme)
    before = unpack(model[0].gguf_blocks.numpy(), scheme.upper())
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    prepare(model, learn_scales=learn)
    _train_steps(model, x)
    convert(model)
    _assert_blocks_decode_to(model[0])
    after = unpack(model[0].gguf_blocks.numpy(), scheme.upper())
    if before.scales is not None:  # K-quants: the float16 super-block scales stay, the integer sub-scales learn
        assert np.array_equal(after.d, before.d) and (before.dmin is None or np.array_equal(after.dmin, before.dmin))
        assert np.array_equal(after.scales, before.scales) != learn
        if before.mins is not None:
            assert np.array_equal(after.mins, before.mins) != learn
    else:  # Q4_1 / Q5_1: float16 d and m per block
        assert np.array_equal(after.d, before.d) != learn and np.array_equal(after.dmin, before.dmin) != learn


def test_pruned_zeros_stay_zero():
    model = _quantized("w4g32")
    layer = model[0]
    keep = torch.rand(layer.codes.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    layer.codes[~keep] = layer.zeros[0, 0].to(torch.uint8)  # value 0 exactly on the symmetric grid
    assert bool((layer.dequantized_weight()[~keep] == 0).all())
    prepare(model, sparse={"0"})
    _train_steps(model, torch.randn(6, 256), steps=6)
    convert(model)
    assert bool((model[0].dequantized_weight()[~keep] == 0).all())
