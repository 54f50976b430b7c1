"""A numpy interpreter of the MIL ops squeeze's Core ML programs use: the saved program, run on Linux.

Core ML cannot predict on Linux. To check that the program in the package computes what the model computes
(the converter's lowering of RMSNorm, rotary embeddings, attention, the constexpr decompression), squeeze runs
the program read back from the package, op by op, with the semantics of the MIL op specification (iOS 18),
and compares its outputs with torch's. Every value is rounded to its op's output type after the op (float16
programs compute in float16 storage); accumulation is float32, as on Core ML's CPU. This is squeeze's reading
of the spec, not Apple's runtime: on macOS, `squeeze eval` runs the real one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from squeeze.errors import SqueezeError


class Uninterpretable(SqueezeError):
    """The program uses an op this interpreter does not implement."""


def _dtype(var) -> np.dtype | None:
    from coremltools.converters.mil.mil import types

    if not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type):
        return None
    name = types.builtin_to_string(var.dtype)
    return {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
            "int8": np.int8, "uint8": np.uint8, "int16": np.int16}.get(name)


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    out = []
    for i, dim in enumerate(shape):
        step = int(stride[i]) if stride is not None else 1
        if squeeze_mask is not None and squeeze_mask[i]:
            out.append(int(begin[i]))
            continue
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        out.append(slice(b, e, step))
    return tuple(out)


def _blockwise(data, scale, offset):
    def spread(a):  # each entry of a block-level tensor repeated over its block
        for axis, (n, m) in enumerate(zip(data.shape, a.shape)):
            if n != m:
                a = np.repeat(a, n // m, axis=axis)
        return a

    values = data.astype(np.float32)
    if offset is not None:
        values = values - spread(offset.astype(np.float32))
    return values * spread(scale.astype(np.float32))


def _lut(indices, lut):
    """constexpr_lut_to_dense (iOS 18): lut [*blocks, palettes, vector] (vector 1) over indices [*dims]."""
    if lut.shape[-1] != 1:
        raise Uninterpretable("constexpr_lut_to_dense with vector palettes")
    tables = lut[..., 0]
    for axis, (n, m) in enumerate(zip(indices.shape, tables.shape)):
        if n != m:
            tables = np.repeat(tables, n // m, axis=axis)
    return np.take_along_axis(tables, indices.astype(np.int64)[..., None], axis=-1)[..., 0].astype(np.float32)


def _gelu(x, mode):
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return (0.5 * x * (1 + torch.erf(torch.from_numpy(np.asarray(x, np.float32)) / math.sqrt(2)).numpy()))


def _conv(a):
    x, w = torch.from_numpy(np.asarray(a["x"], np.float32)), torch.from_numpy(np.asarray(a["weight"], np.float32))
    pads = [int(p) for p in a.get("pad", [0] * 2 * (x.dim() - 2))]
    if a.get("pad_type", "custom") not in ("custom", "valid"):
        raise Uninterpretable(f"conv with pad_type {a['pad_type']}")
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}[x.dim()]
    x = torch.nn.functional.pad(x, [v for i in reversed(range(len(pads) // 2)) for v in pads[2 * i: 2 * i + 2]])
    bias = None if a.get("bias") is None else torch.from_numpy(np.asarray(a["bias"], np.float32))
    return conv(x, w, bias, stride=[int(s) for s in a["strides"]], dilation=[int(d) for d in a["dilations"]],
                groups=int(a.get("groups", 1))).numpy()


def _pool(a, kind):
    x = torch.from_numpy(np.asarray(a["x"], np.float32))
    if a.get("pad_type", "valid") != "valid" and any(int(p) for p in a.get("pad", [])):
        raise Uninterpretable("pooling with padding")
    fn = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    return fn(x, [int(k) for k in a["kernel_sizes"]], [int(s) for s in a["strides"]]).numpy()


def _reduce(fn):
    return lambda a: fn(a["x"], axis=None if a.get("axes") is None else tuple(int(i) for i in a["axes"]),
                        keepdims=bool(a.get("keep_dims", False)))


def _expand(a):
    x = a["x"]
    for axis in sorted(int(i) if int(i) >= 0 else int(i) + x.ndim + 1 for i in a["axes"]):
        x = np.expand_dims(x, axis)
    return x


def _reshape(a):
    shape = [int(d) for d in a["shape"]]
    return a["x"].reshape([a["x"].shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _softmax(a):
    x = a["x"].astype(np.float32)
    x = np.exp(x - x.max(axis=int(a["axis"]), keepdims=True))
    return x / x.sum(axis=int(a["axis"]), keepdims=True)


def _layer_norm(a):
    x = a["x"].astype(np.float32)
    axes = tuple(int(i) for i in a["axes"])
    mean = x.mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + float(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * a["gamma"]
    return y if a.get("beta") is None else y + a["beta"]


def _matmul(a):
    x, y = a["x"], a["y"]
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x.astype(np.float32), y.astype(np.float32))


def _linear(a):
    out = np.matmul(a["x"].astype(np.float32), a["weight"].astype(np.float32).T)
    return out if a.get("bias") is None else out + a["bias"]


def _slice_update(a):
    x = np.array(a["x"], copy=True)
    where = _slices(x.shape, a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                    a.get("squeeze_mask"))
    x[where] = np.reshape(a["update"], x[where].shape)
    return x


OPS = {
    "linear": _linear, "matmul": _matmul, "softmax": _softmax, "layer_norm": _layer_norm,
    "add": lambda a: a["x"] + a["y"], "sub": lambda a: a["x"] - a["y"], "mul": lambda a: a["x"] * a["y"],
    "real_div": lambda a: a["x"] / a["y"], "pow": lambda a: np.power(a["x"], a["y"]),
    "maximum": lambda a: np.maximum(a["x"], a["y"]), "minimum": lambda a: np.minimum(a["x"], a["y"]),
    "equal": lambda a: a["x"] == a["y"], "not_equal": lambda a: a["x"] != a["y"],
    "greater": lambda a: a["x"] > a["y"], "greater_equal": lambda a: a["x"] >= a["y"],
    "less": lambda a: a["x"] < a["y"], "less_equal": lambda a: a["x"] <= a["y"],
    "logical_and": lambda a: np.logical_and(a["x"], a["y"]), "logical_not": lambda a: np.logical_not(a["x"]),
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "rsqrt": lambda a: 1.0 / np.sqrt(a["x"] + float(a.get("epsilon", 1e-12))),
    "sqrt": lambda a: np.sqrt(a["x"]), "exp": lambda a: np.exp(a["x"]), "tanh": lambda a: np.tanh(a["x"]),
    "sin": lambda a: np.sin(a["x"]), "cos": lambda a: np.cos(a["x"]), "abs": lambda a: np.abs(a["x"]),
    "relu": lambda a: np.maximum(a["x"], 0), "silu": lambda a: a["x"] / (1 + np.exp(-a["x"].astype(np.float32))),
    "sigmoid": lambda a: 1 / (1 + np.exp(-a["x"].astype(np.float32))), "gelu": lambda a: _gelu(a["x"], a.get("mode")),
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "reshape": _reshape, "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": _expand, "squeeze": lambda a: np.squeeze(a["x"], None if a.get("axes") is None else
                                                            tuple(int(i) for i in a["axes"])),
    "concat": lambda a: np.concatenate([np.atleast_1d(v) for v in a["values"]], axis=int(a["axis"])),
    "tile": lambda a: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "gather": lambda a: np.take(a["x"], a["indices"].astype(np.int64), axis=int(a.get("axis", 0))),
    "slice_by_index": lambda a: a["x"][_slices(a["x"].shape, a["begin"], a["end"], a.get("stride"),
                                               a.get("begin_mask"), a.get("end_mask"), a.get("squeeze_mask"))],
    "slice_update": _slice_update, "shape": lambda a: np.asarray(a["x"].shape, np.int32),
    "range_1d": lambda a: np.arange(a["start"], a["end"], a["step"]),
    "cast": lambda a: a["x"], "identity": lambda a: a["x"],
    "constexpr_blockwise_shift_scale": lambda a: _blockwise(a["data"], a["scale"], a.get("offset")),
    "constexpr_lut_to_dense": lambda a: _lut(a["indices"], a["lut"]),
    "conv": _conv, "max_pool": lambda a: _pool(a, "max"), "avg_pool": lambda a: _pool(a, "avg"),
}


def unsupported_ops(program) -> list[str]:
    ops = {op.op_type for op in program.functions["main"].operations}
    return sorted(ops - set(OPS) - {"const", "read_state", "coreml_update_state"})


def run(program, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The outputs of ``program``'s main function on ``feeds``; ``states`` (by name) are read and updated in place."""
    function = program.functions["main"]
    missing = unsupported_ops(program)
    if missing:
        raise Uninterpretable(f"squeeze's MIL interpreter does not implement {', '.join(missing)}")
    values: dict[str, object] = {}
    for name, var in function.inputs.items():
        if states is not None and name in states:
            values[name] = name  # a state: read_state / coreml_update_state use its name
        else:
            values[name] = np.asarray(feeds[name]).astype(_dtype(var) or np.float32)

    def value(var):
        if isinstance(var, (list, tuple)):
            return [value(v) for v in var]
        if var.name in values:
            return values[var.name]
        if var.val is not None:
            return np.asarray(var.val)
        raise Uninterpretable(f"no value for {var.name}")

    for op in function.operations:
        if op.op_type == "const":
            values[op.outputs[0].name] = np.asarray(op.outputs[0].val)
            continue
        args = {k: value(v) for k, v in op.inputs.items()}
        if op.op_type == "read_state":
            out = states[args["input"]]
        elif op.op_type == "coreml_update_state":
            states[args["state"]] = out = np.asarray(args["value"]).astype(np.float16)
        else:
            out = OPS[op.op_type](args)
        dtype = _dtype(op.outputs[0])
        values[op.outputs[0].name] = np.asarray(out).astype(dtype) if dtype is not None else out
    return [np.asarray(values[v.name]) for v in function.outputs]
