"""`squeeze export --to onnx`: trace with torch.onnx (TorchScript exporter), carry squeeze's integers, verify.

Float models export at fp32 or fp16. A squeeze checkpoint keeps its own quantization: 8-bit
per-channel (with calibrated static 8-bit activations, symmetric or with a zero point) becomes QDQ,
group-wise 2/4/8-bit weight-only becomes com.microsoft MatMulNBits, or (``int4_encoding="dq-block"``,
TensorRT's form) 4-bit symmetric group-wise becomes INT4 DequantizeLinear -> MatMul at opset 21.
The file is written in a temporary directory, checked with onnx.checker, run in onnxruntime against
squeeze's torch model of the same weights, and only then moved into place (with its external data
file when the weights exceed the protobuf limit).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.optional import require
from squeeze.exporters import Artifact
from squeeze.exporters.onnx.dqblock import DQ_BLOCK_OPSET, write_int4_initializers
from squeeze.exporters.onnx.graphs import GRAPH_BUILDERS, GraphSpec, lower_quant_linears, model_kind, module_graph
from squeeze.exporters.onnx.verify import verify_module, verify_tokens
from squeeze.modules import QuantLinear

# --type name -> torch dtype of the graph's float tensors
ONNX_TYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 17
MAX_OPSET = 21
# protobuf refuses messages of 2 GiB; weights past this go to an external data file
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass(frozen=True)
class ONNXExport:
    """What to write: float type, verification, KV-cache inputs/outputs, opset, external data."""

    qtype: str = "fp32"
    verify: bool = True
    kv_cache: bool = False
    opset: int | None = None  # None: DEFAULT_OPSET, or DQ_BLOCK_OPSET for the dq-block int4 encoding
    external_data: bool | None = None  # None: only when the weights exceed EXTERNAL_DATA_THRESHOLD
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


def precision_name(model: nn.Module, qtype: str, int4_encoding: str = "matmulnbits") -> str:
    """fp32 / fp16 for float models; the checkpoint's scheme plus how it is written for quantized ones."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return qtype
    from squeeze.exporters.onnx.graphs import lowering_for

    kinds = sorted({f"{m.scheme.name}-{lowering_for(m, int4_encoding)}" for m in layers})
    return "+".join(kinds) + ("" if qtype == "fp32" else f"-{qtype}")


def _trace(spec: GraphSpec, path: Path, opset: int) -> None:
    from squeeze.exporters.onnx.matmulnbits import MatMulNBitsLinear

    contrib = any(isinstance(m, MatMulNBitsLinear) for m in spec.module.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module, spec.args, str(path), dynamo=False, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_axes=spec.dynamic_axes, opset_version=opset,
            do_constant_folding=True, custom_opsets={"com.microsoft": 1} if contrib else None,
        )


def _initializer_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data) for t in model.graph.initializer)


def drop_identity_initializers(graph) -> int:
    """Remove Identity nodes that only rename an initializer (the exporter's de-duplication adds them).

    Q/DQ fusion and TensorRT want scales and zero points to be initializers themselves. Returns the count.
    """
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not rename:
        return 0
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in rename)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)


def _finish(raw: Path, final: Path, metadata: dict[str, str], external_data: bool | None) -> None:
    """Add squeeze metadata, save (with external data when large) and run onnx.checker."""
    import onnx

    model = onnx.load(str(raw))
    drop_identity_initializers(model.graph)
    write_int4_initializers(model.graph)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    external = external_data if external_data is not None else _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(final), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=final.name + ".data", size_threshold=1024)
    try:
        onnx.checker.check_model(str(final))
    except onnx.checker.ValidationError as e:
        raise SqueezeError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


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


def write_graph(spec: GraphSpec, out: Path, config: ONNXExport, overwrite: bool, verify_fn) -> tuple[int, dict | None]:
    """Trace ``spec`` to ``out`` atomically; ``verify_fn(runtime)`` runs before the move. Returns (bytes, record)."""
    from squeeze.eval.onnxruntime import OrtRuntime, artifact_size

    from squeeze.fsutil import scratch_dir

    with scratch_dir(out.parent, out.name) as tmp_dir:
        raw_dir = tmp_dir / "raw"
        raw_dir.mkdir()
        _trace(spec, raw_dir / "model.onnx", config.onnx_opset)
        final = tmp_dir / out.name
        _finish(raw_dir / "model.onnx", final, {"squeeze.kind": spec.kind, **spec.metadata}, config.external_data)
        record = verify_fn(OrtRuntime.from_path(final)) if config.verify else None
        size = artifact_size(final)
        _move_into_place(tmp_dir, out, overwrite)
    return size, record


def export_onnx(src: Path, out: Path, config: ONNXExport, overwrite: bool = False) -> Artifact:
    """Export the model directory ``src`` (float or squeeze checkpoint) to the .onnx file ``out``."""
    from squeeze.api import load
    from squeeze import __version__

    _require_onnx()
    if out.suffix.lower() != ".onnx":
        raise SqueezeError(f"ONNX output must end in .onnx, got {str(out)!r}")
    reference = load(src, "float32").eval()
    kind = model_kind(reference)
    if kind not in GRAPH_BUILDERS:
        raise SqueezeError(f"{str(src)!r} is neither a causal LM nor an encoder; export plain modules with "
                           "squeeze.exporters.onnx.export_module")
    model = copy.deepcopy(reference)
    precision = precision_name(model, config.qtype, config.int4_encoding)
    counts = lower_quant_linears(model, config.dtype, config.act_encoding, config.int4_encoding)
    model = model.to(config.dtype).eval()
    spec = GRAPH_BUILDERS[kind](model, config.kv_cache)
    spec.metadata.update({"squeeze.source": str(src.resolve()), "squeeze.precision": precision,
                          "squeeze.version": __version__})
    exact = not counts and config.qtype == "fp32"
    vocab = int(reference.config.vocab_size)

    def verify(runtime):
        if config.kv_cache:
            from squeeze.exporters.onnx.kvcache import verify_kv_decoding

            return verify_kv_decoding(runtime, reference, vocab, exact)
        return verify_tokens(runtime, reference, kind, vocab, exact)

    size, record = write_graph(spec, out, config, overwrite, verify)
    notes = [f"{n} linear layers written as {k}" for k, n in sorted(counts.items())]
    return Artifact(out, "onnx", precision, size, record, notes)


def export_module(
    module: nn.Module, example_inputs, out: str | Path, config: ONNXExport | None = None, overwrite: bool = False
) -> Artifact:
    """Export a plain nn.Module (e.g. a CNN, float or squeeze-quantized) to ``out``; batch axis dynamic."""
    from squeeze.fsutil import check_output_path

    _require_onnx()
    config = config or ONNXExport()
    if config.kv_cache:
        raise SqueezeError("--kv-cache applies to causal language models, not plain modules")
    out = check_output_path(out, overwrite, kind="file", suffixes=(".onnx",))
    reference = module.eval()
    model = copy.deepcopy(reference)
    precision = precision_name(model, config.qtype, config.int4_encoding)
    counts = lower_quant_linears(model, config.dtype, config.act_encoding, config.int4_encoding)
    model = model.to(config.dtype).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    spec = module_graph(model, tuple(a.to(config.dtype) if a.is_floating_point() else a for a in args))
    exact = not counts and config.qtype == "fp32"

    def verify(runtime):
        return verify_module(runtime, reference, args, spec.args, exact)

    size, record = write_graph(spec, out, config, overwrite, verify)
    return Artifact(out, "onnx", precision, size, record,
                    [f"{n} linear layers written as {k}" for k, n in sorted(counts.items())])
