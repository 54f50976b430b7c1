"""What gets traced: a model kind's inputs/outputs/dynamic axes, and QuantLinears lowered to ONNX ops.

Model kinds are a table (`GRAPH_BUILDERS`): a causal LM gives full-sequence logits (optionally with
past key/values, see kvcache.py), an encoder gives its last hidden state, a plain nn.Module gives
whatever its forward returns for the example input. Quantized layers are lowered by `LOWERINGS`:
8-bit per-channel -> QDQ, group-wise 2/4/8-bit weight-only -> MatMulNBits, or, with the "dq-block"
int4 encoding (TensorRT's form), 4-bit symmetric group-wise -> INT4 DequantizeLinear -> MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.exporters.onnx.dqblock import DQBlockLinear, check_dq_block
from squeeze.exporters.onnx.matmulnbits import MatMulNBitsLinear, check_matmulnbits
from squeeze.exporters.onnx.qdq import QDQLinear, check_qdq
from squeeze.model import set_submodule
from squeeze.modules import QuantLinear
from squeeze.palette import refuse_lut

# Example shapes used for tracing (every axis is dynamic in the graph).
TRACE_BATCH, TRACE_SEQ = 2, 8


@dataclass
class GraphSpec:
    """A module ready for torch.onnx.export: example args, names and dynamic axes."""

    kind: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    metadata: dict[str, str] = field(default_factory=dict)


# ---- quantized layers -> ONNX ops ------------------------------------------------------

# lowering name -> (check(layer, name) raising SqueezeError, module class taking (layer, dtype))
LOWERINGS: dict[str, tuple] = {
    "qdq": (check_qdq, QDQLinear),
    "matmulnbits": (check_matmulnbits, MatMulNBitsLinear),
    "dq-block": (check_dq_block, DQBlockLinear),
}
# how weight-only group-wise layers are written: onnxruntime's MatMulNBits (default), or blocked INT4
# DequantizeLinear -> MatMul (opset 21; what TensorRT reads as INT4 weight-only)
INT4_ENCODINGS: tuple[str, ...] = ("matmulnbits", "dq-block")


def lowering_for(layer: QuantLinear, int4_encoding: str = "matmulnbits") -> str:
    """8-bit per-channel/tensor weights (with or without int8 activations) -> QDQ; group-wise -> ``int4_encoding``."""
    s = layer.scheme
    if s.granularity != "group" and s.bits == 8 or s.activations is not None:
        return "qdq"
    return int4_encoding


def lower_quant_linears(model: nn.Module, dtype: torch.dtype, act_encoding: str = "uint8",
                        int4_encoding: str = "matmulnbits") -> dict[str, int]:
    """Replace every QuantLinear in place by its ONNX-emitting stand-in; returns a count per lowering.

    ``act_encoding`` (qdq.ACT_ENCODINGS): how symmetric static int8 activations are written (uint8/128 or
    int8/0); asymmetric ones keep their uint8 zero point and are refused for int8/0. ``int4_encoding``
    (`INT4_ENCODINGS`): how weight-only group-wise layers are written; "dq-block" refuses what it cannot
    write exactly (asymmetric, act-order, GGUF blocks, not 4-bit).
    """
    counts: dict[str, int] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, layer in layers:
        refuse_lut(layer.scheme, name, "ONNX")
    for name, layer in layers:
        kind = lowering_for(layer, int4_encoding)
        check, cls = LOWERINGS[kind]
        check(layer, name, act_encoding) if kind == "qdq" else check(layer, name)
        set_submodule(model, name, cls(layer, dtype, act_encoding) if kind == "qdq" else cls(layer, dtype))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# ---- model kinds ---------------------------------------------------------------------------


class CausalLMLogits(nn.Module):
    """(input_ids, attention_mask) -> logits [batch, sequence, vocab], no cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class EncoderHidden(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state [batch, sequence, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def model_kind(model: nn.Module) -> str:
    """causal-lm, encoder (a Hugging Face model without a generation head) or module."""
    if getattr(model, "config", None) is None or not hasattr(model, "can_generate"):
        return "module"
    return "causal-lm" if model.can_generate() else "encoder"


def _token_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (TRACE_BATCH, TRACE_SEQ), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _lm_metadata(model: nn.Module) -> dict[str, str]:
    cfg = model.config
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return {"squeeze.vocab_size": str(cfg.vocab_size), **({"squeeze.max_context": str(ctx)} if ctx else {})}


def causal_lm_graph(model: nn.Module, kv_cache: bool = False) -> GraphSpec:
    if kv_cache:
        from squeeze.exporters.onnx.kvcache import causal_lm_kv_graph

        return causal_lm_kv_graph(model)
    ids, mask = _token_inputs(model)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    return GraphSpec("causal-lm", CausalLMLogits(model), (ids, mask), ["input_ids", "attention_mask"], ["logits"],
                     axes, _lm_metadata(model))


def encoder_graph(model: nn.Module, kv_cache: bool = False) -> GraphSpec:
    if kv_cache:
        raise SqueezeError("--kv-cache applies to causal language models, not encoders")
    ids, mask = _token_inputs(model)
    args, names = (ids, mask), ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", 0):
        args, names = (ids, mask, torch.zeros_like(ids)), names + ["token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    meta = {"squeeze.vocab_size": str(model.config.vocab_size)}
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx:
        meta["squeeze.max_context"] = str(ctx)
    return GraphSpec("encoder", EncoderHidden(model), args, names, ["last_hidden_state"], axes, meta)


# kind -> builder(model, kv_cache) -> GraphSpec   (plain modules go through `module_graph`)
GRAPH_BUILDERS = {"causal-lm": causal_lm_graph, "encoder": encoder_graph}


def module_graph(module: nn.Module, example_inputs: tuple, dynamic_batch: bool = True) -> GraphSpec:
    """A plain nn.Module: inputs input_0.., outputs output_0..; the first axis dynamic if ``dynamic_batch``."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    with torch.no_grad():
        out = module(*example_inputs)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    inputs = [f"input_{i}" for i in range(len(example_inputs))]
    outputs = [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in inputs + outputs} if dynamic_batch else {}
    return GraphSpec("module", module, example_inputs, inputs, outputs, axes)
