"""Architectures as data: Hugging Face tensor names -> GGUF names, and the metadata llama.cpp reads.

One `ArchSpec` row per supported ``model_type`` (`ARCHS`). The tensor table follows llama.cpp's
convert_hf_to_gguf.py / gguf-py tensor_mapping.py; Llama-family q/k projections get the converter's
row permutation (HF rotate-half rope -> GGUF interleaved rope), qwen2 uses NEOX rope and keeps rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from squeeze.errors import SqueezeError

# HF name (with {i} for the block index) -> GGUF name
LLAMA_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
QWEN2_TENSORS: dict[str, str] = {
    **LLAMA_TENSORS,
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
}
# HF tensors that carry no weights llama.cpp needs
SKIPPED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


@dataclass(frozen=True)
class ArchSpec:
    """How one HF model_type becomes a GGUF architecture."""

    gguf_arch: str  # general.architecture
    tensors: dict[str, str]  # HF name pattern -> GGUF name pattern
    permute_qk: bool  # llama.cpp's converter permutes q/k rows for interleaved (non-NEOX) rope
    bpe_pre: str  # tokenizer.ggml.pre for a tokenizer.json BPE vocabulary


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", LLAMA_TENSORS, True, "llama-bpe"),
    "mistral": ArchSpec("llama", LLAMA_TENSORS, True, "llama-bpe"),
    "qwen2": ArchSpec("qwen2", QWEN2_TENSORS, False, "qwen2"),
}


def get_arch(model_type: str | None) -> ArchSpec:
    if model_type not in ARCHS:
        raise SqueezeError(f"GGUF export supports model_type {', '.join(sorted(ARCHS))}; "
                           f"this model is {model_type!r}")
    return ARCHS[model_type]


def _compile(spec: ArchSpec) -> list[tuple[re.Pattern, str]]:
    out = []
    for hf, gg in spec.tensors.items():
        pattern = re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)")
        out.append((re.compile(pattern + "$"), gg))
    return out


def gguf_name(spec: ArchSpec, hf_name: str) -> str | None:
    """GGUF name of an HF tensor, None for tensors llama.cpp does not use; unknown names are an error."""
    if SKIPPED.match(hf_name):
        return None
    for pattern, gg in _compile(spec):
        m = pattern.match(hf_name)
        if m:
            return gg.format(i=m.group("i")) if "{i}" in gg else gg
    raise SqueezeError(f"tensor {hf_name!r} has no GGUF name for architecture {spec.gguf_arch!r}; "
                       "is this a standard Hugging Face checkpoint of that architecture?")


def qk_heads(spec: ArchSpec, gguf_tensor: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads whose rows llama.cpp's converter permutes in this tensor (None: no permutation)."""
    if not spec.permute_qk:
        return None
    if gguf_tensor.endswith("attn_q.weight"):
        return n_head
    if gguf_tensor.endswith("attn_k.weight"):
        return n_head_kv
    return None


def qk_row_order(rows: int, n_heads: int) -> np.ndarray:
    """Source row for each output row of convert_hf_to_gguf's ``permute`` (rotate-half -> interleaved).

    Rows move as a whole, so quantized rows (codes and their per-row-block scales) permute unchanged.
    """
    if rows % (2 * n_heads):
        raise SqueezeError(f"cannot permute {rows} q/k rows for {n_heads} heads (rows must be a multiple of 2*heads)")
    idx = np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2)
    return idx.swapaxes(1, 2).reshape(rows)


# ------------------------------------------------------------------------------------------- metadata


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(cfg, "rope_theta", None) or 10000.0)


def _rope_scaling(cfg) -> dict | None:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type") or params.get("type")
    return None if kind in (None, "default") else params


@dataclass(frozen=True)
class Hparams:
    """The hyperparameters GGUF metadata and the exporter need, read from an HF config."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    tie_embeddings: bool
    name: str


def read_hparams(cfg) -> Hparams:
    """Hparams from a transformers config; unsupported rope scaling is refused with what to do."""
    n_head = int(cfg.num_attention_heads)
    n_embd = int(cfg.hidden_size)
    scaling = _rope_scaling(cfg)
    factor = None
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "linear":
            raise SqueezeError(f"rope scaling {kind!r} is not supported by squeeze's GGUF exporter yet "
                               "(only 'linear'); use llama.cpp's convert_hf_to_gguf.py for this model")
        factor = float(scaling["factor"])
    return Hparams(
        n_layer=int(cfg.num_hidden_layers),
        n_embd=n_embd,
        n_ff=int(cfg.intermediate_size),
        n_head=n_head,
        n_head_kv=int(getattr(cfg, "num_key_value_heads", None) or n_head),
        head_dim=int(getattr(cfg, "head_dim", None) or n_embd // n_head),
        n_ctx=int(getattr(cfg, "max_position_embeddings", 2048)),
        vocab_size=int(cfg.vocab_size),
        rms_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        rope_linear_factor=factor,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        name=_model_name(str(getattr(cfg, "_name_or_path", "") or "")),
    )


def _model_name(name_or_path: str) -> str:
    """general.name: a hub id as it is, a local directory by its own name (not the path it was loaded from)."""
    return Path(name_or_path).name if name_or_path and Path(name_or_path).exists() else name_or_path


def add_hparams(writer, hp: Hparams) -> None:
    """The architecture keys of llama.cpp's llama/qwen2 loaders (gguf-py writer helpers)."""
    from gguf import RopeScalingType

    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_vocab_size(hp.vocab_size)
    if hp.head_dim * hp.n_head != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_linear_factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_linear_factor)
