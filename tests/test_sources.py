"""GGUF files as model inputs: load, quantize, evaluate and export them like model directories."""

from __future__ import annotations

import json

import pytest
import torch

import squeeze
from squeeze.api import evaluate
from squeeze.cli import main
from squeeze.errors import SqueezeError
from squeeze.model import load_tokenizer
from squeeze.modules import QuantLinear
from squeeze.sources import source_tokenizer, validate_source

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("llama_cpp")  # every test runs a file in llama.cpp (tests/conftest.py)
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory, stories_dir):
    """The bundled model written by squeeze as F32 and Q8_0 GGUF files (no model directory beside them)."""
    out = tmp_path_factory.mktemp("gguf-input")
    files = {}
    for qtype in ("f32", "q8_0"):
        files[qtype] = out / f"stories-{qtype}.gguf"
        squeeze.export(stories_dir, "gguf", files[qtype], qtype=qtype, verify=False)
    return files


def test_gguf_loads_as_the_float_model(stories_gguf, stories_dir):
    """transformers dequantizes an F32 file to exactly the source weights: logits equal the directory's."""
    ids = torch.tensor([[1, 400, 21, 300, 9, 77, 5, 250]])
    a = squeeze.load(stories_gguf["f32"])(ids).logits
    b = squeeze.load(stories_dir)(ids).logits
    assert next(squeeze.load(stories_gguf["f32"]).parameters()).dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gguf_tokenizer_matches_the_directory(stories_gguf, stories_dir, eval_text):
    text = eval_text.read_text()[:3000]
    want = load_tokenizer(stories_dir)(text)["input_ids"]
    assert source_tokenizer(stories_gguf["q8_0"])(text)["input_ids"] == want


def test_eval_gguf_without_reference_uses_its_own_tokenizer(stories_gguf, stories_dir, short_text):
    """No model directory beside the file: llama.cpp tokenizes, and the result equals the directory's ppl."""
    f32 = evaluate(stories_gguf["f32"], short_text, progress=False)
    ref = evaluate(stories_dir, short_text, progress=False)
    assert f32.tokens == ref.tokens
    # llama.cpp keeps its KV cache in float16 and its CPU kernels differ by build (-march=native when pip
    # compiles it): 1.1e-4 apart seen on a compiled build, so 5e-4, still far below any quantization effect
    assert f32.ppl == pytest.approx(ref.ppl, rel=5e-4)
    torch_run = evaluate(stories_gguf["f32"], short_text, runtime="torch", progress=False)
    assert torch_run.runtime == "torch" and torch_run.tokens == ref.tokens
    assert torch_run.ppl == pytest.approx(ref.ppl, rel=1e-6)


def test_quantize_a_gguf_file(stories_gguf, tmp_path, short_text, capsys):
    out = tmp_path / "w4"
    rc = main(["quantize", str(stories_gguf["q8_0"]), "-o", str(out), "--method", "rtn", "--bits", "4",
               "--group-size", "32"])
    assert rc == 0
    meta = json.loads((out / "squeeze.json").read_text())
    assert meta["source_model"]["path"] == str(stories_gguf["q8_0"])
    assert len(meta["source_model"]["sha256"]) == 64
    assert (out / "tokenizer.json").is_file()  # the GGUF's tokenizer, written as Hugging Face files
    model = squeeze.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 35
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(short_text), "--reference", str(stories_gguf["q8_0"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["kld"] < 0.5 and result["top1_agreement"] > 0.7


def test_export_a_gguf_file_to_onnx_and_gguf(stories_gguf, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_art = squeeze.export(stories_gguf["q8_0"], "onnx", tmp_path / "m.onnx")
    assert onnx_art.verification["top1_agreement"] == 1.0
    gguf_art = squeeze.export(stories_gguf["q8_0"], "gguf", tmp_path / "m-q4_0.gguf", qtype="q4_0")
    assert gguf_art.verification["top1_agreement"] > 0.9
    # nothing but the two outputs is left in the directory (the dequantized copies were temporary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-q4_0.gguf", "m.onnx"]


def test_bad_gguf_inputs_are_one_line_errors(tmp_path, short_text, capsys):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"hello")
    for argv in (["quantize", str(not_gguf), "-o", str(tmp_path / "o")],
                 ["eval", str(not_gguf), "--data", str(short_text)],
                 ["export", str(not_gguf), "--to", "onnx", "-o", str(tmp_path / "o.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "x.gguf" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SqueezeError, match="'rwkv6' model, which transformers cannot read from GGUF .*llama"):
        validate_source(path)
