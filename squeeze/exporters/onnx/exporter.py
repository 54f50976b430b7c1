"""`squeeze export --to onnx`: trace with torch.onnx (TorchScript exporter), carry squeeze's integers, verify.

Float models export at fp32 or fp16. A squeeze checkpoint keeps its own quantization: 8-bit
per-channel (with calibrated static 8-bit activations, symmetric or with a zero point) becomes QDQ,
group-wise 2/4/8-bit weight-only becomes com.microsoft MatMulNBits, or (``int4_encoding="dq-block"``,
TensorRT's form) 4-bit symmetric group-wise becomes INT4 DequantizeLinear -> MatMul at opset 21.
The file is written in a temporary directory, checked with onnx.checker, run in onnxruntime against
squeeze's torch model of the same weights, and only then moved into place (with its external data
file when the weights exceed 256 MiB).

A model directory with transformer blocks is exported block by block (`squeeze.lazy`, `weights.py`): each
block is read, lowered and its weights stashed before the next is read; the graph is traced on placeholder
weights; the weights are written into the file one tensor at a time; the torch reference that checks the
file runs block by block as well. Peak memory on a 4.7 GB model: reports/streaming.md.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.optional import require
from squeeze.exporters import Artifact
from squeeze.exporters.onnx.dqblock import DQ_BLOCK_OPSET
from squeeze.exporters.onnx.graphs import GRAPH_BUILDERS, GraphSpec, lower_quant_linears, model_kind, module_graph
from squeeze.exporters.onnx.kvcache import KVDecodeCheck
from squeeze.exporters.onnx.verify import ModuleCheck, TokenCheck
from squeeze.exporters.onnx.weights import WeightStash, cast_nonpersistent_buffers, trace, write_model
from squeeze.lazy import LazyModel
from squeeze.model import nonfinite_tensors, refuse_nonfinite
from squeeze.modules import QuantLinear
from squeeze.offload import return_freed_memory

# --type name -> torch dtype of the graph's float tensors
ONNX_TYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 17
MAX_OPSET = 21


@dataclass(frozen=True)
class ONNXExport:
    """What to write: float type, verification, KV-cache inputs/outputs, opset, external data."""

    qtype: str = "fp32"
    verify: bool = True
    kv_cache: bool = False
    opset: int | None = None  # None: DEFAULT_OPSET, or DQ_BLOCK_OPSET for the dq-block int4 encoding
    external_data: bool | None = None  # None: when the weights exceed weights.INLINE_MAX_BYTES (256 MiB)
    # symmetric static int8 activations as uint8/128 (onnxruntime) or int8/0 (TensorRT); asymmetric ones are
    # always uint8 with their calibrated zero point
    act_encoding: str = "uint8"
    # weight-only group-wise layers as MatMulNBits (onnxruntime) or blocked INT4 DequantizeLinear (TensorRT)
    int4_encoding: str = "matmulnbits"

    def __post_init__(self) -> None:
        from squeeze.exporters.onnx.graphs import INT4_ENCODINGS
        from squeeze.exporters.onnx.qdq import ACT_ENCODINGS

        if self.int4_encoding not in INT4_ENCODINGS:
            raise SqueezeError(f"int4_encoding must be one of {', '.join(INT4_ENCODINGS)}, got {self.int4_encoding!r}")
        if self.act_encoding not in ACT_ENCODINGS:
            raise SqueezeError(f"act_encoding must be one of {', '.join(ACT_ENCODINGS)}, got {self.act_encoding!r}")
        if self.qtype not in ONNX_TYPES:
            raise SqueezeError(f"unknown ONNX --type {self.qtype!r}; choose from {', '.join(ONNX_TYPES)} "
                               "(int8/int4 come from a quantized checkpoint: run squeeze quantize first)")
        if not 13 <= self.onnx_opset <= MAX_OPSET:
            raise SqueezeError(f"ONNX opset must be from 13 to {MAX_OPSET} (per-channel QDQ needs 13), "
                               f"got {self.opset}")
        if self.int4_encoding == "dq-block" and self.onnx_opset < DQ_BLOCK_OPSET:
            raise SqueezeError(f"the dq-block int4 encoding needs opset {DQ_BLOCK_OPSET} (INT4 DequantizeLinear with "
                               f"block_size), got {self.opset}")

    @property
    def dtype(self) -> torch.dtype:
        return ONNX_TYPES[self.qtype]

    @property
    def onnx_opset(self) -> int:
        if self.opset is not None:
            return self.opset
        return DQ_BLOCK_OPSET if self.int4_encoding == "dq-block" else DEFAULT_OPSET


def _require_onnx():
    require("onnx", "onnx")
    require("onnxruntime", "onnx")


def precision_name(kinds: set[str], qtype: str) -> str:
    """fp32 / fp16 for float models; for quantized ones each layer grid plus how it is written
    (``kinds``: "<scheme>-<lowering>" of every quantized layer)."""
    if not kinds:
        return qtype
    return "+".join(sorted(kinds)) + ("" if qtype == "fp32" else f"-{qtype}")


def _quant_kinds(module: nn.Module, int4_encoding: str) -> set[str]:
    from squeeze.exporters.onnx.graphs import lowering_for

    return {f"{m.scheme.name}-{lowering_for(m, int4_encoding)}" for m in module.modules() if isinstance(m, QuantLinear)}


class _Lowered:
    """What lowering a model unit by unit produced: counts per lowering, layer kinds."""

    def __init__(self, config: ONNXExport, stash: WeightStash):
        self.config, self.stash = config, stash
        self.counts: dict[str, int] = {}
        self.kinds: set[str] = set()

    def unit(self, root: nn.Module, prefix: str = "", skip: str | None = None) -> None:
        """Lower the QuantLinears under ``root`` (named ``prefix`` in the model), then stash its weights; modules
        named ``skip`` or under it (the blocks, when ``root`` is the whole model) are left alone."""
        cfg = self.config
        self.kinds |= _quant_kinds(root, cfg.int4_encoding)
        for kind, n in lower_quant_linears(root, cfg.dtype, cfg.act_encoding, cfg.int4_encoding).items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        modules = [(f"{prefix}.{n}" if prefix and n else prefix or n, m) for n, m in root.named_modules()
                   if skip is None or not (n == skip or n.startswith(skip + "."))]
        self.stash.take(modules)
        return_freed_memory()

    @property
    def notes(self) -> list[str]:
        return [f"{n} linear layers written as {k}" for k, n in sorted(self.counts.items())]


def write_graph(spec: GraphSpec, out: Path, config: ONNXExport, overwrite: bool, stash: WeightStash, check,
                reference) -> tuple[int, dict | None]:
    """Trace ``spec`` (placeholders), write its weights from ``stash`` and verify: ``check.run_onnx`` on the
    file in onnxruntime, then ``check.run_torch`` on the model ``reference()`` (a context manager) yields.
    The file is moved into place only after that. Returns (bytes, verification record)."""
    from squeeze.eval.onnxruntime import OrtRuntime, artifact_size

    tmp_dir = stash.directory.parent
    raw_dir = tmp_dir / "raw"
    raw_dir.mkdir()
    weights = trace(spec.module, spec.args, raw_dir / "model.onnx", config.onnx_opset, spec.input_names,
                    spec.output_names, spec.dynamic_axes, stash)
    final = tmp_dir / out.name
    write_model(raw_dir / "model.onnx", final, stash, weights,
                {"squeeze.kind": spec.kind, **spec.metadata}, config.external_data)
    shutil.rmtree(stash.directory)
    record = None
    if config.verify:
        runtime = OrtRuntime.from_path(final)
        check.run_onnx(runtime)
        del runtime
        gc.collect()
        return_freed_memory()  # the session's arena, before the reference reads its first weights
        with reference() as model:
            record = check.run_torch(model)
    size = artifact_size(final)
    _move_into_place(tmp_dir, out, overwrite)
    return size, record


def _move_into_place(tmp_dir: Path, out: Path, overwrite: bool) -> None:
    """Data file first, the .onnx last: a present .onnx always has its data beside it."""
    data = tmp_dir / (out.name + ".data")
    stale = out.with_name(out.name + ".data")
    if data.exists():
        os.replace(data, stale)
    elif stale.exists() and overwrite:
        stale.unlink()
    if out.exists() and not overwrite:
        raise SqueezeError(f"output {str(out)!r} appeared while writing; pass --overwrite to replace it")
    os.replace(tmp_dir / out.name, out)


def _lower_streamed(lazy: LazyModel, lowered: _Lowered) -> None:
    """Each unit read, lowered and stashed in turn: the modules outside the blocks, then block by block."""
    lazy.load_outside()
    lowered.unit(lazy.model, skip=lazy.blocks_name)  # the blocks' layers are still float on meta here
    for i, block in enumerate(lazy.blocks):
        lazy.load_block(i)
        lowered.unit(block, lazy.block_prefix(i)[:-1])


def export_onnx(src: Path, out: Path, config: ONNXExport, overwrite: bool = False) -> Artifact:
    """Export the model directory ``src`` (float or squeeze checkpoint) to the .onnx file ``out``.

    Block by block (`squeeze.lazy`) when the model has transformer blocks: one block's weights in memory
    while writing, and while verifying (the torch reference runs block by block too).
    """
    from squeeze import __version__
    from squeeze.api import load
    from squeeze.fsutil import scratch_dir
    from squeeze.lazy import LazyUnavailable

    _require_onnx()
    if out.suffix.lower() != ".onnx":
        raise SqueezeError(f"ONNX output must end in .onnx, got {str(out)!r}")
    try:
        lazy = LazyModel(src, torch.float32)
        model = lazy.model
    except LazyUnavailable:
        lazy, model = None, load(src, "float32").eval()
    kind = model_kind(model)
    if kind not in GRAPH_BUILDERS:
        raise SqueezeError(f"{str(src)!r} is neither a causal LM nor an encoder; export plain modules with "
                           "squeeze.exporters.onnx.export_module")
    if lazy is None:
        refuse_nonfinite(nonfinite_tensors(model.state_dict().items()), str(src))
    vocab = int(model.config.vocab_size)
    with scratch_dir(out.parent, out.name) as tmp_dir:
        lowered = _Lowered(config, WeightStash(tmp_dir / "weights", config.dtype))
        if lazy is not None:
            _lower_streamed(lazy, lowered)
        else:
            lowered.unit(model)
        cast_nonpersistent_buffers(model, config.dtype)
        spec = GRAPH_BUILDERS[kind](model, config.kv_cache)
        precision = precision_name(lowered.kinds, config.qtype)
        spec.metadata.update({"squeeze.source": str(src.resolve()), "squeeze.precision": precision,
                              "squeeze.version": __version__})
        exact = not lowered.counts and config.qtype == "fp32"
        check = KVDecodeCheck(vocab, exact) if config.kv_cache else TokenCheck(kind, vocab, exact)

        @contextmanager
        def reference():
            if lazy is None:  # the model was lowered in place: read it again
                yield load(src, "float32").eval()
                return
            with LazyModel(src, torch.float32).running() as ref:
                yield ref

        size, record = write_graph(spec, out, config, overwrite, lowered.stash, check, reference)
    return Artifact(out, "onnx", precision, size, record, lowered.notes)


def export_module(
    module: nn.Module, example_inputs, out: str | Path, config: ONNXExport | None = None, overwrite: bool = False
) -> Artifact:
    """Export a plain nn.Module (e.g. a CNN, float or squeeze-quantized) to ``out``; batch axis dynamic."""
    from squeeze.fsutil import check_output_path, scratch_dir

    _require_onnx()
    config = config or ONNXExport()
    if config.kv_cache:
        raise SqueezeError("--kv-cache applies to causal language models, not plain modules")
    out = check_output_path(out, overwrite, kind="file", suffixes=(".onnx",))
    reference = module.eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph_args = tuple(a.to(config.dtype) if a.is_floating_point() else a for a in args)
    model = copy.deepcopy(reference)
    with scratch_dir(out.parent, out.name) as tmp_dir:
        lowered = _Lowered(config, WeightStash(tmp_dir / "weights", config.dtype))
        spec = module_graph(_lowered_copy(model, lowered, config), graph_args)
        precision = precision_name(lowered.kinds, config.qtype)
        check = ModuleCheck(args, spec.args, not lowered.counts and config.qtype == "fp32")
        size, record = write_graph(spec, out, config, overwrite, lowered.stash, check, lambda: nullcontext(reference))
    return Artifact(out, "onnx", precision, size, record, lowered.notes)


def _lowered_copy(model: nn.Module, lowered: _Lowered, config: ONNXExport) -> nn.Module:
    """``model`` (a copy) lowered and stashed whole; its forward run once on placeholders is `module_graph`'s job."""
    lowered.unit(model)
    cast_nonpersistent_buffers(model, config.dtype)
    return model.eval()
