"""`squeeze export --to tensorrt`: a serialized TensorRT engine built from squeeze's ONNX graph.

fp16: the float graph built with the FP16 flag. int8: a W8A8 checkpoint's explicit QDQ graph
(activations written as int8 with zero point 0, the only Q/DQ form TensorRT takes; a checkpoint with
asymmetric "azp" activations is refused before any work). int4: a 4-bit symmetric group-wise checkpoint
(w4g64 / w4g128) as INT4 weight-only, the weights written as blocked INT4 DequantizeLinear -> MatMul
(onnx/dqblock.py cites TensorRT's constraints); grids TensorRT cannot take are refused before any work.
One optimisation profile covers every dynamic axis (batch, sequence, past/total sequence). Needs an
NVIDIA GPU and the tensorrt package; without either the export stops before any work with one line
saying which.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from squeeze.errors import SqueezeError, VerificationError
from squeeze.exporters import Artifact


class TRTType(NamedTuple):
    """How one --type is built: the ONNX graph it starts from and the TensorRT builder flags."""

    onnx_type: str  # float type the graph is traced in
    flags: tuple[str, ...]  # tensorrt.BuilderFlag names
    int4_encoding: str = "matmulnbits"  # ONNXExport.int4_encoding
    lowering: str | None = None  # the lowering the graph must contain (the checkpoint must be quantized so)


TRT_TYPES: dict[str, TRTType] = {
    "fp16": TRTType("fp32", ("FP16",)),
    "int8": TRTType("fp32", ("FP16", "INT8"), lowering="qdq"),
    # INT4 weight-only: FP16 kernels around the INT4 weights; BuilderFlag.INT4 (TensorRT 10+) enables int4
    "int4": TRTType("fp32", ("FP16", "INT4"), int4_encoding="dq-block", lowering="dq-block"),
}
# TensorRT's INT4 block sizes ("Quantization Schemes" in the TensorRT docs; see onnx/dqblock.py)
TRT_INT4_BLOCK_SIZES = (64, 128)
# what --type needs from the checkpoint, for the one-line refusal
TYPE_NEEDS = {"int8": "a W8A8 checkpoint (squeeze quantize --scheme w8a8)",
              "int4": "a 4-bit symmetric group-wise checkpoint (squeeze quantize --scheme w4g128)"}
ENGINE_SUFFIXES = (".plan", ".engine")


def nvidia_gpu_count() -> int:
    """CUDA devices the driver reports (0 without a driver or device); no CUDA toolkit needed."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def refuse_asymmetric_activations(src: Path) -> None:
    """One line naming the fix if the checkpoint at ``src`` has asymmetric activations (from squeeze.json)."""
    from squeeze.checkpoint.gptq import read_layer_schemes

    schemes = (read_layer_schemes(src) if src.is_dir() else {}).values()
    names = sorted({s.name for s in schemes if s.activations is not None and not s.activations.symmetric})
    if names:
        raise SqueezeError(f"TensorRT takes int8 activations with zero point 0 only, and {str(src)!r} has asymmetric "
                           f"activations ({', '.join(names)}: uint8 with a zero point); re-quantize with symmetric "
                           "activations (--scheme w8a8) for TensorRT, or export this checkpoint --to onnx")


def refuse_int4_grids(src: Path) -> None:
    """One line naming the fix if a layer recorded in ``src``'s squeeze.json cannot be TensorRT INT4 weight-only."""
    from squeeze.checkpoint.gptq import read_layer_schemes
    from squeeze.exporters.onnx.dqblock import check_int4_scheme

    for name, scheme in (read_layer_schemes(src) if src.is_dir() else {}).items():
        check_int4_scheme(scheme, name, TRT_INT4_BLOCK_SIZES)


def check_int4_blocks(onnx_path: Path) -> None:
    """Every blocked DequantizeLinear in the graph uses a block size TensorRT takes (a layer narrower than
    its group size gets a smaller block than its scheme names)."""
    import onnx

    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        size = next((a.i for a in node.attribute if a.name == "block_size"), None)
        if node.op_type == "DequantizeLinear" and size is not None and size not in TRT_INT4_BLOCK_SIZES:
            raise SqueezeError(f"{node.input[0]}: TensorRT's INT4 block size must be 64 or 128, this layer's group "
                               f"is {size} columns wide; re-quantize with --scheme w4g64 (or quantize it in float)")


def require_builder_flags(trt, flags: tuple[str, ...]) -> None:
    """One line if the installed TensorRT lacks a builder flag --type needs (INT4 arrived in TensorRT 10)."""
    missing = [f for f in flags if not hasattr(trt.BuilderFlag, f)]
    if missing:
        raise SqueezeError(f"the installed TensorRT {getattr(trt, '__version__', '?')} has no builder flag "
                           f"{', '.join(missing)}; INT4 weight-only engines need TensorRT 10 or newer")


def require_tensorrt():
    """The tensorrt module, or one SqueezeError line saying what is missing (GPU, package, or both)."""
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    gpu = nvidia_gpu_count() > 0
    if tensorrt is not None and gpu:
        return tensorrt
    missing = []
    if not gpu:
        missing.append("no NVIDIA GPU was found (TensorRT builds and runs engines only on NVIDIA GPUs)")
    if tensorrt is None:
        missing.append("tensorrt is not installed (pip install 'squeeze-quant[tensorrt]' on an NVIDIA GPU machine)")
    raise SqueezeError("TensorRT export/run is unavailable here: " + "; ".join(missing))


@dataclass(frozen=True)
class TensorRTExport:
    """Engine precision, verification, KV-cache graph, and the optimisation profile's shape ranges."""

    qtype: str = "fp16"
    verify: bool = True
    kv_cache: bool = False
    max_batch: int = 8
    opt_batch: int = 1
    max_sequence: int = 2048
    opt_sequence: int = 256
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.qtype not in TRT_TYPES:
            raise SqueezeError(f"unknown TensorRT --type {self.qtype!r}; choose from {', '.join(TRT_TYPES)}")
        if not (1 <= self.opt_batch <= self.max_batch and 1 <= self.opt_sequence <= self.max_sequence):
            raise SqueezeError("TensorRT profile needs 1 <= opt_batch <= max_batch and "
                               "1 <= opt_sequence <= max_sequence")


def dim_ranges(config: TensorRTExport, max_context: int | None) -> dict[str, tuple[int, int, int]]:
    """Named dynamic axis -> (min, opt, max) for the optimisation profile."""
    seq_max = min(config.max_sequence, max_context or config.max_sequence)
    seq_opt = min(config.opt_sequence, seq_max)
    return {
        "batch": (1, config.opt_batch, config.max_batch),
        "sequence": (1, seq_opt, seq_max),
        "total_sequence": (1, seq_opt, seq_max),
        "past_sequence": (0, seq_opt - 1 if seq_opt > 1 else 0, seq_max - 1),
    }


def input_profiles(onnx_path: Path, ranges: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min, opt, max) shapes from the ONNX graph's named dims."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    profiles = {}
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        shapes = []
        for which in range(3):
            shape = []
            for d in dims:
                if d.dim_param:
                    if d.dim_param not in ranges:
                        raise SqueezeError(f"input {inp.name!r} has dynamic axis {d.dim_param!r} with no profile range")
                    shape.append(ranges[d.dim_param][which])
                else:
                    shape.append(d.dim_value)
            shapes.append(tuple(shape))
        profiles[inp.name] = tuple(shapes)
    return profiles


def build_engine(onnx_path: Path, profiles: dict, flags: tuple[str, ...], workspace_gib: float) -> bytes:
    """Parse the ONNX file and build a serialized engine with one optimisation profile."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SqueezeError(f"TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SqueezeError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(serialized)


def export_tensorrt(src: Path, out: Path, config: TensorRTExport, overwrite: bool = False) -> Artifact:
    """Export ``src`` to ONNX (temporary), build the engine, verify it against the ONNX graph's torch model."""
    from squeeze.exporters.onnx.exporter import ONNXExport, export_onnx
    from squeeze.fsutil import atomic_output_file, scratch_dir

    if out.suffix.lower() not in ENGINE_SUFFIXES:
        raise SqueezeError(f"TensorRT output must end in {' or '.join(ENGINE_SUFFIXES)}, got {str(out)!r}")
    refuse_asymmetric_activations(src)
    kind = TRT_TYPES[config.qtype]
    if config.qtype == "int4":
        refuse_int4_grids(src)
    require_builder_flags(require_tensorrt(), kind.flags)  # before any work
    with scratch_dir(out.parent, out.name) as tmp:
        onnx_art = export_onnx(src, tmp / "model.onnx",
                               ONNXExport(qtype=kind.onnx_type, verify=False, kv_cache=config.kv_cache,
                                          act_encoding="int8", int4_encoding=kind.int4_encoding))
        if kind.lowering is not None and kind.lowering not in onnx_art.type:
            raise SqueezeError(f"--type {config.qtype} needs {TYPE_NEEDS[config.qtype]}; "
                               f"{str(src)!r} is {onnx_art.type}")
        if config.qtype == "int4":
            check_int4_blocks(onnx_art.path)
        from squeeze.eval.onnxruntime import OrtRuntime

        max_context = OrtRuntime.from_path(onnx_art.path).max_context
        engine = build_engine(onnx_art.path, input_profiles(onnx_art.path, dim_ranges(config, max_context)),
                              kind.flags, config.workspace_gib)
    with atomic_output_file(out, overwrite) as tmp_engine:
        tmp_engine.write_bytes(engine)
        record = verify_engine(tmp_engine, src) if config.verify else None
    return Artifact(out, "tensorrt", f"{onnx_art.type}-{config.qtype}", len(engine), record, onnx_art.notes)


def verify_engine(engine_path: Path, src: Path) -> dict:
    """Run the engine and squeeze's torch model of the same weights on seeded tokens: KLD / top-1."""
    import torch

    from squeeze.api import load
    from squeeze.eval.tensorrt import TensorRTRuntime
    from squeeze.exporters.onnx.verify import compare, token_inputs

    runtime = TensorRTRuntime.from_path(engine_path)
    reference = load(src, "float32").eval()
    pairs = []
    with torch.no_grad():
        for ids, _ in token_inputs(runtime.vocab_size or int(reference.config.vocab_size)):
            pairs.append((runtime.logits(ids), reference(input_ids=ids).logits.float()))
    try:
        record = compare(pairs, exact=False, logits=True)
    except VerificationError as e:
        raise VerificationError(f"TensorRT engine: {e}") from None
    record["runtime"] = "tensorrt"
    return record
