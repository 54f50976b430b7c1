"""Check a saved .mlpackage on Linux: it loads, its weights read back exactly, its program has what the model needs.

Core ML prediction needs macOS. What Linux can check is checked: the package opens in coremltools
(``skip_model_load``), the MIL program is read back from its protobuf and weight blob (coremltools' milproto
loader: the bytes a device decompresses), every constexpr holds the checkpoint's codes, scales, zero points and
lookup tables bit for bit at the declared bit width, and the program's inputs and weight ops are the model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from squeeze.errors import VerificationError
from squeeze.exporters.coreml.weights import CoreMLWeight


def read_program(path: Path):
    """(MLModel without a runtime, MIL program read back from the package's protobuf and weight files)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    from squeeze.optional import native_output_kept_back

    with native_output_kept_back():
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        program = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    return model, program


def _width(var) -> int:
    """Bits of a read-back tensor's element type (int4 -> 4, uint8 -> 8)."""
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(var.dtype)
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else -1


def check_weight(op, weight: CoreMLWeight) -> None:
    """``op`` (read back) must hold ``weight`` exactly, at its bit width."""
    where = f"{weight.layer} ({op.name})"
    if weight.kind == "lut":
        if op.op_type != "constexpr_lut_to_dense":
            raise VerificationError(f"{where}: expected constexpr_lut_to_dense, found {op.op_type}")
        indices, lut = op.inputs["indices"], op.inputs["lut"]
        if _width(indices) != weight.bits or not np.array_equal(np.asarray(indices.val).astype(np.uint8), weight.data):
            raise VerificationError(f"{where}: the package's lookup indices differ from the checkpoint's codes")
        got = np.asarray(lut.val, dtype=np.float32).reshape(weight.lut.shape)
        if not np.array_equal(got, weight.lut):
            raise VerificationError(f"{where}: the package's lookup tables differ from the checkpoint's")
        return
    if op.op_type != "constexpr_blockwise_shift_scale":
        raise VerificationError(f"{where}: expected constexpr_blockwise_shift_scale, found {op.op_type}")
    data, scale = op.inputs["data"], op.inputs["scale"]
    if _width(data) != weight.bits or not np.array_equal(np.asarray(data.val).astype(weight.data.dtype), weight.data):
        raise VerificationError(f"{where}: the package's codes differ from the checkpoint's")
    if not np.array_equal(np.asarray(scale.val, dtype=np.float32), weight.scale):
        raise VerificationError(f"{where}: the package's scales differ from the checkpoint's")
    offset = op.inputs.get("offset")
    if (offset is None) != (weight.offset is None) or (
            offset is not None and not np.array_equal(np.asarray(offset.val).astype(np.uint8), weight.offset)):
        raise VerificationError(f"{where}: the package's zero points differ from the checkpoint's")


def check_package(path: Path, weights: dict[str, CoreMLWeight], placed: dict[str, str],
                  inputs: dict[str, tuple[int, ...] | None], layer_counts: dict[str, int], states: list[str] = ()
                  ) -> dict:
    """Open the package, read every placed weight back, check the program's structure (inputs: name -> fixed
    shape, or None for a flexible one; the state tensors); returns the record."""
    model, program = read_program(path)
    spec = model.get_spec()
    got_inputs = {i.name: tuple(i.type.multiArrayType.shape) for i in spec.description.input}
    if list(got_inputs) != list(inputs) or any(s is not None and got_inputs[n] != s for n, s in inputs.items()):
        raise VerificationError(f"the package's inputs are {got_inputs}, the model's are {inputs}")
    got_states = [s.name for s in spec.description.state]
    if got_states != list(states):
        raise VerificationError(f"the package's states are {got_states}, the model needs {list(states)}")
    ops = {op.name: op for op in program.functions["main"].operations}
    for weight in weights.values():
        op = ops.get(placed[weight.layer])
        if op is None:
            raise VerificationError(f"{weight.layer}: its weight op {placed[weight.layer]!r} is not in the saved program")
        check_weight(op, weight)
        if not any(c.op_type in ("linear", "matmul") for c in op.outputs[0].child_ops):
            raise VerificationError(f"{weight.layer}: its weight op feeds no linear or matmul")
    counts = {t: sum(op.op_type == t for op in ops.values()) for t in ("linear", "conv", "matmul")}
    if counts["linear"] + counts["matmul"] < layer_counts["linear"] or counts["conv"] != layer_counts["conv"]:
        raise VerificationError(f"the program computes {counts}, the model has {layer_counts} weight layers")
    constexprs = sum(op.op_type.startswith("constexpr_") for op in ops.values())
    if constexprs != len(weights):
        raise VerificationError(f"the program holds {constexprs} compressed weights, the checkpoint {len(weights)}")
    record = {"runtime": "coremltools (read back; prediction needs macOS)", "weights_checked": len(weights),
              "inputs": {k: list(v) for k, v in got_inputs.items()}, "ops": counts}
    if states:
        record["states"] = got_states
    return record


def interpreted_check(path: Path, module, args: tuple, names: list[str], logits: bool, exact: bool,
                      stateful: bool = False) -> dict:
    """The saved program run by squeeze's MIL interpreter (`interpret`) against ``module`` in torch on the same
    inputs; a stateful decoder is run as a prefill of half the window, then single-token calls. Raises
    VerificationError when the outputs disagree; a program with an op the interpreter lacks is reported, not
    failed."""
    import torch

    from squeeze.exporters.coreml import interpret
    from squeeze.exporters.onnx.verify import compare

    _, program = read_program(path)
    missing = interpret.unsupported_ops(program)
    if missing:
        return {"skipped": f"ops the interpreter does not implement: {', '.join(missing)}"}
    runtime = "squeeze MIL interpreter"
    with torch.no_grad():
        if not stateful:
            got = interpret.run(program, {n: a.numpy() for n, a in zip(names, args)})
            ref = module(*args)
            refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
            pairs = [(torch.from_numpy(np.asarray(g, np.float32)), r.float()) for g, r in zip(got, refs)]
            return compare(pairs, exact, logits=logits, runtime=runtime)
        from squeeze.exporters.coreml.stateful import causal_mask

        ids = args[0]
        prefill = ids.shape[1]
        cache = module.key_cache
        states = {"key_cache": np.zeros(cache.shape, np.float16), "value_cache": np.zeros(cache.shape, np.float16)}
        steps = min(8, cache.shape[3] - 1 - prefill)
        window = torch.cat([ids, torch.randint(0, int(module.model.config.vocab_size), (1, steps),
                                               generator=torch.Generator().manual_seed(1))], dim=1)
        parts = [interpret.run(program, {"input_ids": ids.numpy(), "causal_mask": causal_mask(prefill, prefill).numpy()},
                               states)[0]]
        for p in range(prefill, prefill + steps):
            parts.append(interpret.run(program, {"input_ids": window[:, p:p + 1].numpy(),
                                                 "causal_mask": causal_mask(1, p + 1).numpy()}, states)[0])
        got = torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))
        record = compare([(got, module.model(window).logits.float())], False, logits=True, runtime=runtime)
        record["decode_steps_checked"] = steps
        return record
