"""RTN across model families, dtypes and plain nn.Modules; target/ignore matching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeeze
from squeeze.errors import SqueezeError
from squeeze.model import find_blocks, select_linears
from squeeze.modules import QuantLinear

IDS = torch.tensor([[1, 40, 41, 261, 378, 432, 383, 286]])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_rtn_round_trip_per_family(tiny_models, tmp_path, family):
    model = squeeze.load(tiny_models[family])
    with torch.no_grad():
        ref = model(IDS).logits
    records = squeeze.quantize(model, squeeze.RTN(scheme=squeeze.get_scheme("w8")))
    n_blocks = len(find_blocks(model)[1])
    per_block = {"llama": 7, "qwen2": 7, "gpt2": 4}[family]
    assert len(records) == n_blocks * per_block
    with torch.no_grad():
        out = model(IDS).logits
    # 8-bit per-channel on random weights: logits move by well under 1% of their spread
    assert (out - ref).abs().max() < 0.01 * ref.std() * 10
    loaded = squeeze.load(squeeze.save(model, tmp_path / "c", source=tiny_models[family]))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, out)


def test_gpt2_conv1d_is_quantized_as_linear(tiny_models):
    model = squeeze.load(tiny_models["gpt2"])
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight is [in, out]
    x = torch.randn(2, 5, conv.weight.shape[0])
    with torch.no_grad():
        ref = conv(x)
    squeeze.quantize(model, squeeze.RTN(scheme=squeeze.get_scheme("w8"), targets=("transformer.h.0.mlp.c_fc",)))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, QuantLinear) and layer.in_features == conv.weight.shape[0]
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=0.02 * ref.abs().max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models(stories_copy_as, short_text, tmp_path, dtype):
    src = stories_copy_as(dtype)
    out = squeeze.quantize_dir(src, tmp_path / "c", squeeze.RTN(scheme=squeeze.get_scheme("w8")))
    model = squeeze.load(out)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    res = squeeze.evaluate(out, short_text, reference=src, progress=False)
    # 8-bit weights on a 16-bit model: next-token choice almost never changes
    assert res.top1_agreement > 0.97 and res.kld < 0.01


def test_plain_module_default_targets_all_linears():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    ref = net(x)
    records = squeeze.quantize(net, squeeze.RTN(scheme=squeeze.get_scheme("w8")))
    assert set(records) == {"0", "2"} and all(isinstance(net[i], QuantLinear) for i in (0, 2))
    assert (net(x) - ref).abs().max() < 0.02 * ref.abs().max()


def test_default_targets_skip_lm_head_and_embeddings(stories_dir):
    model = squeeze.load(stories_dir)
    names = select_linears(model)
    assert len(names) == 35 and all(n.startswith("model.layers.") for n in names)
    assert "lm_head" in select_linears(model, targets=["lm_head"])


def test_targets_and_ignore_patterns(stories_dir):
    model = squeeze.load(stories_dir)
    assert len(select_linears(model, targets=["q_proj"])) == 5
    assert len(select_linears(model, targets=["re:.*layers\\.[01]\\..*"])) == 14
    assert len(select_linears(model, targets=["*.mlp.*"], ignore=["down_proj"])) == 10
    with pytest.raises(SqueezeError, match="no Linear layers matched targets=\\['nothing'\\]"):
        select_linears(model, targets=["nothing"])


def test_quantizing_lm_head_keeps_embedding_float(stories_dir, tmp_path):
    model = squeeze.load(stories_dir)
    emb = model.model.embed_tokens.weight.detach().clone()
    squeeze.quantize(model, squeeze.RTN(scheme=squeeze.get_scheme("w8"), targets=("lm_head", "q_proj")))
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    loaded = squeeze.load(squeeze.save(model, tmp_path / "c", source=stories_dir))
    assert isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
