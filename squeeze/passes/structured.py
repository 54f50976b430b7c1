"""Structured pruning: remove FFN channels, attention heads (whole KV groups) and whole blocks.

    squeeze.prune(model, Structured(ffn=0.75), calib)       # 25% of each block's FFN channels removed
    squeeze.prune(model, Structured(layers=26), calib)      # the 4 least useful blocks removed

The result is a smaller dense model of the same architecture (`squeeze.surgery` rewrites it), faster in
every runtime with no sparse kernels. Importance is measured on calibration data on the unpruned model
(Minitron-style, Muralidharan et al. 2024), block by block through the sequential runner:
- an FFN channel: the norm, over the calibration tokens, of what it adds to the residual stream
  (||x_j|| * ||W_down[:, j]||, x the input of down_proj);
- a KV group: the norm of what its query heads add through o_proj (||W_o[:, heads] x_heads|| over tokens);
- a block: 1 - cos(block input, block output), averaged over tokens (ShortGPT's block influence): a block
  that barely turns the hidden state is the one to drop.
``score="weight"`` ranks channels and groups by weight norms alone (no data; blocks need data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import find_blocks
from squeeze.precision import check_calib_precision
from squeeze.registry import register_pass
from squeeze.runner import BlockInputs, block_output, run_sequential
from squeeze.surgery import Geometry, Plan, apply_plan, geometry_of, parameter_count, shrunk_config

SCORES = ("activation", "weight")


@dataclass(frozen=True)
class Structured:
    """Keep ``ffn`` of each block's FFN channels, ``heads`` of its KV groups (with their query heads),
    ``layers`` blocks; or meet a ``params`` budget by the FFN width (after heads and layers).
    Kept FFN channels are a multiple of ``round_to`` (GGUF blocks hold 32 weights, K-quants 256)."""

    ffn: float | None = None
    heads: float | None = None
    layers: int | None = None
    params: int | None = None
    score: str = "activation"
    round_to: int = 64
    calib_precision: str = "auto"

    reshapes: ClassVar[bool] = True  # the model's shapes and config change: it is rebuilt, not patched

    def __post_init__(self) -> None:
        if self.ffn is None and self.heads is None and self.layers is None and self.params is None:
            raise SqueezeError("structured pruning needs a target: --ffn, --heads, --layers or --params")
        for name in ("ffn", "heads"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise SqueezeError(f"--{name} is the share kept, in (0, 1]; got {value}")
        if self.ffn is not None and self.params is not None:
            raise SqueezeError("give --ffn or --params, not both (--params sets the FFN width)")
        if self.layers is not None and self.layers < 1:
            raise SqueezeError(f"--layers is the number of blocks kept, at least 1; got {self.layers}")
        if self.params is not None and self.params <= 0:
            raise SqueezeError(f"--params must be a positive parameter count, got {self.params}")
        if self.score not in SCORES:
            raise SqueezeError(f"unknown importance score {self.score!r}; choose from {', '.join(SCORES)}")
        if self.score == "weight" and self.layers is not None:
            raise SqueezeError("--layers needs --score activation: a block's importance is measured on data")
        if self.round_to < 1:
            raise SqueezeError(f"round_to must be a positive integer, got {self.round_to}")
        check_calib_precision(self.calib_precision)

    @property
    def label(self) -> str:
        """What the records call the target ("ffn0.75 layers26")."""
        parts = [f"{k}{getattr(self, k)}" for k in ("ffn", "heads", "layers", "params") if getattr(self, k) is not None]
        return " ".join(parts)


# ---- importance ---------------------------------------------------------------------


def _modules(block: nn.Module, geometry: Geometry) -> tuple[nn.Module, nn.Module]:
    layout = geometry.layout
    return block.get_submodule(layout.ffn_down[0]), block.get_submodule(layout.attn_output[0])


def _group_columns(weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """o_proj's weight [hidden, heads * head_dim] as [KV group, hidden, columns of the group's heads]."""
    return weight.float().reshape(weight.shape[0], geometry.kv_heads, -1).permute(1, 0, 2)


def weight_scores(block: nn.Module, geometry: Geometry) -> dict:
    """Channel and group importance from weight norms alone."""
    layout = geometry.layout
    down, out = _modules(block, geometry)
    ffn = down.weight.float().norm(dim=0)
    for name in layout.ffn_up:
        ffn = ffn * block.get_submodule(name).weight.float().norm(dim=1)
    heads = _group_columns(out.weight, geometry).flatten(1).norm(dim=1)
    for name in layout.key_value:
        heads = heads * block.get_submodule(name).weight.float().reshape(geometry.kv_heads, -1).norm(dim=1)
    return {"ffn": ffn, "heads": heads}


def activation_scores(block: nn.Module, inputs: BlockInputs, geometry: Geometry) -> dict:
    """Channel, group and block importance from the block's forward on the calibration batches."""
    down, out = _modules(block, geometry)
    ffn_sq = torch.zeros(geometry.intermediate, dtype=torch.float64)
    head_sq = torch.zeros(geometry.kv_heads, dtype=torch.float64)
    w_groups = _group_columns(out.weight.detach(), geometry)

    def on_down(module, args):
        with torch.autocast(args[0].device.type, enabled=False):
            ffn_sq.add_(args[0].float().reshape(-1, args[0].shape[-1]).pow(2).sum(0).double().cpu())

    def on_out(module, args):
        with torch.autocast(args[0].device.type, enabled=False):
            x = args[0].float().reshape(-1, geometry.kv_heads, w_groups.shape[-1])
            for g in range(geometry.kv_heads):
                head_sq[g] += float((x[:, g] @ w_groups[g].t()).pow(2).sum())

    handles = [down.register_forward_pre_hook(on_down), out.register_forward_pre_hook(on_out)]
    cosine, tokens = 0.0, 0
    try:
        for i in range(len(inputs)):
            hidden = inputs.hidden[i]
            result = block_output(inputs.forward(block, i)).float().reshape(-1, hidden.shape[-1])
            cosine += float(torch.nn.functional.cosine_similarity(hidden.float().reshape(result.shape), result,
                                                                  dim=-1).sum())
            tokens += result.shape[0]
    finally:
        for h in handles:
            h.remove()
    ffn = ffn_sq.sqrt().float() * down.weight.detach().float().norm(dim=0).cpu()
    return {"ffn": ffn, "heads": head_sq.sqrt().float(), "influence": 1.0 - cosine / max(tokens, 1)}


def measure(model: nn.Module, config: Structured, calib, geometry: Geometry, io=None) -> list[dict]:
    """Each block's scores (``io``: blocks read one at a time, `squeeze.runner.BlockIO`)."""
    blocks = model.get_submodule(geometry.blocks_name)
    if config.score == "weight":
        scores = []
        for index, block in enumerate(blocks):
            if io is not None:
                io.load(index, block, finished=False)
            scores.append(weight_scores(block, geometry))
            if io is not None:
                io.done(index, f"{geometry.blocks_name}.{index}.", block, None)
        return scores
    prefix = geometry.blocks_name
    layers = {f"{prefix}.{i}.{geometry.layout.ffn_down[0]}": _modules(b, geometry)[0] for i, b in enumerate(blocks)}
    found: dict[str, dict] = {}

    def process(block_prefix, block, block_layers, inputs):
        found[block_prefix] = activation_scores(block, inputs, geometry)
        return {}

    run_sequential(model, layers, calib, process, desc="importance", precision=config.calib_precision, io=io)
    return [found[f"{prefix}.{i}."] for i in range(len(blocks))]


# ---- the plan -----------------------------------------------------------------------------


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def ffn_width(share: float, geometry: Geometry, round_to: int) -> int:
    """Channels kept for ``share``: rounded to a multiple of ``round_to`` (at least one multiple)."""
    step = min(round_to, geometry.intermediate)
    return min(geometry.intermediate, max(step, round(share * geometry.intermediate / step) * step))


def plan_for(scores: list[dict], config: Structured, geometry: Geometry, source_config: dict) -> Plan:
    """Which blocks, groups and channels to keep; uniform sizes, each block its own best."""
    n = len(scores)
    if config.layers is not None and config.layers > n:
        raise SqueezeError(f"--layers {config.layers}: the model has only {n} blocks")
    kept = list(range(n))
    if config.layers is not None:
        kept = _top(torch.tensor([s["influence"] for s in scores]), config.layers).tolist()
    plan = Plan(kept)
    if config.heads is not None:
        groups = round(config.heads * geometry.kv_heads)
        if groups < 1:
            raise SqueezeError(f"--heads {config.heads} keeps no KV group of {geometry.kv_heads}; the smallest "
                               f"share is {1 / geometry.kv_heads:.3f}")
        if groups < geometry.kv_heads:
            plan.kv_groups = {i: _top(scores[i]["heads"], groups) for i in kept}
    width = geometry.intermediate
    if config.ffn is not None:
        width = ffn_width(config.ffn, geometry, config.round_to)
    elif config.params is not None:
        width = _width_for_budget(config.params, plan, geometry, source_config, config.round_to)
    if width < geometry.intermediate:
        plan.ffn = {i: _top(scores[i]["ffn"], width) for i in kept}
    return plan


def _width_for_budget(budget: int, plan: Plan, geometry: Geometry, source_config: dict, round_to: int) -> int:
    """The widest FFN (a multiple of ``round_to``) whose model has at most ``budget`` parameters."""
    step = min(round_to, geometry.intermediate)

    def count(width: int) -> int:
        trial = Plan(plan.kept_layers, {0: torch.arange(width)}, plan.kv_groups)
        return parameter_count(shrunk_config(source_config, trial, geometry))

    if count(geometry.intermediate) <= budget:
        return geometry.intermediate
    low, high = 1, geometry.intermediate // step  # widths low*step (fits, checked below) .. high*step (does not)
    if count(step) > budget:
        raise SqueezeError(f"--params {budget:,}: even {step} FFN channels per block leave {count(step):,} "
                           "parameters; remove heads or layers too, or raise the budget")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle * step) <= budget else (low, middle)
    return low * step


def plan_records(plan: Plan, scores: list[dict], geometry: Geometry) -> dict[str, dict]:
    """Per original block: kept or dropped, its new index, sizes, kept KV groups and its influence."""
    records = {}
    for i, s in enumerate(scores):
        rec = {"kept": i in plan.kept_layers}
        if rec["kept"]:
            rec.update(index=plan.kept_layers.index(i), ffn_channels=plan.ffn_size(geometry),
                       kv_heads=plan.kv_groups[i].tolist() if i in plan.kv_groups else list(range(geometry.kv_heads)))
        if "influence" in s:
            rec["influence"] = round(s["influence"], 6)
        records[f"{geometry.blocks_name}.{i}"] = rec
    return records


def model_geometry(model: nn.Module) -> Geometry:
    found = find_blocks(model)
    if found is None:
        raise SqueezeError(f"structured pruning: cannot find the transformer blocks of {type(model).__name__}")
    return geometry_of(model.config, found[0])


def apply_structured(model: nn.Module, config: Structured, calib=None, io=None) -> dict[str, dict]:
    """Measure, plan and rewrite ``model`` in place; records per original block."""
    if io is not None:
        raise SqueezeError("structured pruning rewrites shapes: it does not run inside a block-by-block recipe")
    geometry = model_geometry(model)
    scores = measure(model, config, calib, geometry)
    plan = plan_for(scores, config, geometry, model.config.to_dict())
    apply_plan(model, plan, geometry)
    return plan_records(plan, scores, geometry)


# ---- a model directory, block by block ----------------------------------------------------


class _ReadBlocks:
    """`squeeze.runner.BlockIO` that reads each block from the shards for the forward and frees it after."""

    dp = None

    def __init__(self, streamed):
        self.streamed = streamed

    def finished(self, index: int) -> bool:
        return False

    def load(self, index: int, block: nn.Module, finished: bool) -> None:
        self.streamed.load_block(index)

    def done(self, index: int, prefix: str, block: nn.Module, records) -> None:
        from squeeze.offload import return_freed_memory

        self.streamed.release_block(index)
        return_freed_memory()

    def outside_blocks(self):
        return self.streamed.outside_blocks()

    def activations(self, tokens: int, streams: int, device: torch.device):
        return None


def _sliced(streamed, plan: Plan, geometry: Geometry):
    """The pruned model's tensors, read one at a time from the source's shards (tied tensors once)."""
    from squeeze.surgery import slice_tensor

    stored: set[str] = set()
    for key, source in streamed.keys.items():
        if source in stored:
            continue
        stored.add(source)
        result = slice_tensor(key, streamed.read(key), plan, geometry)
        if result is not None:
            yield result


def prune_dir(src, out, config: Structured, calib, overwrite: bool, max_shard_bytes: int):
    """Structured pruning of a model directory of safetensors: importance measured with one block in memory
    at a time, then the pruned checkpoint written tensor by tensor. Raises `squeeze.lazy.LazyUnavailable`
    for a model that cannot be read block by block (the caller loads it whole)."""
    import json

    from squeeze.checkpoint import gptq as ckpt
    from squeeze.checkpoint.record import checkpoint_metadata, layer_record
    from squeeze.fsutil import atomic_output_dir
    from squeeze.lazy import LazyModel, LazyUnavailable
    from squeeze.recipe import Recipe

    streamed = LazyModel(src, hash_weights=True)
    if streamed.quantized:
        raise LazyUnavailable("it is a quantized checkpoint")
    geometry = geometry_of(streamed.model.config, streamed.blocks_name)
    source_config = json.loads((src / "config.json").read_text())
    with torch.no_grad():
        scores = measure(streamed.model, config, calib, geometry, io=_ReadBlocks(streamed))
    plan = plan_for(scores, config, geometry, source_config)
    records = {name: layer_record(None, "structured", config, r)
               for name, r in plan_records(plan, scores, geometry).items()}
    metadata = checkpoint_metadata(None, {}, records, Recipe((config,)).to_dict(), calib, src, streamed.sha256)
    with atomic_output_dir(out, overwrite) as tmp:
        ckpt.write_checkpoint(tmp, _sliced(streamed, plan, geometry), shrunk_config(source_config, plan, geometry),
                              metadata, src, max_shard_bytes)
    return out


register_pass("structured", Structured, apply_structured, lambda config: config.score == "activation")
