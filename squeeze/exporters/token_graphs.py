"""What the fixed-shape exporters (TFLite, Core ML) share: loading a token model and choosing its graph length."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from squeeze.errors import SqueezeError

# default fixed length of a token graph (at most the model's context): causal LMs score windows of 512,
# encoders embed sentences of at most 128 tokens (squeeze.eval.embeddings.MAX_TOKENS, sentence-transformers' usual)
DEFAULT_SEQ_LEN = {"causal-lm": 512, "encoder": 128}


def load_token_model(src: Path, fmt: str) -> tuple[nn.Module, str]:
    """The float32 model of ``src`` (float or a squeeze checkpoint) and its kind (causal-lm or encoder); plain
    modules are refused with where their exporter is (``squeeze.exporters.<fmt>.export_module``)."""
    from squeeze.api import load
    from squeeze.exporters.onnx.graphs import model_kind
    from squeeze.model import nonfinite_tensors, refuse_nonfinite

    model = load(src, "float32").eval()
    kind = model_kind(model)
    if kind == "module":
        raise SqueezeError(f"{str(src)!r} is neither a causal LM nor an encoder; export plain modules with "
                           f"squeeze.exporters.{fmt}.export_module")
    refuse_nonfinite(nonfinite_tensors(model.state_dict().items()), str(src))
    return model, kind


def token_length(model: nn.Module, kind: str, seq_len: int | None) -> int:
    ctx = getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN[kind]
    if seq_len is not None and seq_len > ctx:
        raise SqueezeError(f"--seq-len {seq_len} is longer than the model's context ({ctx} tokens)")
    return int(seq_len or min(ctx, DEFAULT_SEQ_LEN[kind]))


def eager_attention(model: nn.Module) -> None:
    """Eager attention everywhere (the converters do not lower scaled_dot_product_attention's fused form)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    elif getattr(model, "config", None) is not None:
        model.config._attn_implementation = "eager"
