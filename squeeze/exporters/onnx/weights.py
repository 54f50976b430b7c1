"""An ONNX graph traced on placeholders, its weights written afterwards one tensor at a time.

torch.onnx's TorchScript exporter serializes every weight into one in-memory protobuf, then squeeze loaded
it back to add metadata: three copies of the model at once. Here the graph's structure and its weights
take separate roads, so that exporting a model never holds more than one block of it:

1. `WeightStash.take`: as each block's layers are lowered to their ONNX forms, its tensors (cast to the
   graph's float type) go to a safetensors file in the scratch directory and are replaced in the module
   by placeholders: tensors of the same shape and dtype that occupy one element (stride 0).
2. `trace`: torch.onnx traces the placeholder model with the weights passed as extra graph inputs named
   by their stash keys (no data, and no parameters for the exporter's passes to compute on), without
   constant folding (which would compute on the placeholders' values).
3. `write_model`: the graph inputs that are weights become initializers, read back from the stash one at
   a time. What constant folding would have done to a weight (Transpose, Cast; Identity renames) is done
   here on the real tensor; int8 weights of blocked DequantizeLinear become INT4. Initializers go to
   ``FILE.onnx.data`` (tensors of 1 MiB and more at 64 KiB-aligned offsets, as onnx's writer does) unless the
   weights are small enough to sit inside the .onnx.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from squeeze.checkpoint.shards import ShardedReader, save_tensors
from squeeze.errors import SqueezeError

# Weights up to this many bytes are written inside the .onnx; past it, to FILE.onnx.data. Protobuf refuses
# messages of 2 GiB, and an inline graph is built in memory whole: the limit keeps that copy small.
INLINE_MAX_BYTES = 256 * 2**20
PROTOBUF_MAX_BYTES = 2**31 - 2**26
SMALL_TENSOR_BYTES = 1024  # smaller initializers stay inline even with external data (as onnx does)
ALIGN_THRESHOLD, ALIGNMENT = 2**20, 2**16  # onnx's defaults for aligning external tensors


def placeholder(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``t``'s shape in ``dtype`` backed by one element."""
    return torch.zeros((), dtype=dtype).expand(t.shape)


class WeightStash:
    """Weights taken out of a module tree for tracing, kept in safetensors files in ``directory``."""

    def __init__(self, directory: Path, dtype: torch.dtype):
        self.directory = directory
        self.dtype = dtype
        directory.mkdir(parents=True, exist_ok=True)
        self.keys: dict[int, str] = {}  # id(placeholder) -> its tensor's key in the stash
        self.files: list[Path] = []
        self._reader: ShardedReader | None = None

    def _target(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def take(self, modules: Iterable[tuple[str, nn.Module]]) -> None:
        """Stash the parameters and persistent buffers of ``modules`` ((qualified name, module) pairs; their
        sub-modules are not included) and put placeholders in their place. A tensor shared by several
        modules (tied embeddings) is stashed once and stays shared."""
        owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
        tensors: dict[int, tuple[str, torch.Tensor]] = {}
        for qualified, module in modules:
            slots = [(n, t, True) for n, t in module._parameters.items()]
            slots += [(n, t, False) for n, t in module._buffers.items() if n not in module._non_persistent_buffers_set]
            for local, t, is_param in slots:
                if t is None or id(t) in self.keys:
                    continue
                owners.setdefault(id(t), []).append((module, local, is_param))
                tensors.setdefault(id(t), (f"{qualified}.{local}" if qualified else local, t))
        if not tensors:
            return
        path = self.directory / f"part{len(self.files):05d}.safetensors"
        save_tensors(path, ((key, t.detach().to(self._target(t))) for key, t in tensors.values()))
        self.files.append(path)
        self._reader = None
        for tid, (key, t) in tensors.items():
            stand_in = placeholder(t, self._target(t))
            for module, local, is_param in owners[tid]:
                if is_param:
                    module._parameters[local] = nn.Parameter(stand_in, requires_grad=False)
                    self.keys[id(module._parameters[local])] = key
                else:
                    module._buffers[local] = stand_in
                    self.keys[id(stand_in)] = key

    def slots(self, module: nn.Module) -> dict[str, tuple[torch.Tensor, list[tuple[nn.Module, str, bool]]]]:
        """Stash key -> (its placeholder, the (module, name, is parameter) slots holding it) under ``module``."""
        out: dict[str, tuple[torch.Tensor, list]] = {}
        for m in module.modules():
            for store, is_param in ((m._parameters, True), (m._buffers, False)):
                for local, t in store.items():
                    if t is not None and id(t) in self.keys:
                        out.setdefault(self.keys[id(t)], (t, []))[1].append((m, local, is_param))
        return out

    def reader(self) -> ShardedReader:
        if self._reader is None:
            self._reader = ShardedReader(self.files)
        return self._reader


def cast_nonpersistent_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers computed at construction (rotary tables) in ``dtype``, as ``model.to(dtype)`` would."""
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            b = module._buffers.get(name)
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)


class _WeightsAsInputs(nn.Module):
    """``inner`` with its stashed tensors taken as extra forward arguments (put into their slots for the call).

    The TorchScript exporter's passes work with its modules' parameter values at hand, and with placeholders
    as parameters the trace of a 3-block, 1.1B-shaped model peaked 0.9 GB higher than with the same tensors as
    graph inputs, which carry only their shapes. ``inner`` is held outside the module tree so that the
    tracer sees no parameters at all.
    """

    def __init__(self, inner: nn.Module, slots: list[list[tuple[nn.Module, str, bool]]]):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        self.slots = slots

    def forward(self, *args):
        n = len(args) - len(self.slots)
        saved = []
        try:
            for owners, weight in zip(self.slots, args[n:]):
                for module, local, is_param in owners:
                    store = module._parameters if is_param else module._buffers
                    saved.append((store, local, store[local]))
                    store[local] = weight
            return self.inner(*args[:n])
        finally:
            for store, local, old in reversed(saved):
                store[local] = old


def trace(module: nn.Module, args: tuple, path: Path, opset: int, input_names, output_names, dynamic_axes,
          stash: WeightStash) -> list[str]:
    """torch.onnx (TorchScript) export of the graph alone; the stashed weights are graph inputs named by their
    stash keys (returned), the data stays in the stash."""
    from squeeze.exporters.onnx.matmulnbits import MatMulNBitsLinear

    slots = stash.slots(module)
    wrapped = _WeightsAsInputs(module, [owners for _, owners in slots.values()])
    contrib = any(isinstance(m, MatMulNBitsLinear) for m in module.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped, tuple(args) + tuple(t.detach() for t, _ in slots.values()), str(path), dynamo=False,
            input_names=list(input_names) + list(slots), output_names=output_names, dynamic_axes=dynamic_axes,
            opset_version=opset, export_params=False, do_constant_folding=False,
            custom_opsets={"com.microsoft": 1} if contrib else None,
        )
    return list(slots)


# ---- weights into the graph ------------------------------------------------------------------------


def _attribute(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _apply(array: np.ndarray, ops: tuple) -> np.ndarray:
    for op, arg in ops:
        if op == "transpose":
            array = np.ascontiguousarray(array.transpose(arg) if arg is not None else array.T)
        elif op == "cast":
            array = array.astype(arg)
    return array


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise SqueezeError("bfloat16 weights reached the ONNX writer; export as fp32 or fp16")
    return t.numpy()


def fold_weights(graph, weights: set[str]) -> dict[str, tuple[str, tuple]]:
    """Remove the nodes that only transform a weight (Identity, Transpose, Cast) and return, for every
    weight-derived value the remaining graph reads, (stash key, the transforms to apply to it)."""
    from onnx import helper

    outputs = {o.name for o in graph.output}
    values: dict[str, tuple[str, tuple]] = {name: (name, ()) for name in weights}
    kept = []
    for node in graph.node:
        source = node.input[0] if len(node.input) == 1 else None
        if source in values and node.op_type in ("Identity", "Transpose", "Cast") and node.output[0] not in outputs:
            key, ops = values[source]
            if node.op_type == "Transpose":
                perm = _attribute(node, "perm")
                ops = ops + (("transpose", tuple(perm) if perm else None),)
            elif node.op_type == "Cast":
                ops = ops + (("cast", helper.tensor_dtype_to_np_dtype(_attribute(node, "to"))),)
            values[node.output[0]] = (key, ops)
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = [name for node in kept for name in node.input] + [o.name for o in graph.output]
    order = list(dict.fromkeys(n for n in used if n in values))
    return {name: values[name] for name in order}


def _int4_inputs(graph) -> set[str]:
    """Weights read by blocked DequantizeLinear (a ``block_size`` attribute): written as INT4."""
    return {n.input[0] for n in graph.node
            if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)}


def _tensor(name: str, array: np.ndarray, int4: bool):
    """(TensorProto without data, the bytes it holds)."""
    from onnx import TensorProto, helper

    from squeeze.exporters.onnx.dqblock import INT4_RANGE, pack_int4_pairs

    if int4 and array.dtype == np.int8:
        if array.size and not (INT4_RANGE[0] <= int(array.min()) and int(array.max()) <= INT4_RANGE[1]):
            raise SqueezeError(f"{name}: values outside int4 {INT4_RANGE}; the weights are not 4-bit")
        data_type, raw = TensorProto.INT4, pack_int4_pairs(array.reshape(-1))
    else:
        data_type, raw = helper.np_dtype_to_tensor_dtype(array.dtype), array.tobytes()
    tensor = TensorProto(name=name, data_type=data_type, dims=list(array.shape))
    return tensor, raw


def _planned_bytes(stash: WeightStash, values: dict[str, tuple[str, tuple]]) -> int:
    reader = stash.reader()
    total = 0
    for key, ops in values.values():
        itemsize = reader.dtype(key).itemsize
        for op, arg in ops:
            if op == "cast":
                itemsize = np.dtype(arg).itemsize
        numel = 1
        for d in reader.shape(key):
            numel *= d
        total += numel * itemsize
    return total


def write_model(raw: Path, final: Path, stash: WeightStash, weights: list[str], metadata: dict[str, str],
                external_data: bool | None) -> None:
    """The traced graph ``raw`` with its weight inputs (named by stash key) as initializers, saved as ``final`` (and
    ``final.name + ".data"`` when external) and checked with onnx.checker."""
    import onnx

    model = onnx.load(str(raw))
    graph = model.graph
    values = fold_weights(graph, set(weights))
    int4 = _int4_inputs(graph)
    real_inputs = [i for i in graph.input if i.name not in values and i.name not in weights]
    del graph.input[:]
    graph.input.extend(real_inputs)
    total = _planned_bytes(stash, values)
    external = external_data if external_data is not None else total > INLINE_MAX_BYTES
    if not external and total > PROTOBUF_MAX_BYTES:
        raise SqueezeError(f"the weights ({total / 1e9:.1f} GB) exceed protobuf's 2 GB limit for one .onnx file; "
                           "export with external data")
    reader = stash.reader()
    data_name = final.name + ".data"
    with open(final.with_name(data_name), "wb") if external else nullcontext() as fh:
        for name, (key, ops) in values.items():
            tensor, raw_bytes = _tensor(name, _apply(_numpy(reader.get(key)), ops), name in int4)
            if not external or len(raw_bytes) < SMALL_TENSOR_BYTES:
                tensor.raw_data = raw_bytes
            else:
                offset = fh.tell()
                if len(raw_bytes) >= ALIGN_THRESHOLD and offset % ALIGNMENT:
                    fh.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
                    offset = fh.tell()
                fh.write(raw_bytes)
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw_bytes)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
                tensor.data_location = onnx.TensorProto.EXTERNAL
            graph.initializer.append(tensor)
            del raw_bytes
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(final))
    del model
    try:
        onnx.checker.check_model(str(final))
    except onnx.checker.ValidationError as e:
        raise SqueezeError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
