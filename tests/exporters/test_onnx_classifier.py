"""squeeze eval on a plain-module ONNX graph (a small CNN): classification accuracy from a .npz file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="needs onnxruntime (the onnx extra)")
pytest.importorskip("onnx", reason="needs onnx (the onnx extra)")

import squeeze  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.exporters.onnx import export_module  # noqa: E402


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def test_classifier_accuracy_and_agreement(tmp_path):
    cnn = small_cnn()
    x = torch.randn(200, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = cnn(x).argmax(-1).numpy()
    labels[:20] = (labels[:20] + 1) % 10  # 20 of 200 labels disagree with the float model: accuracy 0.90
    np.savez(tmp_path / "data.npz", inputs=x.numpy(), labels=labels)
    fp32 = export_module(cnn, x[:2], tmp_path / "cnn.onnx").path
    quantized = small_cnn()
    squeeze.quantize(quantized, squeeze.RTN(scheme=squeeze.get_scheme("w8")))
    w8 = export_module(quantized, x[:2], tmp_path / "cnn-w8.onnx").path

    res = api.eval_report(fp32, tmp_path / "data.npz", progress=False)
    assert res["accuracy"] == pytest.approx(0.90) and res["samples"] == 200 and res["ppl"] is None
    res = api.eval_report(w8, tmp_path / "data.npz", reference=fp32, progress=False)
    # 8-bit per-channel Linear weights: predictions almost never flip on this small net
    assert res["top1_agreement"] > 0.97 and abs(res["accuracy"] - 0.90) < 0.03
    assert set(res) == set(api.EVAL_JSON_KEYS)
    json.dumps(res)


def test_classifier_data_must_be_npz(tmp_path):
    cnn = small_cnn()
    path = export_module(cnn, torch.randn(2, 1, 12, 12), tmp_path / "cnn.onnx").path
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(squeeze.SqueezeError, match=".npz"):
        api.eval_report(path, tmp_path / "x.txt", progress=False)
