"""Per-input-channel scaling shared by AWQ and SmoothQuant: the layer mappings (data) and the folding math.

A mapping says which op produces the input of a set of linears inside a
block. Multiplying those linears' input columns by ``s`` and dividing the
producing op's output channels by ``s`` leaves the float model unchanged;
AWQ and SmoothQuant only differ in how they choose ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import is_linear, linear_weight


@dataclass(frozen=True)
class ScaleMapping:
    """``prev``'s output feeds ``layers`` (names relative to the block).

    ``prev_part`` = (index, parts): only that equal slice of ``prev``'s output
    feeds the layers (GPT-2's fused q/k/v projection, whose last third is v).
    """

    prev: str
    layers: tuple[str, ...]
    prev_part: tuple[int, int] | None = None


_LLAMA_LIKE = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)
_GPT2 = (
    ScaleMapping("ln_1", ("attn.c_attn",)),
    ScaleMapping("attn.c_attn", ("attn.c_proj",), prev_part=(2, 3)),
    ScaleMapping("ln_2", ("mlp.c_fc",)),
    # mlp.c_fc -> mlp.c_proj passes through GELU, which does not commute with scaling.
)

# model_type -> the standard mappings of its blocks.
SCALE_MAPPINGS: dict[str, tuple[ScaleMapping, ...]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": _GPT2,
}


def mappings_for(model: nn.Module, method: str) -> tuple[ScaleMapping, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SCALE_MAPPINGS:
        raise SqueezeError(f"{method} has no layer mappings for model_type {model_type!r}; known: "
                           f"{', '.join(sorted(SCALE_MAPPINGS))} (add one to squeeze.passes.scaling.SCALE_MAPPINGS)")
    return SCALE_MAPPINGS[model_type]


def _out_slice(prev: nn.Module, part: tuple[int, int] | None, width: int) -> slice:
    if part is None:
        return slice(0, width)
    index, parts = part
    return slice(index * width, (index + 1) * width)


def _prev_channels(prev: nn.Module) -> int | None:
    if is_linear(prev):
        return linear_weight(prev).shape[0]
    weight = getattr(prev, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def resolve(block: nn.Module, mapping: ScaleMapping, names: dict[str, str]) -> tuple[nn.Module, list[str]] | None:
    """(prev module, full names of the mapped layers) if the mapping applies to this block, else None.

    ``names`` maps block-relative names to the full names of the selected layers.
    A mapping is skipped when a layer is not selected, the producing op is
    missing or has no per-channel weight, or the shapes do not line up (e.g.
    v_proj -> o_proj under grouped-query attention).
    """
    if any(rel not in names for rel in mapping.layers):
        return None
    try:
        prev = block.get_submodule(mapping.prev)
    except AttributeError:
        return None
    width = linear_weight(block.get_submodule(mapping.layers[0])).shape[1]
    channels = _prev_channels(prev)
    parts = mapping.prev_part[1] if mapping.prev_part else 1
    if channels is None or channels != width * parts:
        return None
    if any(linear_weight(block.get_submodule(rel)).shape[1] != width for rel in mapping.layers):
        return None
    return prev, [names[rel] for rel in mapping.layers]


@torch.no_grad()
def fold_scales(prev: nn.Module, layers: list[nn.Module], scales: torch.Tensor, prev_part=None) -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the layers' input columns by them."""
    s = scales.float()
    sl = _out_slice(prev, prev_part, s.numel())
    if is_linear(prev):
        w = linear_weight(prev)
        w[sl] = (w[sl].float() / s.unsqueeze(1)).to(w.dtype)
    else:
        prev.weight[sl] = (prev.weight[sl].float() / s).to(prev.weight.dtype)
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias[sl] = (bias[sl].float() / s).to(bias.dtype)
    for layer in layers:
        w = linear_weight(layer)
        w.copy_((w.float() * s.unsqueeze(0)).to(w.dtype))


def relative_names(block_prefix: str, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Block-relative name -> full name for the selected layers of one block."""
    return {name[len(block_prefix) :]: name for name in layers if name.startswith(block_prefix)}
