"""GPTQ-layout checkpoints: exact integers on disk, identical logits after reload, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import squeeze
from squeeze.checkpoint import gptq as ckpt
from squeeze.errors import SqueezeError
from squeeze.modules import QuantLinear
from squeeze.primitives import fake_quant, unpack_rows

IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 300, 17, 99]])


def _quantized(model_dir, scheme_name, calib=None):
    model = squeeze.load(model_dir)
    squeeze.quantize(model, squeeze.RTN(scheme=squeeze.get_scheme(scheme_name)), calib)
    return model


@pytest.mark.parametrize("scheme_name", ["w4g32-asym", "w4g32", "w3g32-asym", "w5g64", "w8", "w2g32-asym", "w4-tensor"])
def test_save_load_gives_identical_logits_and_codes(stories_dir, tmp_path, scheme_name):
    model = _quantized(stories_dir, scheme_name)
    out = squeeze.save(model, tmp_path / "ckpt", source=stories_dir)
    loaded = squeeze.load(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            other = loaded.get_submodule(name)
            assert torch.equal(layer.codes, other.codes), name
            assert torch.equal(layer.zeros, other.zeros) and torch.equal(layer.scales, other.scales), name


def test_in_memory_model_equals_fake_quant_of_float_weights(stories_dir, tmp_path):
    """QuantLinear's weight is exactly primitives.fake_quant of the original weight, and so is the reloaded one."""
    float_model = squeeze.load(stories_dir)
    scheme = squeeze.get_scheme("w4g32-asym")
    fq = squeeze.load(stories_dir)
    with torch.no_grad():
        for name, m in fq.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(fake_quant(m.weight, scheme))
    model = _quantized(stories_dir, "w4g32-asym")
    loaded = squeeze.load(squeeze.save(model, tmp_path / "c", source=stories_dir))
    with torch.no_grad():
        ref = fq(IDS).logits
        assert torch.allclose(loaded(IDS).logits, ref, atol=1e-5, rtol=0)
        assert not torch.allclose(float_model(IDS).logits, ref, atol=1e-3)


def test_layout_is_gptq(stories_dir, tmp_path):
    model = _quantized(stories_dir, "w4g32")
    out = squeeze.save(model, tmp_path / "c", source=stories_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False
    }
    state = load_file(out / "model.safetensors")
    # down_proj: in=172 (not a multiple of 32: a short last group), out=64
    p = "model.layers.0.mlp.down_proj."
    assert state[p + "qweight"].dtype == torch.int32 and state[p + "qweight"].shape == (22, 64)  # ceil(172*4/32)
    assert state[p + "scales"].dtype == torch.float16 and state[p + "scales"].shape == (6, 64)
    assert state[p + "qzeros"].shape == (6, 8) and state[p + "g_idx"].tolist() == [i // 32 for i in range(172)]
    # symmetric 4-bit: zero point 8 stored as 8-1 in every nibble (the "gptq" v1 convention)
    assert torch.all(state[p + "qzeros"] == 0x77777777)
    layer = model.get_submodule(p[:-1])
    assert torch.equal(unpack_rows(state[p + "qweight"], 4, 172).t(), layer.codes)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state  # tied: stored once
    meta = json.loads((out / "squeeze.json").read_text())
    assert meta["scheme"]["name"] == "w4g32" and meta["source_model"]["sha256"]
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()


def test_act_order_g_idx_round_trip(stories_dir, tmp_path):
    """A permuted g_idx (GPTQ act-order) is stored and read back as is."""
    model = _quantized(stories_dir, "w4g32-asym")
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    perm = torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(0))
    layer.g_idx.copy_(layer.g_idx[perm])
    loaded = squeeze.load(squeeze.save(model, tmp_path / "c", source=stories_dir))
    assert torch.equal(loaded.get_submodule("model.layers.1.mlp.up_proj").g_idx, layer.g_idx)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_static_activation_scales_round_trip(stories_dir, tmp_path):
    from squeeze.calib import CalibConfig, load_calibration
    from squeeze.model import load_tokenizer

    calib = load_calibration(load_tokenizer(stories_dir), CalibConfig(nsamples=4, seqlen=64))
    model = _quantized(stories_dir, "w8a8", calib)
    out = squeeze.save(model, tmp_path / "c", source=stories_dir, calib=calib)
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.self_attn.q_proj.input_scale"].shape == ()
    loaded = squeeze.load(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    assert json.loads((out / "squeeze.json").read_text())["calibration"]["sha256"] == calib.sha256


def test_failed_write_leaves_nothing(stories_dir, tmp_path, monkeypatch):
    model = _quantized(stories_dir, "w4g32")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_checkpoint", broken)
    with pytest.raises(SqueezeError, match=r"cannot write output '.*/c': disk full"):  # one line naming the output
        squeeze.save(model, tmp_path / "c", source=stories_dir)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(stories_dir, tmp_path):
    model = _quantized(stories_dir, "w4g32")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(SqueezeError, match="--overwrite"):
        squeeze.save(model, tmp_path / "c", source=stories_dir)
    assert (tmp_path / "c" / "keep.txt").is_file()
    # --overwrite replaces a directory squeeze wrote (it holds squeeze.json), never a user's directory
    with pytest.raises(SqueezeError, match="squeeze did not write"):
        squeeze.save(model, tmp_path / "c", source=stories_dir, overwrite=True)
    assert (tmp_path / "c" / "keep.txt").is_file()
    (tmp_path / "c" / "keep.txt").unlink()
    squeeze.save(model, tmp_path / "c", source=stories_dir, overwrite=True)  # an empty directory may be filled
    (tmp_path / "c" / "extra.txt").write_text("x")
    squeeze.save(model, tmp_path / "c", source=stories_dir, overwrite=True)  # squeeze's own output is replaced
    assert not (tmp_path / "c" / "extra.txt").exists() and (tmp_path / "c" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_save_without_quantized_layers_is_refused(stories_dir, tmp_path):
    with pytest.raises(SqueezeError, match="no quantized layers"):
        squeeze.save(squeeze.load(stories_dir), tmp_path / "c")
