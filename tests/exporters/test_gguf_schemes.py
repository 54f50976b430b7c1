"""GGUF-named schemes beyond Q4_0/Q5_0/Q8_0 (q4_1 ... q6_k) and GGUF mixes (q4_k_m) as calibration grids:
layers hold llama.cpp's blocks, checkpoints store them, and the exporter writes them byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import squeeze
from squeeze import api
from squeeze.calib import CalibConfig, load_calibration
from squeeze.errors import SqueezeError
from squeeze.exporters.gguf.codecs import get_codec
from squeeze.model import load_tokenizer
from squeeze.modules import QuantLinear
from squeeze.scheme import GGUFMix, get_scheme

gguf = pytest.importorskip("gguf", reason="gguf-py is not installed (pip install 'squeeze-quant[gguf]')")
pytestmark = pytest.mark.usefixtures("llama_cpp")  # every test runs a file in llama.cpp (tests/conftest.py)

BLOCK_SCHEMES = ["q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _written(path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).reshape(-1).view(np.uint8).copy())
            for t in gguf.GGUFReader(str(path)).tensors}


def _one_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 24, bias=True))


@pytest.mark.parametrize("name", BLOCK_SCHEMES)
def test_rtn_layer_holds_llama_cpp_blocks(name):
    """RTN on a block scheme: the layer's bytes are llama.cpp's reference quantization of the weight, and its
    torch weight is bit-for-bit what gguf-py dequantizes from those bytes."""
    model = _one_linear()
    w = model[0].weight.detach().clone()
    squeeze.quantize(model, squeeze.RTN(scheme=get_scheme(name)))
    layer = model[0]
    assert isinstance(layer, QuantLinear) and layer.gguf_blocks is not None
    raw = layer.gguf_blocks.numpy()
    assert np.array_equal(raw, get_codec(name.upper()).quantize(w.numpy()))
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()]).reshape(w.shape)
    assert np.array_equal(layer.dequantized_weight().numpy(), theirs)


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q4_1"])
def test_gptq_and_awq_on_block_schemes(name, tiny256, calib_text):
    """GPTQ (with act-order: blocks fitted in column order) and AWQ on a block grid: every layer's stored
    bytes dequantize in gguf-py to exactly its torch weight, and GPTQ's logits on held-out text are closer
    to the float model's than RTN's on the same grid."""
    tok = load_tokenizer(tiny256)
    calib = load_calibration(tok, CalibConfig(None, 32, 128, 0))  # 4096 tokens: fewer let GPTQ overfit
    held_out = torch.tensor([tok(calib_text.read_text()[-3000:])["input_ids"][:128]])
    reference = api.load(tiny256)
    with torch.no_grad():
        ref = reference(held_out).logits
    error = {}
    for method in ("rtn", "gptq", "awq"):
        model = api.load(tiny256)
        config = {"rtn": squeeze.RTN(scheme=get_scheme(name)),
                  "gptq": squeeze.GPTQ(scheme=get_scheme(name), act_order=True),
                  "awq": squeeze.AWQ(scheme=get_scheme(name), n_grid=5)}[method]  # a coarse search: quick
        squeeze.quantize(model, config, calib)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 14
        for layer in layers:
            raw = layer.gguf_blocks.numpy()
            values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()])
            assert np.array_equal(layer.dequantized_weight().numpy(), values.reshape(layer.out_features, -1))
        with torch.no_grad():
            error[method] = float((model(held_out).logits - ref).pow(2).mean())
    assert error["gptq"] < error["rtn"], error


def test_block_checkpoint_round_trip(tiny256, tmp_path):
    """A q4_k GPTQ checkpoint stores `<layer>.gguf_blocks` (no GPTQ tensors), says so in config.json, and
    reloads to exactly the same logits."""
    from safetensors import safe_open

    calib = load_calibration(load_tokenizer(tiny256), CalibConfig(None, 8, 64, 0))
    config = squeeze.GPTQ(scheme=get_scheme("q4_k"))
    model = api.load(tiny256)
    squeeze.quantize(model, config, calib)
    out = api.save(model, tmp_path / "ck", config, source=tiny256)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "squeeze_gguf", "scheme": "q4_k"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.gguf_blocks" in keys and not any(k.endswith(".qweight") for k in keys)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    again = api.load(out)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.fixture(scope="module")
def mix_checkpoint(tiny256, tmp_path_factory):
    """`squeeze quantize --method gptq --scheme q4_k_m` through the CLI."""
    from squeeze.cli import main

    out = tmp_path_factory.mktemp("mix") / "q4km"
    assert main(["quantize", str(tiny256), "-o", str(out), "--method", "gptq", "--scheme", "q4_k_m",
                 "--nsamples", "32", "--seqlen", "128"]) == 0
    return out


def test_mix_scheme_layers_get_the_mix_types(mix_checkpoint):
    """Each layer is calibrated on the type llama.cpp's q4_k_m gives it: attn_v / ffn_down of layer 1
    (use_more_bits) Q6_K, the rest Q4_K."""
    meta = json.loads((mix_checkpoint / "squeeze.json").read_text())
    schemes = {n: r["scheme"] for n, r in meta["layers"].items()}
    assert schemes["model.layers.1.self_attn.v_proj"] == "q6_k" and schemes["model.layers.1.mlp.down_proj"] == "q6_k"
    assert schemes["model.layers.0.self_attn.v_proj"] == "q4_k" and schemes["model.layers.1.self_attn.q_proj"] == "q4_k"
    assert sum(s == "q6_k" for s in schemes.values()) == 2 and len(schemes) == 14
    assert meta["scheme"] == {"name": "q4_k_m", "mix": "q4_k_m"}


def test_mix_checkpoint_exports_byte_exact(mix_checkpoint, tiny256, tmp_path):
    """Default export of the q4_k_m checkpoint: type q4_k_m, the same per-tensor types as the float model's
    q4_k_m file, all 14 calibrated layers written from the checkpoint's bytes (q/k rows permuted whole), no
    re-rounding, and llama.cpp agrees with the torch model of those weights."""
    from safetensors import safe_open

    from squeeze.exporters.gguf.arch import qk_row_order

    art = api.export(mix_checkpoint, "gguf", tmp_path / "m.gguf")
    assert art.type == "q4_k_m"
    assert any(n.startswith("14 calibrated layer(s) written exactly") for n in art.notes), art.notes
    assert not any("re-rounded" in n for n in art.notes)
    assert art.verification["top1_agreement"] >= 0.95
    ours = _written(art.path)
    plain = _written(api.export(tiny256, "gguf", tmp_path / "f.gguf", qtype="q4_k_m", verify=False).path)
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in plain.items()}
    with safe_open(str(mix_checkpoint / "model.safetensors"), "pt") as f:
        v = f.get_tensor("model.layers.1.self_attn.v_proj.gguf_blocks").numpy()
        q = f.get_tensor("model.layers.0.self_attn.q_proj.gguf_blocks").numpy()
    assert ours["blk.1.attn_v.weight"][0] == "Q6_K" and np.array_equal(ours["blk.1.attn_v.weight"][1], v.reshape(-1))
    assert np.array_equal(ours["blk.0.attn_q.weight"][1], q[qk_row_order(256, 4)].reshape(-1))


def test_single_k_type_checkpoint_exports_pure_or_is_refused(tiny256, tmp_path):
    """A q4_k checkpoint (one grid) exports by default as the pure q4_k type (llama-quantize --pure); a mix
    that wants other types for some layers is refused with the way out, or re-rounded with --requantize."""
    from squeeze.cli import main

    ckpt = api.quantize_dir(tiny256, tmp_path / "ck", squeeze.RTN(scheme=get_scheme("q4_k")))
    art = api.export(ckpt, "gguf", tmp_path / "p.gguf")
    assert art.type == "q4_k"
    assert {t for t, _ in _written(art.path).values()} == {"Q4_K", "F32"}
    with pytest.raises(SqueezeError, match=r"stored exactly by Q4_K .*--scheme q4_k_m"):
        api.export(ckpt, "gguf", tmp_path / "x.gguf", qtype="q4_k_m", verify=False)
    assert main(["export", str(ckpt), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), "--type", "q6_k"]) == 2
    assert not (tmp_path / "x.gguf").exists()
    art = api.export(ckpt, "gguf", tmp_path / "x.gguf", qtype="q4_k_m", requantize=True, verify=False)
    assert any(n.startswith("warning: --requantize re-rounded 2") for n in art.notes), art.notes


def test_mix_scheme_needs_a_known_architecture():
    with pytest.raises(SqueezeError, match="needs a Hugging Face model"):
        squeeze.quantize(_one_linear(), squeeze.RTN(scheme=GGUFMix("q4_k_m")))
    with pytest.raises(SqueezeError, match="unknown scheme"):
        get_scheme("q4_k_x")


def test_gguf_schemes_are_fixed_grids():
    s = get_scheme("q6_k")
    assert (s.bits, s.symmetric, s.group_size, s.gguf_blocks) == (6, True, 16, True)
    assert not get_scheme("q4_0").gguf_blocks
    with pytest.raises(SqueezeError, match="fixed by its block format"):
        s.with_(group_size=32)


def test_block_checkpoint_to_onnx_is_refused_in_one_line(tiny256, tmp_path):
    """MatMulNBits has no sub-block scales or mins: exporting a q4_k checkpoint to ONNX says so (exit 2)."""
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'squeeze-quant[onnx]')")
    from squeeze.cli import main

    ckpt = api.quantize_dir(tiny256, tmp_path / "ck", squeeze.RTN(scheme=get_scheme("q4_k"), targets=("o_proj",)))
    with pytest.raises(SqueezeError, match="has no MatMulNBits form; export it with --to gguf"):
        api.export(ckpt, "onnx", tmp_path / "m.onnx")
    assert main(["export", str(ckpt), "--to", "onnx", "-o", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()


def test_mix_scheme_round_trips_through_a_recipe():
    from squeeze.recipe import Recipe

    recipe = Recipe((squeeze.GPTQ(scheme=get_scheme("q4_k_m")),))
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again.passes[0].scheme == GGUFMix("q4_k_m")
    assert Recipe.from_dict({"passes": [{"method": "awq", "scheme": "q5_k"}]}).passes[0].scheme == get_scheme("q5_k")
