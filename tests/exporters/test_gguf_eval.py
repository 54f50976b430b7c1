"""The llama.cpp runtime: same evaluation protocol as torch, through `squeeze eval FILE.gguf`."""

from __future__ import annotations

import json

import pytest
import torch

from squeeze import api
from squeeze.model import load_tokenizer

pytest.importorskip("gguf", reason="gguf-py is not installed (pip install 'squeeze-quant[gguf]')")
pytestmark = pytest.mark.usefixtures("llama_cpp")  # every test runs a file in llama.cpp (tests/conftest.py)


@pytest.fixture(scope="module")
def stories_gguf(stories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {t: api.export(stories_dir, "gguf", root / f"{t}.gguf", qtype=t, verify=False).path for t in ("f32", "f16")}


@pytest.fixture(scope="module")
def torch_ppl(stories_dir, short_text) -> float:
    return api.evaluate(stories_dir, short_text, progress=False).ppl


def test_runtime_reads_the_file(stories_gguf):
    from squeeze.eval.llamacpp import LlamaCppRuntime

    rt = LlamaCppRuntime(stories_gguf["f32"])
    assert (rt.name, rt.vocab_size, rt.max_context) == ("llama.cpp", 512, 512)  # stories260K's config
    assert rt.tokenizer is None  # no HF tokenizer beside the file
    assert rt.size_bytes == stories_gguf["f32"].stat().st_size


def test_windows_run_exactly_as_given_and_deterministically(stories_gguf, stories_dir, short_text):
    """Windows starting mid-text (no BOS) match torch to KLD < 1e-5; an inserted BOS would shift every position."""
    from squeeze.calib import tokenize_stream
    from squeeze.eval.llamacpp import LlamaCppRuntime
    from squeeze.eval.metrics import LMStats
    from squeeze.eval.runtimes import TorchRuntime
    from squeeze.model import load_tokenizer

    stream = tokenize_stream(load_tokenizer(stories_dir), short_text.read_text())
    batch = torch.stack([stream[100:228], stream[300:428]])
    assert int(batch[0, 0]) != 1  # not BOS
    rt = LlamaCppRuntime(stories_gguf["f32"])
    got = rt.logits(batch)
    assert torch.equal(got, rt.logits(batch))  # fixed threads, single sequence: bit-for-bit repeatable
    want = TorchRuntime(api.load(stories_dir)).logits(batch)
    stats = LMStats()
    stats.update(got[:, :-1], batch[:, 1:], want[:, :-1])
    assert stats.kld < 1e-5 and stats.top1_agreement == 1.0


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_cli_eval_gguf_matches_torch_perplexity(qtype, stories_gguf, stories_dir, short_text, torch_ppl, capsys):
    """`squeeze eval x.gguf --reference DIR --json`: float GGUF perplexity within 0.1% of torch's (acceptance)."""
    from squeeze.cli import main

    capsys.readouterr()
    rc = main(["eval", str(stories_gguf[qtype]), "--data", str(short_text), "--reference", str(stories_dir), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == "llama.cpp" and result["ctx"] == 512
    assert abs(result["ppl"] / torch_ppl - 1) < 1e-3
    assert result["kld"] < 1e-4 and result["top1_agreement"] > 0.99


def test_eval_gguf_alone_uses_the_files_tokenizer(stories_gguf, stories_dir, short_text):
    """No model directory beside the file and no --reference: the GGUF's own vocabulary tokenizes (in
    llama.cpp), giving the same tokens and perplexity as with the source directory's tokenizer."""
    alone = api.evaluate(stories_gguf["f32"], short_text, progress=False)
    with_dir = api.evaluate(stories_gguf["f32"], short_text, tokenizer=load_tokenizer(stories_dir), progress=False)
    assert alone.tokens == with_dir.tokens and alone.ppl == pytest.approx(with_dir.ppl, rel=1e-9)
