"""TensorRT export/run: on a machine without an NVIDIA GPU or tensorrt, one line and exit code 2.

The engine build/run path needs a GPU; it is exercised by `test_engine_builds_and_matches_torch` and
`test_int4_engine_builds_and_matches_torch` only where one is present (skipped otherwise). The int4
graph itself is checked in onnxruntime by tests/exporters/test_onnx_int4_dq.py.
"""

from __future__ import annotations

import pytest

from squeeze.cli import main
from squeeze.errors import SqueezeError
from squeeze.exporters import tensorrt as trt_export


def test_missing_gpu_or_tensorrt_is_one_line_exit_2(stories_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trt_export, "nvidia_gpu_count", lambda: 0)
    out = tmp_path / "m.plan"
    assert main(["export", str(stories_dir), "--to", "tensorrt", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT export/run is unavailable here: no NVIDIA GPU was found")
    assert "\n" not in err and not out.exists()


def test_missing_tensorrt_named_even_with_a_gpu(monkeypatch):
    monkeypatch.setattr(trt_export, "nvidia_gpu_count", lambda: 1)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(SqueezeError, match=r"tensorrt is not installed \(pip install 'squeeze-quant\[tensorrt\]'"):
        trt_export.require_tensorrt()


def test_eval_engine_without_gpu_is_exit_2(tmp_path, short_text, capsys, monkeypatch):
    monkeypatch.setattr(trt_export, "nvidia_gpu_count", lambda: 0)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"not an engine")
    assert main(["eval", str(engine), "--data", str(short_text)]) == 2
    assert "no NVIDIA GPU was found" in capsys.readouterr().err


def test_options_are_validated(tmp_path):
    assert trt_export.TensorRTExport(qtype="int4").qtype == "int4"  # INT4 weight-only (blocked DequantizeLinear)
    with pytest.raises(SqueezeError, match="unknown TensorRT --type 'q4_0'"):
        trt_export.TensorRTExport(qtype="q4_0")
    ranges = trt_export.dim_ranges(trt_export.TensorRTExport(max_sequence=4096), max_context=512)
    assert ranges["sequence"] == (1, 256, 512) and ranges["past_sequence"] == (0, 255, 511)


def test_profiles_come_from_the_onnx_graph(stories_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from squeeze import api

    art = api.export(stories_dir, "onnx", tmp_path / "kv.onnx", kv_cache=True, verify=False)
    profiles = trt_export.input_profiles(art.path, trt_export.dim_ranges(trt_export.TensorRTExport(), 512))
    # input_ids [batch, sequence]; past [batch, kv_heads=4, past_sequence, head_dim=8] for stories260K
    assert profiles["input_ids"] == ((1, 1), (1, 256), (8, 512))
    assert profiles["past_key_values.0.key"] == ((1, 4, 0, 8), (1, 4, 255, 8), (8, 4, 511, 8))
    assert profiles["attention_mask"] == ((1, 1), (1, 256), (8, 512))


@pytest.mark.skipif(trt_export.nvidia_gpu_count() == 0, reason="needs an NVIDIA GPU")
def test_engine_builds_and_matches_torch(stories_dir, tmp_path):
    pytest.importorskip("tensorrt")
    from squeeze import api

    art = api.export(stories_dir, "tensorrt", tmp_path / "m.plan", qtype="fp16", verify=True)
    # fp16 engine against the fp32 torch model: top-1 agreement well above the 0.9 broken-graph floor.
    assert art.verification["top1_agreement"] > 0.98


@pytest.mark.skipif(trt_export.nvidia_gpu_count() == 0, reason="needs an NVIDIA GPU")
def test_int4_engine_builds_and_matches_torch(stories_dir, tmp_path):
    pytest.importorskip("tensorrt")
    import squeeze
    from squeeze import api
    from squeeze.passes.rtn import RTN

    ckpt = api.quantize_dir(stories_dir, tmp_path / "w4g64", RTN(scheme=squeeze.get_scheme("w4g64")))
    art = api.export(ckpt, "tensorrt", tmp_path / "w4.plan", qtype="int4", verify=True)
    assert art.type == "w4g64-dq-block-int4"
    # INT4 weight-only engine (fp16 activations) against squeeze's fp32 torch model of the same int4
    # weights: the same bound as the fp16 engine, well above the 0.9 broken-graph floor.
    assert art.verification["top1_agreement"] > 0.98
