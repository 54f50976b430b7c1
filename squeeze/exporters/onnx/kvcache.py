"""A causal LM graph that decodes token by token: past key/values in, present key/values out.

Names follow the Hugging Face/optimum convention: inputs ``input_ids`` [batch, sequence],
``attention_mask`` [batch, past_sequence + sequence], ``past_key_values.{i}.key|value``
[batch, kv_heads, past_sequence, head_dim]; outputs ``logits`` and ``present.{i}.key|value``.
The first step feeds past tensors with past_sequence = 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from squeeze.errors import SqueezeError

TRACE_PAST = 3  # example past length for tracing (every axis is dynamic in the graph)


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Hugging Face decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class CausalLMWithPast(nn.Module):
    """(input_ids, attention_mask, *past) -> (logits, *present), with a DynamicCache rebuilt from tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = cache_shape(model.config)[0]

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        # Positions count the real tokens before each one (left padding gets position 0).
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def causal_lm_kv_graph(model: nn.Module):
    from squeeze.exporters.onnx.graphs import TRACE_BATCH, TRACE_SEQ, GraphSpec, _lm_metadata

    if not hasattr(model.config, "num_hidden_layers"):
        raise SqueezeError("--kv-cache needs a decoder config with num_hidden_layers / num_attention_heads")
    n_layers, kv_heads, head_dim = cache_shape(model.config)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (TRACE_BATCH, TRACE_SEQ), generator=gen)
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQ, dtype=torch.int64)
    past = tuple(torch.randn(TRACE_BATCH, kv_heads, TRACE_PAST, head_dim, generator=gen).to(dtype)
                 for _ in range(2 * n_layers))
    kv = [f"{i}.{part}" for i in range(n_layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask"] + [f"past_key_values.{n}" for n in kv]
    outputs = ["logits"] + [f"present.{n}" for n in kv]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in inputs[2:]})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
    meta = {**_lm_metadata(model), "squeeze.kv_cache": "1"}
    return GraphSpec("causal-lm", CausalLMWithPast(model), (ids, mask, *past), inputs, outputs, axes, meta)


class KVDecodeCheck:
    """Prefill with an empty past, then decode ``steps`` tokens one at a time feeding presents back (in
    onnxruntime); then every step's logits against the torch model run on the whole sequence so far."""

    def __init__(self, vocab_size: int, exact: bool, steps: int = 4):
        self.vocab_size, self.exact, self.steps = vocab_size, exact, steps
        self.got: list[tuple[torch.Tensor, torch.Tensor]] = []  # (onnxruntime logits, the sequence so far)

    def run_onnx(self, runtime) -> None:
        gen = torch.Generator().manual_seed(0)
        seq = torch.randint(0, self.vocab_size, (2, 12), generator=gen)
        feeds = runtime.token_feeds(seq)
        self.got = []
        for _ in range(self.steps + 1):
            out = runtime.run(feeds)
            self.got.append((torch.from_numpy(np.asarray(out["logits"], dtype=np.float32)), seq))
            nxt = torch.randint(0, self.vocab_size, (2, 1), generator=gen)
            seq = torch.cat([seq, nxt], dim=1)
            feeds = {"input_ids": nxt.numpy(), "attention_mask": np.ones(seq.shape, dtype=np.int64)}
            feeds.update({name.replace("present.", "past_key_values."): value
                          for name, value in out.items() if name.startswith("present.")})

    @torch.no_grad()
    def run_torch(self, reference: nn.Module) -> dict:
        from squeeze.exporters.onnx.verify import compare

        pairs = []
        for got, seq in self.got:
            ref = reference(input_ids=seq, attention_mask=torch.ones_like(seq)).logits.float()
            pairs.append((got, ref[:, -got.shape[1]:]))
        record = compare(pairs, self.exact, logits=True)
        record["decode_steps"] = self.steps
        return record
