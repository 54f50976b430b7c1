"""RTN with a GGUF-named scheme rounds exactly as llama.cpp's own quantizer does."""

from __future__ import annotations

import numpy as np
import pytest

import squeeze
from squeeze.exporters.gguf.codecs import dequantize_blocks, quantize_blocks


@pytest.mark.parametrize("scheme,qtype", [("q4_0", "Q4_0"), ("q8_0", "Q8_0"), ("q5_0", "Q5_0")])
def test_rtn_on_gguf_scheme_equals_llama_cpp_blocks(stories_dir, scheme, qtype):
    model = squeeze.load(stories_dir)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    squeeze.quantize(model, squeeze.RTN(scheme=squeeze.get_scheme(scheme), targets=("layers.0.self_attn.q_proj",)))
    ours = model.model.layers[0].self_attn.q_proj.dequantized_weight().numpy()
    # squeeze's codecs are byte-identical to ggml_quantize_chunk (tests/exporters/test_gguf_codecs.py)
    theirs = dequantize_blocks(quantize_blocks(weight.numpy(), qtype)).reshape(weight.shape)
    assert np.array_equal(ours, theirs)
