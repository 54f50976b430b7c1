"""Edits of a .tflite flatbuffer: squeeze's integer weights placed into the float graph litert-torch wrote.

litert-torch converts the float graph (the checkpoint's weights dequantized to float32, exactly the values its
codes stand for); each quantized Linear became a FULLY_CONNECTED whose constant weight tensor holds those float32
bytes, which is how it is found again here (by content, in every signature's subgraph). The weight is then
replaced by the checkpoint's own codes and scales, never re-rounded:

- int8 per channel: an INT8 tensor with per-channel float32 scales (float16 values, exactly);
- int4 (2-4 bit symmetric codes) per block of ``group`` input columns, two ways:
  * for TFLite's int4 kernels (dynamic-range): an INT4 tensor (two codes per byte, low nibble first) with
    TFLite's BlockwiseQuantization, float16 scales [out, in / group];
  * for float arithmetic (weight-only): the same bytes as an INT4 tensor of shape [out * in / group, group],
    one row per block, quantized per channel (a float32 scale and an int64 zero point per block, TFLite's
    per-channel format), a DEQUANTIZE and a RESHAPE to [out, in] in front of the FULLY_CONNECTED;
- float16: a FLOAT16 constant.

How the FULLY_CONNECTED reads it: a DEQUANTIZE op in front (float arithmetic on the exact weights:
weight-only; TFLite dequantizes a constant once, at the first run), or directly (TFLite's hybrid /
dynamic-range kernels: activations quantized to int8 per row at run time). Blockwise int4 can only be read
directly: TFLite's DEQUANTIZE returns zeros for it (measured, ai-edge-litert 2.3), hence the per-block rows.
A layer with static int8 inputs (W8A8) is rewritten as an integer matmul, `integer_matmul`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

FC = "FULLY_CONNECTED"
BMM = "BATCH_MATMUL"
QUANTIZE = "QUANTIZE"
# XNNPACK rejects blockwise scales that are zero or subnormal in float16; the smallest normal one replaces them
MIN_NORMAL_FP16 = np.float16(2.0 ** -14)


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def read(raw: bytes):
    """The flatbuffer as mutable objects (ModelT). Buffers stored after the flatbuffer (offset/size, as
    ai-edge-quantizer and large-model converters write them) are read into the objects, so `write` places
    them inline again instead of keeping offsets into a file that no longer exists."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(raw))
    for buffer in model.buffers or []:
        if getattr(buffer, "offset", 0) > 1 and getattr(buffer, "size", 0) > 0:
            buffer.data = np.frombuffer(raw, dtype=np.uint8, count=buffer.size, offset=buffer.offset).copy()
            buffer.offset, buffer.size = 0, 0
    return model


def write(model) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def op_name(model, op) -> str:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)


def content_key(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def buffer_bytes(model, tensor) -> bytes | None:
    if not tensor.buffer or tensor.buffer >= len(model.buffers):
        return None
    data = model.buffers[tensor.buffer].data
    return None if data is None else np.asarray(data, dtype=np.uint8).tobytes()


def fc_weights(model) -> dict[str, list[tuple[int, int]]]:
    """Content hash of every constant float32 FULLY_CONNECTED weight -> [(subgraph, tensor index)]."""
    float32 = schema().TensorType.FLOAT32
    found: dict[str, list[tuple[int, int]]] = {}
    for s, sg in enumerate(model.subgraphs):
        for op in sg.operators:
            if op_name(model, op) != FC or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            tensor = sg.tensors[op.inputs[1]]
            data = buffer_bytes(model, tensor) if tensor.type == float32 else None
            if data is not None:
                key = hashlib.sha256(data).hexdigest()
                if (s, op.inputs[1]) not in found.get(key, []):
                    found.setdefault(key, []).append((s, op.inputs[1]))
    return found


@dataclass(frozen=True)
class IntWeight:
    """A layer's codes as TFLite stores them: signed levels (code - zero) and float16 scales per group."""

    name: str
    levels: np.ndarray  # int8 [out, in]
    scales: np.ndarray  # float16 [out, groups]; groups == 1: per channel
    bits: int  # 8, or 4 (2-4 bit codes all fit int4)

    @property
    def group(self) -> int:
        return self.levels.shape[1] // self.scales.shape[1]


def add_buffer(model, data: np.ndarray) -> int:
    buf = schema().BufferT()
    buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
    model.buffers.append(buf)
    return len(model.buffers) - 1


def _add_tensor(sg, name: bytes, ttype: int, shape, buffer: int, quantization=None) -> int:
    t = schema().TensorT()
    t.name, t.type, t.shape, t.buffer = name, ttype, list(shape), buffer
    t.quantization = quantization
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def pack_int4(levels: np.ndarray) -> np.ndarray:
    """Two signed 4-bit levels per byte, the first in the low nibble (TFLite's INT4 layout)."""
    flat = np.ravel(levels).astype(np.int8)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    return ((flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)).astype(np.uint8)


def unpack_int4(data: np.ndarray, count: int) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    low, high = (data & 0xF).astype(np.int8), (data >> 4).astype(np.int8)
    both = np.stack([low, high], axis=-1).reshape(-1)[:count]
    return np.where(both > 7, both - 16, both).astype(np.int8)


def safe_block_scales(scales: np.ndarray) -> tuple[np.ndarray, int]:
    """float16 scales with zero/subnormal magnitudes raised to the smallest normal float16 (sign kept)."""
    s = scales.astype(np.float16)
    bad = np.abs(s.astype(np.float32)) < float(MIN_NORMAL_FP16)
    return np.where(bad, np.where(s < 0, -MIN_NORMAL_FP16, MIN_NORMAL_FP16), s).astype(np.float16), int(bad.sum())


def place_int_weight(model, where: list[tuple[int, int]], weight: IntWeight, block_rows: bool = False) -> None:
    """Replace the float weight tensors at ``where`` (one buffer) by ``weight``'s codes and scales.

    4-bit codes are TFLite's blockwise tensor (read by its int4 kernels), or with ``block_rows`` one row per
    block quantized per channel (for `dequantize_in_front`, which reshapes it back)."""
    fb = schema()
    first = model.subgraphs[where[0][0]].tensors[where[0][1]]
    if weight.bits == 8:
        data = weight.levels.astype(np.int8)
    else:
        data = pack_int4(weight.levels)  # row-major: the same bytes whether rows are channels or blocks
    model.buffers[first.buffer].data = np.frombuffer(data.tobytes(), dtype=np.uint8)
    # int4 for the kernels is always blockwise (a per-channel int4 layer: one block per row): TFLite's builtin
    # hybrid kernels compute per-channel int4 wrongly (measured, ai-edge-litert 2.3), its blockwise path is right
    blockwise = not block_rows and (weight.bits == 4 or weight.scales.shape[1] > 1)
    scale_buffer = add_buffer(model, weight.scales.astype(np.float16)) if blockwise else None
    rows, cols = weight.levels.shape
    for s, t in where:
        sg = model.subgraphs[s]
        tensor = sg.tensors[t]
        tensor.name = weight.name.encode()
        tensor.type = fb.TensorType.INT8 if weight.bits == 8 else fb.TensorType.INT4
        q = fb.QuantizationParametersT()
        q.quantizedDimension = 0
        if scale_buffer is None:  # per channel, or per block as rows
            q.scale = weight.scales.reshape(-1).astype(np.float32)
            q.zeroPoint = np.zeros(len(q.scale), dtype=np.int64)
            tensor.shape = [len(q.scale), rows * cols // len(q.scale)]
        else:
            details = fb.BlockwiseQuantizationT()
            details.scales = _add_tensor(sg, weight.name.encode() + b".scales", fb.TensorType.FLOAT16,
                                         weight.scales.shape, scale_buffer)
            details.zeroPoints = -1
            details.blockSize = weight.group
            q.detailsType = fb.QuantizationDetails.BlockwiseQuantization
            q.details = details
        tensor.quantization = q


def place_float16(model, where: list[tuple[int, int]], values: np.ndarray, name: str | None = None) -> None:
    """Replace the float32 constant at ``where`` by its float16 rounding."""
    fb = schema()
    first = model.subgraphs[where[0][0]].tensors[where[0][1]]
    model.buffers[first.buffer].data = np.frombuffer(values.astype(np.float16).tobytes(), dtype=np.uint8)
    for s, t in where:
        tensor = model.subgraphs[s].tensors[t]
        tensor.type = fb.TensorType.FLOAT16
        if name:
            tensor.name = name.encode()


def _opcode(model, builtin: int) -> int:
    from ai_edge_litert.tools import flatbuffer_utils

    fb = schema()
    for i, code in enumerate(model.operatorCodes):
        if flatbuffer_utils.get_builtin_code_from_operator_code(code) == builtin:
            return i
    code = fb.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def dequantize_in_front(model, where: list[tuple[int, int]], shape: tuple[int, int] | None = None) -> None:
    """A DEQUANTIZE op (constant -> float32) in front of every consumer of the tensors at ``where``, and a
    RESHAPE to ``shape`` after it when the constant is stored in another shape (int4 blocks as rows)."""
    fb = schema()
    for s, t in where:
        sg = model.subgraphs[s]
        tensor = sg.tensors[t]
        stored = [int(d) for d in tensor.shape]
        target = stored if shape is None else [int(d) for d in shape]
        out = _add_tensor(sg, tensor.name + b".dequantized", fb.TensorType.FLOAT32, target, 0)
        for op in sg.operators:
            op.inputs = np.asarray([out if i == t else i for i in op.inputs], dtype=np.int32)
        if target == stored:
            ops = [_op(model, fb.BuiltinOperator.DEQUANTIZE, [t], [out])]
        else:
            flat = _add_tensor(sg, tensor.name + b".blocks", fb.TensorType.FLOAT32, stored, 0)
            shape_c = _add_tensor(sg, tensor.name + b".shape", fb.TensorType.INT32, [len(target)],
                                  add_buffer(model, np.asarray(target, np.int32)))
            opt = fb.ReshapeOptionsT()
            opt.newShape = target
            ops = [_op(model, fb.BuiltinOperator.DEQUANTIZE, [t], [flat]),
                   _op(model, fb.BuiltinOperator.RESHAPE, [flat, shape_c], [out], fb.BuiltinOptions.ReshapeOptions,
                       opt)]
        sg.operators[0:0] = ops


def _reshaped_after_dequantize(model, sg) -> dict[int, list[int]]:
    """Constant tensor index -> the shape a DEQUANTIZE + RESHAPE in front of a layer gives it (int4 block rows)."""
    dq, out = {}, {}
    for op in sg.operators:
        name = op_name(model, op)
        if name == "DEQUANTIZE":
            dq[int(op.outputs[0])] = int(op.inputs[0])
        elif name == "RESHAPE" and int(op.inputs[0]) in dq:
            out[dq[int(op.inputs[0])]] = [int(d) for d in sg.tensors[int(op.outputs[0])].shape]
    return out


def read_int_weights(model) -> dict[str, IntWeight]:
    """Every INT8/INT4 constant with per-channel or blockwise scales, by tensor name (what the file holds), in
    the layer's shape [out, in] (int4 block rows are read back into their layer)."""
    fb = schema()
    out: dict[str, IntWeight] = {}
    for sg in model.subgraphs:
        reshaped = _reshaped_after_dequantize(model, sg)
        for t, tensor in enumerate(sg.tensors):
            if tensor.type not in (fb.TensorType.INT8, fb.TensorType.INT4) or tensor.quantization is None:
                continue
            raw = buffer_bytes(model, tensor)
            if raw is None:
                continue
            stored = int(tensor.shape[0])
            rows, cols = reshaped.get(t, [stored, int(np.prod(tensor.shape[1:]))])
            data = np.frombuffer(raw, dtype=np.uint8)
            if tensor.type == fb.TensorType.INT8:
                levels, bits = data.view(np.int8).reshape(rows, cols), 8
            else:
                levels, bits = unpack_int4(data, rows * cols).reshape(rows, cols), 4
            q = tensor.quantization
            if q.detailsType == fb.QuantizationDetails.BlockwiseQuantization:
                scale_tensor = sg.tensors[q.details.scales]
                scales = np.frombuffer(buffer_bytes(model, scale_tensor), dtype=np.float16).reshape(
                    rows, cols // q.details.blockSize)
            elif q.scale is not None and len(q.scale) == stored and stored % rows == 0:
                scales = np.asarray(q.scale, dtype=np.float32).astype(np.float16).reshape(rows, stored // rows)
            else:
                continue
            out[tensor.name.decode()] = IntWeight(tensor.name.decode(), levels, scales, bits)
    return out


def set_fc_option(model, where: list[tuple[int, int]], asymmetric_inputs: bool) -> None:
    """The FULLY_CONNECTED ops reading ``where``: quantize their float inputs asymmetrically (per row) at run time."""
    targets = set(where)
    for s, sg in enumerate(model.subgraphs):
        for op in sg.operators:
            if op_name(model, op) == FC and len(op.inputs) > 1 and (s, int(op.inputs[1])) in targets:
                if op.builtinOptions is not None and hasattr(op.builtinOptions, "asymmetricQuantizeInputs"):
                    op.builtinOptions.asymmetricQuantizeInputs = asymmetric_inputs


def find_column_scaled(model, found: dict[str, list[tuple[int, int]]], weight: np.ndarray
                       ) -> tuple[str, np.ndarray] | None:
    """The FULLY_CONNECTED weight the converter made of ``weight`` by folding a preceding multiplication into
    it (W' = W * c per input column: a LayerNorm's gamma), as (its key in ``found``, c); None if none is."""
    w = np.asarray(weight, dtype=np.float32)
    pick = np.abs(w).argmax(0)  # per column, the row where the column is largest
    pivot = w[pick, np.arange(w.shape[1])]
    for key, where in found.items():
        tensor = model.subgraphs[where[0][0]].tensors[where[0][1]]
        if tuple(tensor.shape) != w.shape:
            continue
        folded = np.frombuffer(buffer_bytes(model, tensor), dtype=np.float32).reshape(w.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(pivot != 0, folded[pick, np.arange(w.shape[1])] / pivot, np.float32(1)).astype(np.float32)
        # the converter computed fl(W * gamma); c is gamma to within rounding: agree to a few ulps everywhere
        if np.all(np.abs(w * c - folded) <= 4 * np.spacing(np.abs(folded).astype(np.float32)) + 1e-30):
            return key, c
    return None


def scale_input(model, where: list[tuple[int, int]], c: np.ndarray) -> None:
    """Undo a fold: a MUL by ``c`` (per input column) in front of each FULLY_CONNECTED reading ``where``, so
    its weight can hold the unscaled layer."""
    fb = schema()
    code = _opcode(model, fb.BuiltinOperator.MUL)
    buffer = add_buffer(model, np.asarray(c, dtype=np.float32))
    for s, t in where:
        sg = model.subgraphs[s]
        for pos in [i for i, op in enumerate(sg.operators)
                    if op_name(model, op) == FC and len(op.inputs) > 1 and int(op.inputs[1]) == t][::-1]:
            fc = sg.operators[pos]
            x = sg.tensors[int(fc.inputs[0])]
            scale = _add_tensor(sg, sg.tensors[t].name + b".input_scale", fb.TensorType.FLOAT32, [len(c)], buffer)
            out = _add_tensor(sg, x.name + b".scaled", fb.TensorType.FLOAT32, x.shape, 0)
            mul = fb.OperatorT()
            mul.opcodeIndex = code
            mul.inputs, mul.outputs = np.asarray([int(fc.inputs[0]), scale], np.int32), np.asarray([out], np.int32)
            mul.builtinOptionsType = fb.BuiltinOptions.MulOptions
            mul.builtinOptions = fb.MulOptionsT()
            fc.inputs = np.asarray([out, *[int(i) for i in fc.inputs[1:]]], np.int32)
            sg.operators.insert(pos, mul)


def _op(model, builtin: int, inputs, outputs, options_type=None, options=None):
    op = schema().OperatorT()
    op.opcodeIndex = _opcode(model, builtin)
    op.inputs, op.outputs = np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def _per_tensor(scale: float, zero_point: int):
    q = schema().QuantizationParametersT()
    q.scale, q.zeroPoint = np.asarray([scale], np.float32), np.asarray([zero_point], np.int64)
    q.quantizedDimension = 0
    return q


def integer_matmul(model, where: list[tuple[int, int]], weight: IntWeight, input_scale: float,
                   input_zero: int) -> int:
    """Rewrite each FULLY_CONNECTED reading the int8 weight at ``where`` (placed by `place_int_weight`) as W8A8
    with static int8 inputs: QUANTIZE (float -> int8 at ``input_scale`` / ``input_zero``, TFLite's int8 terms)
    -> BATCH_MATMUL of int8 codes with an int32 output (the exact integer dot products; TFLite's int32-output
    kernel multiplies the raw codes, so the input zero point comes back as a per-channel constant) -> CAST to
    float32 -> MUL by input scale x weight scale per output channel -> ADD of the bias minus the zero point's
    share. A FULLY_CONNECTED with int8 inputs cannot do this: its output must be int8 or int16 (int16 output
    from int8 inputs computes zeros, measured), i.e. it needs a calibrated output range squeeze's W8A8 does not
    have (its outputs are float). Returns the number of ops rewritten."""
    fb = schema()
    scales = input_scale * weight.scales[:, 0].astype(np.float64)
    levels = weight.levels.astype(np.int64)
    shift = input_zero * levels.sum(1) * scales  # the zero point's share of each output channel
    mul_buffer = add_buffer(model, scales.astype(np.float32))
    rewritten = 0
    for s, t in where:
        sg = model.subgraphs[s]
        for pos in [i for i, op in enumerate(sg.operators)
                    if op_name(model, op) == FC and len(op.inputs) > 1 and int(op.inputs[1]) == t][::-1]:
            fc = sg.operators[pos]
            x, y = int(fc.inputs[0]), int(fc.outputs[0])
            bias_at = int(fc.inputs[2]) if len(fc.inputs) > 2 else -1
            bias = np.zeros(len(scales))
            if bias_at >= 0:
                bias = np.frombuffer(buffer_bytes(model, sg.tensors[bias_at]), dtype=np.float32).astype(np.float64)
            offset = (bias - shift).astype(np.float32)
            name = sg.tensors[t].name
            x_shape = [int(d) for d in sg.tensors[x].shape]
            out_shape = x_shape[:-1] + [len(scales)]
            xq = _add_tensor(sg, name + b".input_int8", fb.TensorType.INT8, x_shape, 0,
                             _per_tensor(input_scale, input_zero))
            acc = _add_tensor(sg, name + b".acc_int32", fb.TensorType.INT32, out_shape, 0)
            accf = _add_tensor(sg, name + b".acc", fb.TensorType.FLOAT32, out_shape, 0)
            mul_c = _add_tensor(sg, name + b".out_scale", fb.TensorType.FLOAT32, [len(scales)], mul_buffer)
            same = [int(d) for d in sg.tensors[y].shape] == out_shape
            last = y if same else _add_tensor(sg, name + b".out", fb.TensorType.FLOAT32, out_shape, 0)
            act = getattr(fc.builtinOptions, "fusedActivationFunction", 0) if fc.builtinOptions is not None else 0
            bmm = fb.BatchMatMulOptionsT()
            bmm.adjX, bmm.adjY = False, True  # weight [out, in]
            ops = [_op(model, fb.BuiltinOperator.QUANTIZE, [x], [xq]),
                   _op(model, fb.BuiltinOperator.BATCH_MATMUL, [xq, t], [acc], fb.BuiltinOptions.BatchMatMulOptions,
                       bmm),
                   _op(model, fb.BuiltinOperator.CAST, [acc], [accf])]
            mul_opt, add_opt = fb.MulOptionsT(), fb.AddOptionsT()
            if np.any(offset):
                scaled = _add_tensor(sg, name + b".scaled", fb.TensorType.FLOAT32, out_shape, 0)
                add_c = _add_tensor(sg, name + b".offset", fb.TensorType.FLOAT32, [len(scales)],
                                    add_buffer(model, offset))
                add_opt.fusedActivationFunction = act
                ops += [_op(model, fb.BuiltinOperator.MUL, [accf, mul_c], [scaled], fb.BuiltinOptions.MulOptions,
                            mul_opt),
                        _op(model, fb.BuiltinOperator.ADD, [scaled, add_c], [last], fb.BuiltinOptions.AddOptions,
                            add_opt)]
            else:
                mul_opt.fusedActivationFunction = act
                ops.append(_op(model, fb.BuiltinOperator.MUL, [accf, mul_c], [last], fb.BuiltinOptions.MulOptions,
                               mul_opt))
            if not same:  # the FULLY_CONNECTED flattened its batch dimensions: the same RESHAPE
                target = [int(d) for d in sg.tensors[y].shape]
                shape_c = _add_tensor(sg, name + b".out_shape", fb.TensorType.INT32, [len(target)],
                                      add_buffer(model, np.asarray(target, np.int32)))
                opt = fb.ReshapeOptionsT()
                opt.newShape = target
                ops.append(_op(model, fb.BuiltinOperator.RESHAPE, [last, shape_c], [y],
                               fb.BuiltinOptions.ReshapeOptions, opt))
            sg.operators[pos:pos + 1] = ops
            rewritten += 1
    return rewritten


def read_input_quantization(model) -> dict[str, tuple[float, int]]:
    """Static int8 inputs of the integer matmuls, by their weight's name: (scale, zero point)."""
    out = {}
    for sg in model.subgraphs:
        made_by = {int(o): op for op in sg.operators for o in op.outputs}
        for op in sg.operators:
            if op_name(model, op) != BMM:
                continue
            producer = made_by.get(int(op.inputs[0]))
            if producer is None or op_name(model, producer) != QUANTIZE:
                continue
            q = sg.tensors[int(op.inputs[0])].quantization
            out[sg.tensors[int(op.inputs[1])].name.decode()] = (float(q.scale[0]), int(q.zeroPoint[0]))
    return out
