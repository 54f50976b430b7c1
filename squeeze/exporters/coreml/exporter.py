"""`squeeze export --to coreml`: an ML program (iOS 18 / macOS 15) holding squeeze's own codes, checked on Linux.

Route (why): coremltools converts the torch graph (``torch.export`` -> ``ct.convert``; its TorchScript path
breaks on numpy >= 2.4 here) into a MIL program; its own compression (``linear_quantize_weights``,
``palettize_weights``) would re-round the weights, so squeeze converts the float graph of the checkpoint's exact
values, finds each quantized layer's weight constant by content, and puts its codes in its place as
``constexpr_blockwise_shift_scale`` or ``constexpr_lut_to_dense`` (`weights`), then serializes the program.

Verification (Core ML prediction needs macOS, and the Linux wheel has no runtime): the saved package is
loaded (``skip_model_load``), its program is read back from the protobuf and weight blob, every constexpr must
hold the checkpoint's codes, scales, zero points and tables exactly, and the program must have what the model
needs (its inputs, one linear per layer, one constexpr per quantized layer). Only then is it moved into place.

Token models are converted at one fixed sequence length (``seq_len``), as the TFLite export: a causal LM maps
input_ids [1, L] to logits [1, L, vocab] (causal mask built in), an encoder maps input_ids and attention_mask to
last_hidden_state. LMs compute in float32 by default (float16 compute degrades Llama outputs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.exporters import Artifact
from squeeze.exporters.coreml.weights import CoreMLWeight, content_key, dequantized, float_twins
from squeeze.exporters.token_graphs import eager_attention, load_token_model, token_length

COREML_TYPES = ("fp32", "fp16")
MASKED = -1e4  # additive mask of a padded position (exp(-1e4) is 0 in float16 and float32)
METADATA_KEY = "squeeze"  # user-defined metadata entry: JSON with kind, seq_len, vocab_size, precision, source


@dataclass(frozen=True)
class CoreMLExport:
    """What to write: the compute precision (and float weights' dtype), the token graphs' length."""

    qtype: str | None = None  # None: fp32 for causal LMs, fp16 otherwise
    seq_len: int | None = None  # None: the model's context, at most DEFAULT_SEQ_LEN[kind]
    # causal LMs: a stateful program (KV cache of seq_len positions as Core ML states, flexible token count)
    kv_cache: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        if self.qtype is not None and self.qtype not in COREML_TYPES:
            raise SqueezeError(f"unknown Core ML --type {self.qtype!r}; choose from {', '.join(COREML_TYPES)} "
                               "(int8/int4/lookup tables come from a quantized checkpoint: run squeeze quantize first)")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or int(self.seq_len) < 1):
            raise SqueezeError(f"--seq-len must be a positive number of tokens, got {self.seq_len}")


def require_coremltools():
    from squeeze.optional import native_output_kept_back, require

    with native_output_kept_back():  # its import-time notices (untested torch version, missing native proxies)
        return require("coremltools", "coreml")


class _Logits(nn.Module):
    """input_ids [1, L] -> logits, with the causal mask as a constant (the exporter's graph has no mask ops)."""

    def __init__(self, model: nn.Module, seq_len: int):
        super().__init__()
        self.model = model
        self.register_buffer("mask", torch.full((seq_len, seq_len), float("-inf")).triu(1)[None, None])

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=self.mask, use_cache=False).logits


class _Hidden(nn.Module):
    """input_ids, attention_mask [1, L] -> last_hidden_state; the padding mask is made additive [1, 1, 1, L] here
    with plain arithmetic (transformers' own mask code lowers to ops coremltools lacks). The masked value is
    -1e4, not float32's minimum: in a float16 program that is -inf, and 0 x -inf is NaN for every kept token
    (found by the interpreter)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        additive = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * MASKED
        return self.model(input_ids=input_ids, attention_mask=additive).last_hidden_state


def _exported(module: nn.Module, args: tuple, dynamic_shapes=None):
    """torch.export of ``module`` in ATen ops, without the no-op ``alias`` nodes coremltools cannot read."""
    from torch._decomp import get_decompositions

    ops = torch.ops.aten
    # ATen ops coremltools' frontend lacks, decomposed into ones it has (full, arange, sub, ...)
    table = get_decompositions([ops.new_ones, ops.new_zeros, ops.new_full, ops.new_empty])
    with torch.no_grad():
        program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes).run_decompositions(table)
    for node in list(program.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
    program.graph_module.recompile()
    return program


def mil_program(module: nn.Module, args: tuple, precision: str, input_names: list[str], flexible: int | None = None):
    """The converted MIL program of ``module`` at ``args``' shapes; with ``flexible`` (the stateful decoder),
    the token count and the mask's cache length range over 1..flexible, and the cache buffers become states."""
    import coremltools as ct

    from squeeze.optional import native_output_kept_back

    dynamic = None
    shapes = [tuple(a.shape) for a in args]
    if flexible is not None:
        tokens, cached = torch.export.Dim("tokens", min=1, max=flexible), torch.export.Dim("cached", min=1, max=flexible)
        dynamic = ({1: tokens}, {2: tokens, 3: cached})
        shapes = [(1, ct.RangeDim(1, flexible)), (1, 1, ct.RangeDim(1, flexible), ct.RangeDim(1, flexible))]
    with native_output_kept_back():
        inputs = [ct.TensorType(name=n, shape=shape, dtype=np.int32 if not a.is_floating_point() else np.float32)
                  for n, shape, a in zip(input_names, shapes, args)]
        return ct.convert(_exported(module, args, dynamic), convert_to="milinternal", inputs=inputs,
                          minimum_deployment_target=ct.target.iOS18, compute_precision=_precision(precision))


# ops of a norm's statistic (mean of squares, + eps, 1/sqrt): kept float32 in float16 programs. SmolLM2-135M's
# hidden states square past float16's 65504 from layer 6 on (found by the export's MIL interpreter: inf, then
# NaN logits); the normalized values and everything else stay float16.
NORM_STATISTIC_OPS = ("pow", "reduce_mean", "reduce_sum_square", "rsqrt")


def _float16_op(op) -> bool:
    """coremltools' FP16ComputePrecision op_selector: False keeps ``op`` float32."""
    if op.op_type in NORM_STATISTIC_OPS:
        return False
    if op.op_type in ("add", "sqrt", "real_div"):  # the eps and root after a mean
        for var in op.inputs.values():
            producer = getattr(var, "op", None)
            if producer is not None and producer.op_type in ("reduce_mean", "reduce_sum_square"):
                return False
    return True


def _precision(precision: str):
    import coremltools as ct

    if precision == "fp32":
        return ct.precision.FLOAT32
    return ct.transform.FP16ComputePrecision(op_selector=_float16_op)


def place_weights(program, weights: dict[str, CoreMLWeight]) -> dict[str, str]:
    """Replace each quantized layer's weight constant (found by its values) with its constexpr; returns the
    constexpr op name of each layer. A layer not found is an error (the converter changed its weight)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    function = program.functions["main"]
    placed: dict[str, str] = {}
    # a float16 program holds the float16 rounding of the values: found by that too
    by_key = {**{content_key(dequantized(w).astype(np.float16)): w for w in weights.values()}, **weights}
    for op in list(function.operations):
        if op.op_type not in ("linear", "matmul"):
            continue
        var = op.inputs.get("weight", op.inputs.get("y"))
        if var is None or var.op is None or var.op.op_type != "const" or var.val is None:
            continue
        values = np.asarray(var.val)
        weight = by_key.get(content_key(values.astype(np.float32)))
        if weight is None or weight.layer in placed:
            continue
        dtype = np.float16 if values.dtype == np.float16 else np.float32
        scopes = [ScopeInfo(source=src, data=list(data)) for src, data in var.op.scopes.items()
                  if src != ScopeSource.COREMLTOOLS_GRAPH_PASS]  # the source's scopes, which validation requires
        name = var.name + "_squeeze"
        with function, mb.scope(*scopes):
            if weight.kind == "lut":
                rows, cols = weight.data.shape
                new = mb.constexpr_lut_to_dense(
                    indices=weight.data.astype(_uint_dtype(types, weight.bits)),
                    lut=weight.lut.astype(dtype).reshape(rows // weight.lut_rows, 1, -1, 1), before_op=op, name=name)
            else:
                data_type = types.np_int4_dtype if weight.bits == 4 else np.int8
                if not weight.signed:
                    data_type = types.np_uint4_dtype if weight.bits == 4 else np.uint8
                extra = {} if weight.signed else {"offset": weight.offset.astype(data_type)}
                new = mb.constexpr_blockwise_shift_scale(data=weight.data.astype(data_type),
                                                         scale=weight.scale.astype(dtype), before_op=op, name=name,
                                                         **extra)
        function.replace_uses_of_var_after_op(anchor_op=new.op, old_var=var, new_var=new, no_check_var_types=True,
                                              force_replace=True)
        placed[weight.layer] = new.op.name
    missing = sorted({w.layer for w in weights.values()} - set(placed))
    if missing:
        raise SqueezeError(f"the converted program has no weight constant holding {missing[0]}'s values "
                           f"({len(missing)} layer(s)); the export cannot place their codes")
    return placed


def _uint_dtype(types, bits: int):
    return {1: types.np_uint1_dtype, 2: types.np_uint2_dtype, 3: types.np_uint3_dtype, 4: types.np_uint4_dtype,
            6: types.np_uint6_dtype, 8: np.uint8}[bits]


def export_coreml(src: Path, out: Path, config: CoreMLExport, overwrite: bool = False) -> Artifact:
    """Export the model directory ``src`` (float, or a squeeze checkpoint) to the .mlpackage ``out``."""
    from squeeze import __version__

    require_coremltools()
    model, kind = load_token_model(src, "coreml")
    seq_len = token_length(model, kind, config.seq_len)
    precision = config.qtype or ("fp32" if kind == "causal-lm" else "fp16")
    weights = float_twins(model)
    eager_attention(model)
    ids = torch.randint(0, int(model.config.vocab_size), (1, seq_len), generator=torch.Generator().manual_seed(0))
    meta = {"kind": kind, "seq_len": seq_len, "vocab_size": int(model.config.vocab_size),
            "source": str(Path(src).resolve()), "version": __version__}
    if config.kv_cache:
        return _write_stateful(model, seq_len, weights, Path(out), precision, overwrite, meta, config.verify)
    if kind == "causal-lm":
        module, args, names = _Logits(model, seq_len), (ids,), ["input_ids"]
    else:
        module, args, names = _Hidden(model), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"]
    return _write(module, args, names, weights, Path(out), precision, overwrite, meta, config.verify)


def _write_stateful(model, cache_len: int, weights, out: Path, precision: str, overwrite: bool, meta: dict,
                    verify: bool) -> Artifact:
    from squeeze.exporters.coreml.stateful import StatefulDecoder, causal_mask, check_against_model

    if meta["kind"] != "causal-lm":
        raise SqueezeError("--kv-cache applies to causal LMs (a stateful decoder); this is an encoder")
    if cache_len < 4:
        raise SqueezeError(f"--seq-len {cache_len} leaves no room for a KV cache; use at least 4")
    decoder = StatefulDecoder(model, cache_len).eval()
    prefill = max(1, cache_len // 2)
    torch_check = check_against_model(decoder, model, meta["vocab_size"], prefill,
                                      min(8, cache_len - 1 - prefill)) if verify else None
    # torch.export cannot take the full cache length as a dynamic bound here (a reshape guard): one token less
    flexible = cache_len - 1
    ids = torch.randint(0, meta["vocab_size"], (1, prefill), generator=torch.Generator().manual_seed(0))
    meta = {**meta, "stateful": True, "max_tokens_per_call": flexible}
    return _write(decoder, (ids, causal_mask(prefill, prefill)), ["input_ids", "causal_mask"], weights, out,
                  precision, overwrite, meta, verify, flexible=flexible, torch_check=torch_check,
                  states=["key_cache", "value_cache"])


def export_module(module: nn.Module, example_inputs, out: str | Path, config: CoreMLExport | None = None,
                  overwrite: bool = False) -> Artifact:
    """Export a plain nn.Module (float or squeeze-quantized, e.g. a CNN) at its example inputs' shapes."""
    import copy

    from squeeze import __version__
    from squeeze.fsutil import check_output_path

    require_coremltools()
    config = config or CoreMLExport()
    out = check_output_path(out, overwrite, kind="dir", suffixes=(".mlpackage",))
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = copy.deepcopy(module).eval()
    weights = float_twins(model)
    names = [f"input_{i}" for i in range(len(args))]
    meta = {"kind": "module", "version": __version__}
    return _write(model, args, names, weights, out, config.qtype or "fp16", overwrite, meta, config.verify)


def _write(module, args, names, weights, out: Path, precision: str, overwrite: bool, meta: dict,
           verify: bool, flexible: int | None = None, torch_check: dict | None = None,
           states: list[str] = ()) -> Artifact:
    import coremltools as ct

    from squeeze.exporters.coreml.verify import check_package, interpreted_check
    from squeeze.fsutil import scratch_dir
    from squeeze.optional import native_output_kept_back

    program = mil_program(module, args, precision, names, flexible)
    placed = place_weights(program, weights)
    kind_of = _precision_name(weights, precision)
    with native_output_kept_back():
        mlmodel = ct.convert(program, source="milinternal", convert_to="mlprogram", skip_model_load=True,
                             minimum_deployment_target=ct.target.iOS18, compute_precision=_precision(precision))
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps({**meta, "precision": kind_of, "inputs": names})
    mlmodel.short_description = f"squeeze export ({kind_of})"
    record = None
    with scratch_dir(out.parent, out.name) as tmp_dir:
        final = tmp_dir / out.name
        with native_output_kept_back():
            mlmodel.save(str(final))
        if verify:
            expected = {n: None if flexible else tuple(a.shape) for n, a in zip(names, args)}
            record = check_package(final, weights, placed, expected, _layer_counts(module), list(states))
            if torch_check is not None:
                record["stateful_forward_in_torch"] = torch_check
            run = interpreted_check(final, module, args, names, logits=meta["kind"] == "causal-lm",
                                    exact=precision == "fp32", stateful=bool(states))
            if "skipped" in run:
                record["interpreter"] = run["skipped"]
            else:
                record.update({k: v for k, v in run.items() if k != "runtime"})
                record["runtime"] = "coremltools read-back + squeeze's MIL interpreter (Core ML itself needs macOS)"
        _replace_package(final, out, overwrite, tmp_dir)
    return Artifact(out, "coreml", kind_of, _size(out), record, _notes(weights))


def _layer_counts(module: nn.Module) -> dict[str, int]:
    """How many of each weight layer the program must compute (linear ops; conv ops)."""
    linears = sum(isinstance(m, nn.Linear) for m in module.modules())
    convs = sum(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in module.modules())
    return {"linear": linears, "conv": convs}


def _replace_package(new: Path, out: Path, overwrite: bool, tmp_dir: Path) -> None:
    """Move the package ``new`` to ``out``; an existing one (``overwrite``) is set aside first and comes back
    if the move fails, so the user's package is never lost."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SqueezeError(f"output {str(out)!r} appeared while writing; pass --overwrite to replace it")
        old = tmp_dir / "replaced"
        os.replace(out, old)
        try:
            os.replace(new, out)
        except OSError:
            os.replace(old, out)
            raise
        return
    os.replace(new, out)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _precision_name(weights: dict[str, CoreMLWeight], precision: str) -> str:
    kinds = sorted({f"lut{w.bits}" if w.kind == "lut" else f"int{w.bits}" for w in weights.values()})
    return "+".join(kinds) + f"-{precision}" if kinds else precision


def _notes(weights: dict[str, CoreMLWeight]) -> list[str]:
    counts: dict[str, int] = {}
    for w in weights.values():
        what = (f"{w.bits}-bit lookup tables (constexpr_lut_to_dense, one table per {w.lut_rows} rows)"
                if w.kind == "lut" else
                f"int{w.bits} {'symmetric' if w.signed else 'asymmetric'} blocks (constexpr_blockwise_shift_scale)")
        counts[what] = counts.get(what, 0) + 1
    return [f"{n} layer(s) written as {what} with the checkpoint's codes" for what, n in sorted(counts.items())]
