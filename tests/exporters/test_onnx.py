"""ONNX export of the bundled stories260K LM: fp32, fp16, int4 MatMulNBits, W8A8 QDQ, all run in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import squeeze  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig  # noqa: E402
from squeeze.cli import main  # noqa: E402
from squeeze.errors import SqueezeError  # noqa: E402
from squeeze.eval.onnxruntime import OrtRuntime  # noqa: E402
from squeeze.exporters.onnx import matmulnbits  # noqa: E402
from squeeze.modules import QuantLinear  # noqa: E402
from squeeze.passes.rtn import RTN  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(stories_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-ckpt")
    w4 = api.quantize_dir(stories_dir, root / "w4", RTN(scheme=squeeze.get_scheme("w4g32-asym")))
    w8a8 = api.quantize_dir(stories_dir, root / "w8a8", RTN(scheme=squeeze.get_scheme("w8a8")),
                            CalibConfig(nsamples=8, seqlen=64))
    return {"w4": w4, "w8a8": w8a8}


@pytest.fixture(scope="module")
def exported(stories_dir, checkpoints, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("onnx-out")
    return {
        "fp32": api.export(stories_dir, "onnx", root / "fp32.onnx", qtype="fp32", verify=True),
        "fp16": api.export(stories_dir, "onnx", root / "fp16.onnx", qtype="fp16", verify=True),
        "w4": api.export(checkpoints["w4"], "onnx", root / "w4.onnx", verify=True),
        "w8a8": api.export(checkpoints["w8a8"], "onnx", root / "w8a8.onnx", verify=True),
    }


def _initializers(path: Path) -> dict[str, torch.Tensor]:
    model = onnx.load(str(path))
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def _nodes(path: Path, op: str) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def test_fp32_matches_torch_and_perplexity(exported, stories_dir, short_text):
    art = exported["fp32"]
    onnx.checker.check_model(str(art.path))
    # The bound for fp32: max relative difference < 1e-4 (measured ~7e-7: only summation order differs).
    assert art.verification["max_rel_diff"] < 1e-4
    onnx_ppl = api.evaluate(art.path, short_text, ctx=128, progress=False)
    torch_ppl = api.evaluate(stories_dir, short_text, ctx=128, progress=False)
    assert onnx_ppl.runtime == "onnxruntime"
    # Acceptance: within 0.1% of torch (measured ~1e-8 relative).
    assert abs(onnx_ppl.ppl / torch_ppl.ppl - 1) < 1e-3


def test_fp16_runs_and_agrees(exported):
    art = exported["fp16"]
    v = art.verification
    # fp16 weights and activations against the fp32 torch model: near-identical distributions
    # (measured KLD ~4e-6, top-1 1.0); a broken graph would be far off.
    assert v["top1_agreement"] > 0.98 and v["kld"] < 1e-3
    assert art.size_bytes < exported["fp32"].size_bytes * 0.7
    assert {i.type.tensor_type.elem_type for i in onnx.load(str(art.path)).graph.output} == {onnx.TensorProto.FLOAT16}


def test_int4_matmulnbits_carries_squeeze_integers_exactly(exported, checkpoints):
    path = exported["w4"].path
    inits = _initializers(path)
    model = squeeze.load(checkpoints["w4"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    nodes = _nodes(path, "MatMulNBits")
    assert len(nodes) == len(layers) == 35  # 5 layers x 7 projections
    by_prefix = {}
    for node in nodes:
        b_name = node.input[1]
        by_prefix[b_name.rsplit(".", 1)[0]] = node  # initializers carry the checkpoint's tensor names
    assert set(by_prefix) == set(layers)
    for name, layer in layers.items():
        node = by_prefix[name]
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (
            layer.in_features, layer.out_features, 4, 32)
        packed, scales, zps = (inits[i] for i in node.input[1:4])
        n_blocks = layer.scales.shape[1]
        assert torch.equal(matmulnbits.unpack_weight(packed, 4, layer.in_features), layer.codes)
        assert torch.equal(scales.reshape(layer.out_features, n_blocks), layer.scales)
        zeros = matmulnbits.unpack_zero_points(zps, 4, layer.out_features, n_blocks)
        assert torch.equal(zeros.float(), layer.zeros)
    # down_proj: K=172 is not a multiple of the block size 32; the last block holds 12 real columns.
    down = by_prefix["model.layers.0.mlp.down_proj"]
    assert {a.name: a.i for a in down.attribute}["K"] == 172
    assert tuple(inits[down.input[1]].shape) == (64, 6, 16)


def test_int4_perplexity_equals_torch(exported, checkpoints, short_text):
    onnx_ppl = api.evaluate(exported["w4"].path, short_text, ctx=128, progress=False).ppl
    torch_ppl = api.evaluate(checkpoints["w4"], short_text, ctx=128, progress=False).ppl
    # Acceptance: within 0.5%. MatMulNBits at accuracy_level 0 dequantizes to float, so the only
    # difference is summation order (measured ~1e-8 relative).
    assert abs(onnx_ppl / torch_ppl - 1) < 5e-3
    assert exported["w4"].verification["top1_agreement"] == 1.0


def test_w8a8_qdq_uses_calibrated_scales_and_codes(exported, checkpoints):
    path = exported["w8a8"].path
    inits = _initializers(path)
    model = squeeze.load(checkpoints["w8a8"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    quant_nodes = _nodes(path, "QuantizeLinear")
    weight_dq = [n for n in _nodes(path, "DequantizeLinear") if n.input[0].endswith("weight_q")]
    assert len(quant_nodes) == len(weight_dq) == len(layers) == 35
    for node in weight_dq:
        name = node.input[0].rsplit(".", 1)[0]
        layer = layers[name]
        weight, scale, zero = (inits[i] for i in node.input)
        # Symmetric 8-bit codes c (zero point 128) are written as int8 c - 128 with zero point 0, transposed.
        assert weight.dtype == torch.int8 and torch.equal(zero, torch.zeros_like(zero))
        assert torch.equal((weight.to(torch.int16) + 128).t(), layer.codes.to(torch.int16))
        assert torch.equal(scale, layer.scales[:, 0])
    act_scales = sorted(float(inits[n.input[1]]) for n in quant_nodes)
    assert act_scales == sorted(float(m.input_scale) for m in layers.values())
    assert {int(inits[n.input[2]]) for n in quant_nodes} == {128}  # uint8 zero point 128 == symmetric int8
    # Against squeeze's fake-quant torch model: measured max relative difference ~5e-7, top-1 1.0.
    assert exported["w8a8"].verification["top1_agreement"] > 0.99


def test_runtime_reports_metadata_and_tokenizer(exported):
    rt = OrtRuntime.from_path(exported["fp32"].path)
    assert (rt.vocab_size, rt.max_context, rt.kind) == (512, 512, "causal-lm")
    assert rt.tokenizer is not None  # found through the recorded source model directory
    assert rt.logits(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


def test_broken_graph_fails_export_with_exit_1(checkpoints, tmp_path, monkeypatch, capsys):
    real = matmulnbits.pack_weight

    def scrambled(codes, zeros, bits, block_size):
        return real(codes.flip(1), zeros, bits, block_size)

    monkeypatch.setattr(matmulnbits, "pack_weight", scrambled)
    out = tmp_path / "bad.onnx"
    # Codes in the wrong column order: the graph runs, but its logits no longer follow the weights.
    assert main(["export", str(checkpoints["w4"]), "--to", "onnx", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: verification failed: top-1 agreement" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_cli_export_and_eval(stories_dir, exported, short_text, tmp_path, capsys):
    assert main(["export", str(stories_dir), "--to", "onnx", "-o", str(tmp_path / "m.onnx"), "--type", "int3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown ONNX --type 'int3'") and "\n" not in err
    assert main(["eval", str(exported["w4"].path), "--data", str(short_text), "--ctx", "64", "--json"]) == 0
    assert '"runtime": "onnxruntime"' in capsys.readouterr().out


def test_bad_options_fail_before_work(stories_dir, tmp_path):
    with pytest.raises(SqueezeError, match="must end in .onnx"):
        api.export(stories_dir, "onnx", tmp_path / "model.bin")
    with pytest.raises(SqueezeError, match="--requantize does not apply"):
        api.export(stories_dir, "onnx", tmp_path / "m.onnx", requantize=True)


def test_external_data_file_moves_with_the_graph(checkpoints, tmp_path):
    # Weights past EXTERNAL_DATA_THRESHOLD (~2 GB) go to FILE.onnx.data automatically; forced here.
    out = tmp_path / "ext.onnx"
    art = api.export(checkpoints["w4"], "onnx", out, external_data=True, verify=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file() and out.stat().st_size < data.stat().st_size
    assert art.size_bytes == out.stat().st_size + data.stat().st_size
    assert art.verification["top1_agreement"] == 1.0  # onnxruntime read the weights from the data file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_kv_cache_graph_decodes_token_by_token(stories_dir, tmp_path):
    from squeeze.eval.runtimes import TorchRuntime

    art = api.export(stories_dir, "onnx", tmp_path / "kv.onnx", kv_cache=True)
    v = art.verification
    # Prefill plus 4 single-token steps fed from the presents, each against torch on the whole sequence:
    # the fp32 bound holds at every step (measured ~7e-7).
    assert v["decode_steps"] == 4 and v["max_rel_diff"] < 1e-4
    rt = OrtRuntime.from_path(art.path)
    prompt = torch.tensor([[1, 403, 261, 378]])
    assert torch.equal(rt.decode(prompt, 6), TorchRuntime(squeeze.load(stories_dir)).decode(prompt, 6))
