"""Rewriting a decoder to smaller dimensions: fewer FFN channels, fewer attention heads, fewer blocks.

Structured pruning (`squeeze.passes.structured`) decides *what* to keep (a `Plan`); this module applies it,
through data, not per-model code: a `Layout` names the linears of a block whose rows or columns follow a
dimension, and the same plan rewrites an in-memory model (`apply_plan`), a checkpoint tensor by tensor
(`slice_tensor`, for models read block by block from their shards) and config.json (`shrunk_config`).
The result is an ordinary model of the same architecture: transformers loads it with no squeeze code.

Attention heads go by KV group: a key/value head and the query heads that share it (GQA) leave together,
so every kept query head keeps its own key/value head and `num_attention_heads / num_key_value_heads` is
unchanged. transformers' Llama-family configs hold one intermediate size and one head count for all
blocks, so every block keeps the same number of channels and groups (each block its own best ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError


@dataclass(frozen=True)
class Layout:
    """Names (relative to a block) of the linears each prunable dimension runs through."""

    query: tuple[str, ...] = ("self_attn.q_proj",)  # output rows by query head
    key_value: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")  # output rows by KV head
    attn_output: tuple[str, ...] = ("self_attn.o_proj",)  # input columns by query head
    ffn_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # output rows by channel
    ffn_down: tuple[str, ...] = ("mlp.down_proj",)  # input columns by channel


LLAMA_LAYOUT = Layout()

# model_type -> layout. Families with fused projections (GPT-2's c_attn, Phi-3's qkv_proj) are not here.
LAYOUTS: dict[str, Layout] = {name: LLAMA_LAYOUT for name in
                              ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")}


@dataclass(frozen=True)
class Geometry:
    """The dimensions of a model that a plan changes, read from its config."""

    model_type: str
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    blocks_name: str

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.model_type]


def geometry_of(config, blocks_name: str) -> Geometry:
    """The model's prunable dimensions; a family squeeze cannot rewrite is one error listing those it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise SqueezeError(f"structured pruning does not know the block layout of model type {model_type!r}; "
                           f"it rewrites {', '.join(sorted(LAYOUTS))} (add a Layout to squeeze.surgery.LAYOUTS)")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(model_type, config.num_hidden_layers, config.intermediate_size, heads, kv, head_dim, blocks_name)


@dataclass
class Plan:
    """What each kept block keeps: FFN channel and KV-group indices of the original model, in order."""

    kept_layers: list[int]
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> kept channels (absent: all)
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> kept KV heads (absent: all)

    def ffn_size(self, geometry: Geometry) -> int:
        return len(next(iter(self.ffn.values()))) if self.ffn else geometry.intermediate

    def kv_heads(self, geometry: Geometry) -> int:
        return len(next(iter(self.kv_groups.values()))) if self.kv_groups else geometry.kv_heads


def head_rows(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices (of a projection with ``per_group`` heads of ``head_dim`` rows per KV group) of ``groups``."""
    heads = (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _cuts(plan: Plan, geometry: Geometry, block: int) -> dict[str, tuple[int, torch.Tensor]]:
    """Linear name (relative to the block) -> (dimension of its weight, indices kept) for one block."""
    layout, cuts = geometry.layout, {}
    if block in plan.ffn:
        keep = plan.ffn[block]
        cuts.update({n: (0, keep) for n in layout.ffn_up})
        cuts.update({n: (1, keep) for n in layout.ffn_down})
    if block in plan.kv_groups:
        groups = plan.kv_groups[block]
        q_rows = head_rows(groups, geometry.group, geometry.head_dim)
        cuts.update({n: (0, q_rows) for n in layout.query})
        cuts.update({n: (0, head_rows(groups, 1, geometry.head_dim)) for n in layout.key_value})
        cuts.update({n: (1, q_rows) for n in layout.attn_output})
    return cuts


def slice_tensor(name: str, tensor: torch.Tensor, plan: Plan, geometry: Geometry):
    """(new name, tensor) of checkpoint tensor ``name`` under ``plan``; None when its block is dropped."""
    prefix = geometry.blocks_name + "."
    if not name.startswith(prefix):
        return name, tensor
    index, rest = name[len(prefix):].split(".", 1)
    block = int(index)
    if block not in plan.kept_layers:
        return None
    new_name = f"{prefix}{plan.kept_layers.index(block)}.{rest}"
    module, _, kind = rest.rpartition(".")
    cut = _cuts(plan, geometry, block).get(module)
    if cut is None or (kind == "bias" and cut[0] == 1):  # a bias follows the output rows only
        return new_name, tensor
    return new_name, tensor.index_select(0 if kind == "bias" else cut[0], cut[1]).contiguous()


def shrunk_config(config: dict, plan: Plan, geometry: Geometry) -> dict:
    """config.json of the pruned model (head_dim written out: hidden_size / heads no longer gives it)."""
    out = dict(config)
    kv = plan.kv_heads(geometry)
    out.update(intermediate_size=plan.ffn_size(geometry), num_key_value_heads=kv,
               num_attention_heads=kv * geometry.group, head_dim=geometry.head_dim,
               num_hidden_layers=len(plan.kept_layers))
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = [config["layer_types"][i] for i in plan.kept_layers]
    return out


def apply_plan(model: nn.Module, plan: Plan, geometry: Geometry) -> None:
    """Rewrite ``model`` (weights in memory) in place: its linears sliced, dropped blocks removed, the
    remaining blocks renumbered (their ``layer_idx``, which indexes the KV cache) and its config shrunk."""
    blocks: nn.ModuleList = model.get_submodule(geometry.blocks_name)
    for index, block in enumerate(blocks):
        for name, (dim, keep) in _cuts(plan, geometry, index).items():
            _slice_linear(block.get_submodule(name), dim, keep)
    kept = nn.ModuleList([blocks[i] for i in plan.kept_layers])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent, _, attr = geometry.blocks_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    shrunk = shrunk_config(model.config.to_dict(), plan, geometry)
    for key in ("intermediate_size", "num_key_value_heads", "num_attention_heads", "head_dim", "num_hidden_layers",
                "layer_types"):
        if key in shrunk:
            setattr(model.config, key, shrunk[key])


def _slice_linear(layer: nn.Module, dim: int, keep: torch.Tensor) -> None:
    if not isinstance(layer, nn.Linear):
        raise SqueezeError(f"structured pruning rewrites float nn.Linear layers; {type(layer).__name__} found "
                           "(prune the float model, then quantize)")
    keep = keep.to(layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.detach().index_select(dim, keep).contiguous(), requires_grad=False)
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach().index_select(0, keep).contiguous(), requires_grad=False)
    layer.out_features, layer.in_features = layer.weight.shape


def parameter_count(config: dict) -> int:
    """Parameters of the model ``config`` describes (built on the meta device; tied weights counted once)."""
    from transformers import AutoConfig

    from squeeze.model import auto_class_for

    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = auto_class_for(cfg).from_config(cfg)
    return sum(p.numel() for p in model.parameters())
