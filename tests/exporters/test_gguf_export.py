"""GGUF export: files llama.cpp loads, mixes and bytes identical to llama.cpp's own quantizer, exact checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from squeeze import api
from squeeze.errors import SqueezeError, VerificationError
from squeeze.exporters.gguf.codecs import unpack
from squeeze.exporters.gguf.mixes import MIXES

gguf = pytest.importorskip("gguf", reason="gguf-py is not installed (pip install 'squeeze-quant[gguf]')")
pytestmark = pytest.mark.usefixtures("llama_cpp")  # every test runs a file in llama.cpp (tests/conftest.py)

QUANT_MIXES = [name for name, mix in MIXES.items() if mix.default.startswith("Q")]


def tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensor name -> (ggml type name, raw bytes)."""
    return {t.name: (t.tensor_type.name, np.asarray(t.data).reshape(-1).view(np.uint8).copy())
            for t in gguf.GGUFReader(str(path)).tensors}


def llama_quantize(llama_cpp, src: Path, out: Path, mix: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, one thread) on ``src``."""
    from squeeze.eval.llamacpp import quiet_stderr

    with quiet_stderr():
        llama_cpp.quantize(src, out, MIXES[mix].ftype, MIXES[mix].pure, n_threads=1)
    return out


def vocab_tokenize(llama_cpp, path: Path, text: str, add_bos: bool) -> list[int]:
    """``text`` tokenized by llama.cpp with the vocabulary of the GGUF file at ``path`` (no weights loaded)."""
    from squeeze.eval.llamacpp import quiet_stderr

    with quiet_stderr():
        vocab = llama_cpp.open(path, n_ctx=0, n_threads=1, vocab_only=True)
    return vocab.tokenize(text, add_bos=add_bos)


@pytest.fixture(scope="module")
def tiny256_f32(tiny256, tmp_path_factory) -> Path:
    return api.export(tiny256, "gguf", tmp_path_factory.mktemp("t256") / "f32.gguf", qtype="f32", verify=False).path


def test_stories_f32_is_the_torch_model(stories_dir, tmp_path):
    """f32: every tensor F32, and llama.cpp agrees with torch on all 252 verification tokens (KLD ~1e-6)."""
    art = api.export(stories_dir, "gguf", tmp_path / "s.gguf", qtype="f32")
    assert {t for t, _ in tensors(art.path).values()} == {"F32"}
    assert len(tensors(art.path)) == 47  # token_embd + 5 x 9 + output_norm; tied: no output.weight
    assert art.verification["top1_agreement"] == 1.0
    assert art.verification["kld"] < 1e-5


@pytest.mark.parametrize("mix", list(MIXES))
def test_every_type_exports_verifies_and_generates(mix, stories_dir, tmp_path):
    """Each --type loads in llama.cpp, agrees with torch of the same weights (>= 95% top-1), and generates."""
    from squeeze.eval.llamacpp import LlamaCppRuntime
    from squeeze.model import load_tokenizer

    art = api.export(stories_dir, "gguf", tmp_path / f"{mix}.gguf", qtype=mix)
    # float files agree to KLD ~1e-6; quantized ones differ only by llama.cpp's 8-bit activations (~1e-3)
    assert art.verification["kld"] < (1e-4 if mix in ("f32", "f16", "bf16") else 5e-3)
    assert art.verification["top1_agreement"] >= 0.95
    tok = load_tokenizer(stories_dir)
    out = LlamaCppRuntime(art.path).generate(tok("Once upon a time")["input_ids"], 12)
    assert len(out) == 12 and len(tok.decode(out).strip()) > 0


def test_cached_decode_equals_rerunning_the_sequence(stories_dir, tmp_path):
    """`LlamaCppRuntime.decode` (llama.cpp's KV cache, what --latency times) picks the tokens a full forward of
    the growing sequence picks."""
    import torch

    from squeeze.eval.llamacpp import LlamaCppRuntime

    rt = LlamaCppRuntime(api.export(stories_dir, "gguf", tmp_path / "f32.gguf", qtype="f32", verify=False).path)
    prompt = torch.tensor([[1, 403, 261, 462], [1, 66, 77, 88]])
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, rt.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(rt.decode(prompt, 8), ids)


def test_stories_fallbacks_are_reported(stories_dir, tmp_path):
    """Hidden 64 / FFN 172: K-quants fall back to Q5_0 and ffn_down to F16, as llama.cpp does, and the notes say so."""
    art = api.export(stories_dir, "gguf", tmp_path / "k.gguf", qtype="q4_k_m", verify=False)
    notes = "\n".join(art.notes)
    assert "blk.*.ffn_down.weight written as F16 instead of Q4_K" in notes
    assert "written as Q5_0 instead of Q4_K" in notes
    types = {n: t for n, (t, _) in tensors(art.path).items()}
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "F16"
    assert types["token_embd.weight"] == "Q8_0"  # tied: treated as the output (Q6_K), 64 columns -> Q8_0


@pytest.mark.parametrize("mix", QUANT_MIXES)
def test_types_and_bytes_equal_llama_cpp_quantizer(mix, tiny256, tiny256_f32, tmp_path, llama_cpp):
    """Per tensor, squeeze's mix picks llama_model_quantize's type and writes byte-identical blocks.

    Identical bytes imply squeeze's squared error equals llama.cpp's, tensor by tensor (the issue asks
    for "no worse"); the error check below states that bound directly.
    """
    ours = tensors(api.export(tiny256, "gguf", tmp_path / "s.gguf", qtype=mix, verify=False).path)
    theirs = tensors(llama_quantize(llama_cpp, tiny256_f32, tmp_path / "l.gguf", mix))
    source = tensors(tiny256_f32)
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    from squeeze.exporters.gguf.codecs import get_codec

    for name, (qtype, raw) in ours.items():
        ref = source[name][1].view(np.float32)
        err = lambda r: float(((get_codec(qtype).dequantize(r[None])[0] - ref).astype(np.float64) ** 2).sum())  # noqa: E731
        assert err(raw) <= err(theirs[name][1]) * (1 + 1e-9), name
        assert np.array_equal(raw, theirs[name][1]), name


def test_k_mix_uses_k_quants_on_256_rows(tiny256, tmp_path):
    """q4_k_m on hidden 256 / 2 layers: attn_v and ffn_down of layer 1 (use_more_bits) are Q6_K, the rest Q4_K, output Q6_K."""
    types = {n: t for n, (t, _) in tensors(api.export(tiny256, "gguf", tmp_path / "k.gguf", qtype="q4_k_m").path).items()}
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"  # untied: the default type


def test_qwen2_with_biases(tiny_models, tmp_path):
    """qwen2 (NEOX rope, q/k/v biases, untied) exports and llama.cpp agrees with torch."""
    art = api.export(tiny_models["qwen2"], "gguf", tmp_path / "q.gguf", qtype="f32")
    names = tensors(art.path)
    assert "blk.0.attn_q.bias" in names and "output.weight" in names
    assert art.verification["top1_agreement"] == 1.0 and art.verification["kld"] < 1e-5


def test_llama_cpp_tokenizes_like_hf(stories_dir, eval_text, tmp_path, llama_cpp):
    """The embedded SentencePiece vocabulary tokenizes the eval text exactly like the HF tokenizer (BOS included)."""
    from squeeze.model import load_tokenizer

    art = api.export(stories_dir, "gguf", tmp_path / "s.gguf", qtype="q8_0", verify=False)
    text = eval_text.read_text()[:20000]
    ours = vocab_tokenize(llama_cpp, art.path, text, add_bos=True)
    assert ours == load_tokenizer(stories_dir)(text)["input_ids"]


def test_broken_file_fails_verification_and_is_removed(stories_dir, tmp_path, monkeypatch):
    """Without the q/k permutation llama.cpp's rope pairs the wrong dims: top-1 falls to ~0.2, exit 1, no file."""
    import squeeze.exporters.gguf.plan as plan
    from squeeze.cli import main

    monkeypatch.setattr(plan, "qk_heads", lambda *a, **k: None)
    out = tmp_path / "bad.gguf"
    with pytest.raises(VerificationError, match="top-1 agreement"):
        api.export(stories_dir, "gguf", out, qtype="f32")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["export", str(stories_dir), "--to", "gguf", "-o", str(out), "--type", "f32"]) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------- squeeze checkpoints


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory):
    import squeeze
    from squeeze.scheme import get_scheme

    def make(scheme: str) -> Path:
        out = tmp_path_factory.mktemp("ckpt") / scheme
        return api.quantize_dir(squeeze.resources.DEFAULT_MODEL, out, squeeze.RTN(scheme=get_scheme(scheme)))

    return make


def test_checkpoint_written_exactly(rtn_checkpoint, tmp_path):
    """w4g32 (sym) is the Q4_0 grid: codes and fp16 scales land in the blocks unchanged (q/k rows permuted)."""
    from squeeze.exporters.gguf.arch import qk_row_order
    from squeeze.exporters.gguf.source import ModelSource

    ckpt = rtn_checkpoint("w4g32")
    art = api.export(ckpt, "gguf", tmp_path / "c.gguf")  # default --type: the exact one
    assert art.type == "q4_0"
    assert any("30 calibrated layer(s) written exactly" in n for n in art.notes)  # q,k,v,o,gate,up x 5
    assert art.verification["top1_agreement"] >= 0.95
    src, written = ModelSource(ckpt), tensors(art.path)
    for hf, gg, order in (("model.layers.1.self_attn.o_proj.weight", "blk.1.attn_output.weight", None),
                          ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", qk_row_order(64, 8))):
        layer = src.quant_layer(hf)
        qtype, raw = written[gg]
        qb = unpack(raw.reshape(layer.codes.shape[0], -1), qtype)
        rows = slice(None) if order is None else order
        assert qtype == "Q4_0"
        assert np.array_equal(qb.codes.reshape(layer.codes.shape), layer.codes[rows])
        assert np.array_equal(qb.d.astype(np.float32), layer.scales[rows])


def test_checkpoint_grid_mismatch_is_refused_or_requantized(rtn_checkpoint, tmp_path):
    from squeeze.cli import main

    ckpt = rtn_checkpoint("w4g32")
    with pytest.raises(SqueezeError, match=r"stored exactly by Q4_0 \(--type q4_0\)"):
        api.export(ckpt, "gguf", tmp_path / "x.gguf", qtype="q8_0", verify=False)
    assert main(["export", str(ckpt), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), "--type", "q8_0"]) == 2
    art = api.export(ckpt, "gguf", tmp_path / "x.gguf", qtype="q8_0", requantize=True, verify=False)
    assert any(n.startswith("warning: --requantize re-rounded 30") for n in art.notes)


def test_asym_checkpoint_to_q4_1_keeps_codes(rtn_checkpoint, tmp_path):
    """w4g32-asym -> Q4_1: codes and scales exact; the min -scale*zero is rounded to fp16 (<= half an fp16 ulp)."""
    from squeeze.exporters.gguf.codecs import dequantize_blocks
    from squeeze.exporters.gguf.source import ModelSource

    ckpt = rtn_checkpoint("w4g32-asym")
    art = api.export(ckpt, "gguf", tmp_path / "a.gguf", verify=False)
    assert art.type == "q4_1"
    layer = ModelSource(ckpt).quant_layer("model.layers.0.self_attn.o_proj.weight")
    qtype, raw = tensors(art.path)["blk.0.attn_output.weight"]
    qb = unpack(raw.reshape(64, -1), qtype)
    assert np.array_equal(qb.codes.reshape(64, 64), layer.codes)
    m = -layer.scales * layer.zeros
    assert np.all(np.abs(qb.dmin.astype(np.float32) - m) <= np.spacing(np.abs(m).astype(np.float16)).astype(np.float32) / 2)
    err = np.abs(dequantize_blocks(qb).reshape(64, 64) - layer.dequantize()).max()
    assert err < 1e-3 * np.abs(layer.dequantize()).max()


# ------------------------------------------------------------------------------- calibrated grids


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gptq_on_gguf_grid_writes_exact_blocks(qtype):
    """GPTQ with GGUFGrid: its values are exactly what gguf-py dequantizes from the packed blocks, and its
    Hessian-weighted error is below RTN's (what GPTQ is for)."""
    from squeeze.exporters.gguf.codecs import get_codec, pack
    from squeeze.exporters.gguf.grid import GGUFGrid
    from squeeze.passes.gptq_core import gptq_quantize

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 256, generator=gen)
    x = torch.randn(2048, 256, generator=gen) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=gen) / 16)
    hessian = 2 * x.t() @ x / x.shape[0]
    grid = GGUFGrid(qtype)
    result = gptq_quantize(weight, hessian, grid)
    raw = pack(grid.blocks(result.params, result.codes))
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(16, 256)
    assert np.array_equal(values, result.values.numpy())
    codec = get_codec(qtype)
    rtn = torch.from_numpy(codec.dequantize(codec.quantize(weight.numpy())))
    err = lambda v: float(torch.einsum("ij,jk,ik->", v - weight, hessian, v - weight))  # noqa: E731
    assert err(result.values) < err(rtn)


def test_bpe_tokenizer_json_qwen2(tmp_path, calib_text, eval_text, llama_cpp):
    """A byte-level BPE tokenizer.json (Qwen2's pre-tokenizer regex) is embedded as "gpt2"/"qwen2":
    llama.cpp tokenizes 20,000 characters of the eval text exactly like the HF tokenizer, and the
    qwen2 model verifies (top-1 1.0)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from squeeze.model import load_tokenizer

    qwen2_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2_regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = calib_text.read_text()[:200000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    model_dir = tmp_path / "qwen2-bpe"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(model_dir)
    art = api.export(model_dir, "gguf", tmp_path / "q.gguf", qtype="f32")
    assert art.verification["top1_agreement"] == 1.0
    sample = eval_text.read_text()[:20000]
    assert vocab_tokenize(llama_cpp, art.path, sample, add_bos=False) == load_tokenizer(model_dir)(sample)["input_ids"]


def test_gguf_scheme_gptq_checkpoint_exports_exactly(tiny_models, tmp_path):
    """`--scheme q4_0`: GPTQ rounds onto llama.cpp's Q4_0 block grid; the checkpoint's integers become the
    file's blocks (14 layers exact: 7 linears x 2 blocks), and llama.cpp agrees with torch on them."""
    from squeeze.calib import CalibConfig
    from squeeze.exporters.gguf.grid import GGUFGrid
    from squeeze.grid import grid_for
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    scheme = get_scheme("q4_0")
    assert scheme.name == "q4_0" and grid_for(scheme) == GGUFGrid("Q4_0")
    ckpt = api.quantize_dir(tiny_models["llama"], tmp_path / "ckpt", GPTQ(scheme=scheme), CalibConfig(None, 8, 64, 0))
    art = api.export(ckpt, "gguf", tmp_path / "g.gguf")
    assert art.type == "q4_0"
    assert any(n.startswith("14 calibrated layer(s) written exactly") for n in art.notes)
    assert art.verification["top1_agreement"] >= 0.95


def test_calibrated_q4_0_mix_keeps_llamacpps_imatrix_types():
    """llama-quantize given an imatrix writes ffn_down of the first n_layer/8 layers of a Q4_0 file as Q4_1
    (SmolLM2: layers 0-2 of 30, 166,144 bytes more). `--scheme q4_0-mix` calibrates on those types, and the
    export keeps them; a plain (uncalibrated) export keeps llama.cpp's types without an imatrix."""
    from squeeze.exporters.gguf.mixes import choose_type, get_mix
    from squeeze.scheme import GGUFMix, get_scheme

    mix = get_mix("q4_0")
    down = lambda i, calibrated: choose_type(mix, f"blk.{i}.ffn_down.weight", (576, 1536), i, 30, 3, True,  # noqa: E731
                                             calibrated)[0]
    assert [down(i, True) for i in (0, 2, 3)] == ["Q4_1", "Q4_1", "Q4_0"]
    assert [down(i, False) for i in (0, 2, 3)] == ["Q4_0", "Q4_0", "Q4_0"]
    assert choose_type(mix, "blk.0.attn_q.weight", (576, 576), 0, 30, 3, True, True)[0] == "Q4_0"
    scheme = get_scheme("q2_k-mix")
    assert scheme == GGUFMix("q2_k") and scheme.name == "q2_k-mix"
    assert get_scheme("q2_k").gguf == "q2_k"  # the block type keeps its name
