"""What goes into the file, decided before any tensor data is read: names, shapes, types, byte sizes.

`plan_tensors` turns a `ModelSource` and a `Mix` into one `TensorPlan` per GGUF tensor (pure apart from
reading shapes and checkpoint schemes); `tensor_bytes` then produces one tensor's bytes on demand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from squeeze.errors import SqueezeError
from squeeze.exporters.gguf.arch import ArchSpec, Hparams, gguf_name, qk_heads, qk_row_order
from squeeze.exporters.gguf.codecs import FORMATS, get_codec, pack
from squeeze.exporters.gguf.mixes import MIXES, Mix, choose_type, layer_index
from squeeze.exporters.gguf.source import BlockLayer, ModelSource, QuantLayer, contiguous_groups, exact_blocks, exact_type


@dataclass(frozen=True)
class TensorPlan:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) or (n,)
    qtype: str  # ggml type written
    wanted: str  # type the mix asked for before a shape fallback
    heads: int | None  # q/k row permutation over this many heads, None for none
    exact: bool  # written from the checkpoint's integers without re-rounding
    requantized: bool = False  # a checkpoint layer dequantized and re-rounded onto another grid

    @property
    def nbytes(self) -> int:
        fmt = FORMATS[self.qtype]
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * self.shape[-1] // fmt.block_size * fmt.type_size


def _order(name: str) -> tuple:
    """token_embd first, then blocks in order, then output_norm/output (llama.cpp's converter order)."""
    i = layer_index(name)
    return (0 if name.startswith("token_embd") else 1 if i >= 0 else 2, i, name)


def matching_mixes(qtype: str) -> list[str]:
    return [m.name for m in MIXES.values() if m.default == qtype]


def _checkpoint_grid(layer: QuantLayer | BlockLayer) -> str | None:
    if isinstance(layer, BlockLayer):
        return layer.qtype
    t = exact_type(layer.scheme)
    return t if t is not None and contiguous_groups(layer.g_idx, 32) else None


def plan_tensors(source: ModelSource, spec: ArchSpec, hp: Hparams, mix: Mix, requantize: bool) -> list[TensorPlan]:
    """One plan per GGUF tensor; a checkpoint whose grid the mix would re-round is refused (unless requantize)."""
    plans = []
    n_gqa = hp.n_head // hp.n_head_kv
    for hf_name, shape in source.weights():
        name = gguf_name(spec, hf_name)
        if name is None or (hp.tie_embeddings and name == "output.weight"):
            continue
        qtype, wanted = choose_type(mix, name, shape, layer_index(name), hp.n_layer, n_gqa, hp.tie_embeddings)
        heads = qk_heads(spec, name, hp.n_head, hp.n_head_kv)
        exact = requantized = False
        layer = source.quant_layer(hf_name) if hf_name.endswith(".weight") else None
        if layer is not None:
            grid = _checkpoint_grid(layer)
            calibrated = choose_type(mix, name, shape, layer_index(name), hp.n_layer, n_gqa, hp.tie_embeddings, True)
            if grid is not None and grid == calibrated[0]:  # calibrated on the mix: llama.cpp's imatrix types
                qtype, wanted = calibrated
            if grid == qtype:
                exact = True
            elif not FORMATS[qtype].is_float:
                if not requantize:
                    raise SqueezeError(_grid_refusal(hf_name, layer, grid, name, qtype))
                requantized = True
        plans.append(TensorPlan(name, hf_name, tuple(shape), qtype, wanted, heads, exact, requantized))
    plans.sort(key=lambda p: _order(p.gguf_name))
    names = [p.gguf_name for p in plans]
    if len(set(names)) != len(names):
        raise SqueezeError("two source tensors map to the same GGUF tensor; the checkpoint layout is not supported")
    return plans


def _grid_refusal(hf_name: str, layer: QuantLayer | BlockLayer, grid: str | None, name: str, qtype: str) -> str:
    what = f"the checkpoint's {layer.scheme.name} grid"
    if grid is None:
        why = ("act-order (non-contiguous) groups" if exact_type(layer.scheme) else "no GGUF block type stores it")
        match = f"{why}, so every GGUF quantized type would re-round it"
    else:
        match = f"it is stored exactly by {grid} (--type {' / '.join(matching_mixes(grid))})"
    return (f"{what} differs from {qtype}, which --type asks for {name} ({hf_name}); {match}. "
            "Pass a matching --type, quantize with the mix itself as the scheme (e.g. --scheme q4_k_m) so each "
            "layer is calibrated on the type the mix gives it, or --requantize to re-round the calibrated "
            "weights (loses calibration)")


def _permute(x: np.ndarray, heads: int | None) -> np.ndarray:
    return x if heads is None else x[qk_row_order(x.shape[0], heads)]


def tensor_bytes(plan: TensorPlan, source: ModelSource) -> np.ndarray:
    """The bytes of one tensor as stored in the file (uint8, row-major)."""
    if plan.exact:
        layer = source.quant_layer(plan.hf_name)
        if isinstance(layer, BlockLayer):  # the calibrated blocks as they are (q/k rows reordered whole)
            return _permute(layer.raw, plan.heads).reshape(-1)
        rows = qk_row_order(layer.codes.shape[0], plan.heads) if plan.heads else slice(None)
        layer = QuantLayer(layer.codes[rows], layer.scales[rows], layer.zeros[rows], layer.g_idx, layer.scheme)
        return pack(exact_blocks(layer, plan.qtype)).reshape(-1)
    x = _permute(source.float_tensor(plan.hf_name), plan.heads)
    return get_codec(plan.qtype).quantize(x).reshape(-1)


def fallback_notes(plans: list[TensorPlan]) -> list[str]:
    """One line per (asked type -> written type, row length) explaining shape fallbacks."""
    groups: dict[tuple[str, str, int], list[str]] = {}
    for p in plans:
        if p.qtype != p.wanted:
            groups.setdefault((p.wanted, p.qtype, p.shape[-1]), []).append(p.gguf_name)
    notes = []
    for (wanted, got, cols), names in groups.items():
        pattern = sorted({re.sub(r"blk\.\d+\.", "blk.*.", n) for n in names})
        notes.append(f"fallback: {len(names)} tensor(s) {', '.join(pattern)} written as {got} instead of {wanted}: "
                     f"rows of {cols} are not a multiple of the {wanted} block ({FORMATS[wanted].block_size})")
    return notes


def type_counts(plans: list[TensorPlan]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in plans:
        out[p.qtype] = out.get(p.qtype, 0) + 1
    return out
