"""int4 as blocked INT4 DequantizeLinear -> MatMul (TensorRT's INT4 weight-only form), checked in onnxruntime.

No GPU here: the graph `squeeze export --to tensorrt --type int4` builds from is exported with the same
options and run in onnxruntime; TensorRT's refusals are checked through the CLI before any engine work.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
from squeeze.exporters import tensorrt as trt_export  # noqa: E402
from squeeze.exporters.onnx import ONNXExport  # noqa: E402
from squeeze.exporters.onnx.dqblock import pack_int4_pairs  # noqa: E402
from squeeze.modules import QuantLinear  # noqa: E402
from squeeze.passes.gptq import GPTQ  # noqa: E402
from squeeze.passes.rtn import RTN  # noqa: E402

CALIB = CalibConfig(nsamples=8, seqlen=64)


@pytest.fixture(scope="module")
def checkpoints(stories_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4-dq-ckpt")
    scheme = squeeze.get_scheme
    return {
        "gptq-w4g32": api.quantize_dir(stories_dir, root / "gptq-w4g32", GPTQ(scheme=scheme("w4g32")), CALIB),
        "w4g64": api.quantize_dir(stories_dir, root / "w4g64", RTN(scheme=scheme("w4g64"))),
        "w4g64-asym": api.quantize_dir(stories_dir, root / "w4g64-asym", RTN(scheme=scheme("w4g64-asym"))),
        "act-order": api.quantize_dir(stories_dir, root / "act-order", GPTQ(scheme=scheme("w4g64"), act_order=True,
                                                  static_groups=False),
                                      CALIB),
        # down_proj's rows (172) do not split into q4_1's blocks of 32: left in float
        "q4_1": api.quantize_dir(stories_dir, root / "q4_1", RTN(scheme=scheme("q4_1"), ignore=(r"re:.*down_proj",))),
    }


@pytest.fixture(scope="module")
def dq_graph(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4-dq-out") / "gptq-w4g32-dq.onnx"
    return api.export(checkpoints["gptq-w4g32"], "onnx", out, int4_encoding="dq-block", verify=True)


def _layers(path: Path) -> dict[str, QuantLinear]:
    return {n: m for n, m in squeeze.load(path).named_modules() if isinstance(m, QuantLinear)}


def test_int4_and_scales_in_the_file_are_the_checkpoints(dq_graph, checkpoints):
    model = onnx.load(str(dq_graph.path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    layers = _layers(checkpoints["gptq-w4g32"])
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(nodes) == len(layers) == 35 and not [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    seen = set()
    for node in nodes:
        name = node.input[0].rsplit(".", 1)[0]
        layer = layers[name]
        seen.add(name)
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 32} and len(node.input) == 2  # no zero point: 0
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert weight.data_type == onnx.TensorProto.INT4
        # signed int4 = squeeze's code - 8 (zero point 8), stored [K, N] for MatMul
        values = torch.from_numpy(numpy_helper.to_array(weight).astype(np.int16))
        assert torch.equal((values + 8).t(), layer.codes.to(torch.int16))
        # scales [ceil(K/32), N]: squeeze's fp16 scales, each exactly (fp16 values held in fp32)
        scales = torch.from_numpy(numpy_helper.to_array(scale).copy())
        assert torch.equal(scales.t(), layer.scales)
        assert torch.equal(scales.half().float(), scales)
        assert consumers[node.output[0]].op_type == "MatMul"
    assert seen == set(layers)
    # down_proj: K=172 is 5 blocks of 32 plus a short block of 12 columns
    down = next(n for n in nodes if "layers.0.mlp.down_proj" in n.input[0])
    assert tuple(inits[down.input[1]].dims) == (6, 64)


def test_onnxruntime_perplexity_equals_torch(dq_graph, checkpoints, short_text):
    onnx_ppl = api.evaluate(dq_graph.path, short_text, ctx=128, progress=False)
    torch_ppl = api.evaluate(checkpoints["gptq-w4g32"], short_text, ctx=128, progress=False)
    assert onnx_ppl.runtime == "onnxruntime"
    # Acceptance: within 0.5%. onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits; at accuracy
    # level 0 (set by squeeze's session) that dequantizes to float, so only summation order differs:
    # measured ~1e-7 relative (its default level, int8 activations, gave 4e-4).
    assert abs(onnx_ppl.ppl / torch_ppl.ppl - 1) < 1e-5
    v = dq_graph.verification
    assert v["top1_agreement"] == 1.0 and v["max_rel_diff"] < 1e-4  # measured ~1e-6


def test_pack_int4_pairs_low_nibble_first():
    values = np.array([-8, 7, -1, 0, 3], dtype=np.int8)  # odd count: the last byte's high nibble is padding
    assert pack_int4_pairs(values) == bytes([0x78, 0x0F, 0x03])


def test_tensorrt_block_sizes_are_checked_on_the_graph(checkpoints, dq_graph, tmp_path):
    art = api.export(checkpoints["w4g64"], "onnx", tmp_path / "w4g64.onnx", int4_encoding="dq-block", verify=True)
    trt_export.check_int4_blocks(art.path)  # 64 everywhere: accepted
    assert art.verification["top1_agreement"] == 1.0
    with pytest.raises(SqueezeError, match="TensorRT's INT4 block size must be 64 or 128, this layer's group is 32"):
        trt_export.check_int4_blocks(dq_graph.path)


def test_onnx_options(checkpoints, tmp_path):
    assert ONNXExport(int4_encoding="dq-block").onnx_opset == 21 and ONNXExport().onnx_opset == 17
    with pytest.raises(SqueezeError, match="int4_encoding must be one of matmulnbits, dq-block"):
        ONNXExport(int4_encoding="int4")
    with pytest.raises(SqueezeError, match="dq-block int4 encoding needs opset 21"):
        ONNXExport(int4_encoding="dq-block", opset=20)
    with pytest.raises(SqueezeError, match="act-order g_idx.*re-quantize without --act-order"):
        api.export(checkpoints["act-order"], "onnx", tmp_path / "a.onnx", int4_encoding="dq-block")
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.parametrize("ckpt, message", [
    ("gptq-w4g32", "TensorRT's INT4 block size must be 64 or 128, the group size is 32 (w4g32); "
                   "re-quantize with --scheme w4g128 or --scheme w4g64"),
    ("w4g64-asym", "INT4 DequantizeLinear has no zero point (TensorRT takes zero point 0 only), and w4g64-asym is "
                   "asymmetric; re-quantize with --scheme w4g128 (symmetric)"),
    ("q4_1", "the q4_1 grid (GGUF blocks with sub-block scales or mins) has no INT4 DequantizeLinear form; "
             "export it with --to gguf, or re-quantize with --scheme w4g128"),
])
def test_tensorrt_int4_refusals_are_one_line_before_any_work(checkpoints, ckpt, message, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(trt_export, "nvidia_gpu_count", lambda: 0)  # these come before the GPU check
    out = tmp_path / "m.plan"
    assert main(["export", str(checkpoints[ckpt]), "--to", "tensorrt", "--type", "int4", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.layers.0.") and err.endswith(message) and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def _tensorrt_without_a_build(monkeypatch, flags=("FP16", "INT4")):
    """tensorrt present as far as the pre-build checks see; any engine work would fail loudly (no Logger)."""
    fake = SimpleNamespace(__version__="test", BuilderFlag=SimpleNamespace(**{f: i for i, f in enumerate(flags)}))
    monkeypatch.setattr(trt_export, "require_tensorrt", lambda: fake)


@pytest.mark.parametrize("ckpt, message", [
    ("act-order", "groups are not contiguous runs of 64 columns (act-order g_idx), which blocked DequantizeLinear "
                  "needs; re-quantize without --act-order (or with --static-groups)"),
    (None, "--type int4 needs a 4-bit symmetric group-wise checkpoint (squeeze quantize --scheme w4g128); "),
])
def test_refusals_found_while_lowering(checkpoints, stories_dir, ckpt, message, tmp_path, capsys, monkeypatch):
    _tensorrt_without_a_build(monkeypatch)
    src = checkpoints[ckpt] if ckpt else stories_dir
    out = tmp_path / "m.plan"
    assert main(["export", str(src), "--to", "tensorrt", "--type", "int4", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and list(tmp_path.iterdir()) == []


def test_tensorrt_without_int4_flag_is_refused(checkpoints, tmp_path, capsys, monkeypatch):
    _tensorrt_without_a_build(monkeypatch, flags=("FP16", "INT8"))  # a TensorRT 8/9 BuilderFlag
    out = tmp_path / "m.plan"
    assert main(["export", str(checkpoints["w4g64"]), "--to", "tensorrt", "--type", "int4", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: the installed TensorRT test has no builder flag INT4; INT4 weight-only engines need "
                   "TensorRT 10 or newer")
