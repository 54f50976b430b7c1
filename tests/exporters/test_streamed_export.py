"""Exports hold one transformer block at a time (issue 11): writing and verification, GGUF and ONNX.

The peak memory on a 4.7 GB model is measured by bench/streaming.py; here the property behind it is
checked directly: whenever a block's weights are read, no other block holds real weights, and the whole
model is never loaded.
"""

from __future__ import annotations

import pytest
import torch

import squeeze
from squeeze import api, lazy
from squeeze.lazy import LazyModel
from squeeze.passes.rtn import RTN

onnx = pytest.importorskip("onnx")


def _real(t: torch.Tensor) -> bool:
    """Real data: neither on meta nor an export placeholder (one element, stride 0)."""
    return t.device.type != "meta" and t.untyped_storage().nbytes() > t.element_size()


def _real_blocks(blocks) -> int:
    return sum(any(_real(t) for t in b.state_dict().values()) for b in blocks)


@pytest.fixture
def block_counts(monkeypatch):
    """Every block read during the test records how many blocks hold real weights just after it."""
    counts: list[int] = []
    on_demand = lazy.blocks_on_demand
    load_block = LazyModel.load_block

    def counting_on_demand(blocks, load, unload):
        def load_and_count(i):
            load(i)
            counts.append(_real_blocks(blocks))
        return on_demand(blocks, load_and_count, unload)

    def counting_load_block(self, index):
        load_block(self, index)
        counts.append(_real_blocks(self.blocks))

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the exporter loaded the whole model")

    monkeypatch.setattr(lazy, "blocks_on_demand", counting_on_demand)
    monkeypatch.setattr(LazyModel, "load_block", counting_load_block)
    monkeypatch.setattr(api, "load", no_whole_model)
    return counts


@pytest.fixture(scope="module")
def w4(stories_dir, tmp_path_factory):
    return api.quantize_dir(stories_dir, tmp_path_factory.mktemp("stream-export") / "w4",
                            RTN(scheme=squeeze.get_scheme("w4g32")))


@pytest.mark.parametrize("qtype", ["f16", "q4_k_m"])
def test_gguf_verification_holds_one_block(qtype, stories_dir, tmp_path, block_counts, llama_cpp):
    art = api.export(stories_dir, "gguf", tmp_path / "m.gguf", qtype=qtype)
    # verified (the exporter's floor is 0.9): a CI build of llama.cpp gave 0.988 at q4_k_m, this machine's 1.0
    assert art.verification["top1_agreement"] >= 0.95
    assert block_counts == [1] * 5  # the torch reference ran its 5 blocks one at a time


@pytest.mark.parametrize("source", ["float", "checkpoint"])
def test_onnx_export_holds_one_block(source, stories_dir, w4, tmp_path, block_counts):
    src = stories_dir if source == "float" else w4
    art = api.export(src, "onnx", tmp_path / "m.onnx")
    assert art.verification["top1_agreement"] == 1.0
    # 5 blocks lowered and written, then the reference runs its 5 blocks for each verification input (each
    # block counted by load_block and by the hook)
    from squeeze.exporters.onnx.verify import VERIFY_SHAPES

    assert len(block_counts) == 5 + 2 * 5 * len(VERIFY_SHAPES) and set(block_counts) == {1}


def test_weights_are_folded_into_initializers(stories_dir, tmp_path):
    # What constant folding did in the in-memory exporter (a transposed copy of the tied embedding for the
    # output layer) happens on the real tensor: no Transpose reads a weight, and the copy is exact.
    from onnx import numpy_helper

    art = api.export(stories_dir, "onnx", tmp_path / "fp32.onnx")
    graph = onnx.load(str(art.path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type in ("Transpose", "Identity", "Cast") and n.input[0] in inits]
    embed = squeeze.load(stories_dir).model.embed_tokens.weight.detach().numpy()
    transposed = [a for a in inits.values() if a.shape == embed.T.shape]
    assert len(transposed) == 1 and (transposed[0] == embed.T).all()
    assert {i.name for i in graph.input} == {"input_ids", "attention_mask"}


def test_large_weights_go_to_an_aligned_data_file(stories_dir, tmp_path, monkeypatch):
    from squeeze.exporters.onnx import weights

    monkeypatch.setattr(weights, "INLINE_MAX_BYTES", 1)  # as if the model were past 256 MiB
    monkeypatch.setattr(weights, "ALIGN_THRESHOLD", 4096)
    art = api.export(stories_dir, "onnx", tmp_path / "m.onnx")
    assert art.verification["max_rel_diff"] < 1e-4  # onnxruntime read the weights from the data file
    model = onnx.load(str(art.path), load_external_data=False)
    external = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e["location"] == "m.onnx.data" for e in external)
    large = [e for e in external if int(e["length"]) >= 4096]
    assert large and all(int(e["offset"]) % weights.ALIGNMENT == 0 for e in large)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
