"""`squeeze export --to tflite`: litert-torch writes the float graph, squeeze places its own integers, LiteRT checks.

Route (why): litert-torch's converter (`litert_torch.convert`, no TensorFlow needed) lowers the torch graph to
TFLite ops faithfully, but its quantized lowering (torchao's dequantize_affine) needs a TensorFlow nightly, and
ai-edge-quantizer re-derives scales (rounding blockwise ones through bfloat16). So the float graph of the
checkpoint's exact weights is converted, and `flatbuf` puts the checkpoint's codes and float16 scales into the
FULLY_CONNECTED weights as TFLite's int8 per-channel / int4 blockwise tensors, without re-rounding. The file is
then read back (its integers and scales must equal the checkpoint's), run in the LiteRT interpreter against
squeeze's torch model of the same weights, and only then moved into place.

Token models are converted at one fixed sequence length (``seq_len``): a causal LM maps input_ids [1, L] to
logits [1, L, vocab] (a shorter window is padded at the end, which causal attention never sees), an encoder
maps input_ids and attention_mask to last_hidden_state. Attention is exported eagerly (SDPA does not lower).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from squeeze.errors import SqueezeError, VerificationError
from squeeze.exporters import Artifact
from squeeze.exporters.tflite import flatbuf
from squeeze.exporters.tflite.weights import Twins, float_twins, reads_directly
from squeeze.exporters.token_graphs import eager_attention, load_token_model, token_length

TFLITE_TYPES = ("fp32", "fp16")
DEFAULT_PREFILL_LEN = 128  # LiteRT-LM's usual prefill signature
SCORING_SIGNATURE = "serving_default"  # the whole-window logits graph, beside prefill/decode in a --kv-cache file
METADATA_KEY = "squeeze"  # the file's metadata entry: JSON with kind, seq_len, vocab_size, precision, source


@dataclass(frozen=True)
class TFLiteExport:
    """What to write: float type of the float tensors, how int8 layers compute, the token graphs' length."""

    qtype: str = "fp32"
    # int8/int4 layers: float arithmetic on the exact weights (DEQUANTIZE, weight-only: the checkpoint's
    # torch result; dequantized once, so float32 weights in memory at run time), or TFLite's dynamic-range
    # kernels (activations quantized to int8 per row at run time; int4 stays int4 in memory and the file is
    # smaller: blockwise float16 scales instead of per-block float32 scales and int64 zero points)
    dynamic_range: bool = False
    seq_len: int | None = None  # None: the model's context, at most DEFAULT_SEQ_LEN[kind]
    # causal LMs: also the signatures LiteRT-LM runs, prefill_<prefill_len> and decode, with the KV cache of
    # seq_len positions as explicit inputs/outputs (litert-torch's own HF exportables: its cache layout)
    kv_cache: bool = False
    prefill_len: int | None = None  # None: min(DEFAULT_PREFILL_LEN, seq_len / 2)
    verify: bool = True

    def __post_init__(self) -> None:
        if self.qtype not in TFLITE_TYPES:
            raise SqueezeError(f"unknown TFLite --type {self.qtype!r}; choose from {', '.join(TFLITE_TYPES)} "
                               "(int8/int4 come from a quantized checkpoint: run squeeze quantize first)")
        for flag, value in (("--seq-len", self.seq_len), ("--prefill-len", self.prefill_len)):
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise SqueezeError(f"{flag} must be a positive number of tokens, got {value}")
        if self.prefill_len is not None and not self.kv_cache:
            raise SqueezeError("--prefill-len sets the prefill signature's length: it needs --kv-cache")


def require_litert() -> None:
    from squeeze.optional import native_output_kept_back, require

    with native_output_kept_back():  # their import-time notices
        require("litert_torch", "tflite")
        require("ai_edge_litert", "tflite")


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class _Hidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def graph_for(model: nn.Module, kind: str, seq_len: int) -> tuple[nn.Module, tuple]:
    """The module litert-torch converts and its example inputs (fixed shapes)."""
    ids = torch.randint(0, int(model.config.vocab_size), (1, seq_len), generator=torch.Generator().manual_seed(0))
    if kind == "causal-lm":
        return _Logits(model).eval(), (ids,)
    return _Hidden(model).eval(), (ids, torch.ones_like(ids))


def convert(module: nn.Module, args: tuple, signatures: list[tuple[str, nn.Module, dict]] = ()) -> bytes:
    """litert-torch's conversion of ``module`` at ``args``' shapes (its progress and notices held back); with
    ``signatures`` (name, module, keyword inputs), the module is the first signature, SCORING_SIGNATURE."""
    from squeeze.optional import native_output_kept_back

    with native_output_kept_back(), torch.no_grad():
        import litert_torch

        if not signatures:
            return bytes(litert_torch.convert(module.eval(), args).model_content())
        from litert_torch._convert import interface

        converter = interface.Converter()
        converter.add_signature(SCORING_SIGNATURE, module.eval(), sample_args=args)
        for name, sig_module, kwargs in signatures:
            converter.add_signature(name, sig_module.eval(), sample_kwargs=kwargs)
        return bytes(converter.convert(strict_export=False).model_content())


def kv_signatures(model: nn.Module, seq_len: int, prefill_len: int) -> list[tuple[str, nn.Module, dict]]:
    """prefill_<prefill_len> and decode with the KV cache as inputs and outputs, from litert-torch's exportable
    modules for Hugging Face decoder LMs (the layout LiteRT-LM reads: tokens, input_pos, an additive mask over
    the cache, kv_cache_k_i / kv_cache_v_i). ``model``'s attention is switched to litert-torch's."""
    from squeeze.optional import native_output_kept_back

    with native_output_kept_back():
        from litert_torch.generative.export_hf.core import exportable_module, exportable_module_config

    config = exportable_module_config.ExportableModuleConfig(
        model="squeeze", prefill_lengths=[prefill_len], cache_length=seq_len, quantization_recipe=None)
    model.set_attn_implementation("lrt_transposed_attention")
    out = []
    for cls in (exportable_module.LiteRTExportableModuleForDecoderOnlyLMPrefill,
                exportable_module.LiteRTExportableModuleForDecoderOnlyLMGenerate):
        module = cls(model, config)
        for name, (inputs, _) in module.get_sample_inputs(model.config).items():
            out.append((name, module, inputs))
    return out


def place_weights(model, twins: Twins, config: TFLiteExport) -> list[str]:
    """Put the checkpoint's codes (and, at fp16, the float weights) into the converted graph ``model`` (ModelT,
    in place); returns the notes."""
    found = flatbuf.fc_weights(model)
    notes, raised, unfolded = [], 0, 0
    kinds: dict[str, int] = {}
    for name, weight in twins.weights.items():
        where = found.pop(flatbuf.content_key(twins.floats[name]), None)
        if where is None:  # the converter folded a multiplication (a LayerNorm's gamma) into the weight: undo it
            scaled = flatbuf.find_column_scaled(model, found, twins.floats[name])
            if scaled is None:
                raise SqueezeError(f"{name}: its weight is not a FULLY_CONNECTED weight in the converted graph; "
                                   "the TFLite exporter cannot place its codes")
            where = found.pop(scaled[0])
            flatbuf.scale_input(model, where, scaled[1])
            unfolded += 1
        inputs = twins.inputs.get(name)
        direct = reads_directly(config.dynamic_range, inputs)
        if weight.bits == 4 and direct:  # TFLite's blockwise int4: float16 scales XNNPACK must accept
            scales, n = flatbuf.safe_block_scales(weight.scales)
            raised += n
            weight = flatbuf.IntWeight(weight.name, weight.levels, scales, weight.bits)
        block_rows = weight.bits == 4 and not direct
        flatbuf.place_int_weight(model, where, weight, block_rows=block_rows)
        if inputs is not None and inputs.static:
            flatbuf.integer_matmul(model, where, weight, inputs.scale, inputs.zero_point)
            how = " W8A8 (static int8 inputs at the checkpoint's scale, int8 x int8 -> int32 matmul)"
        elif direct:
            # the scheme's own dynamic activations say how rows are quantized; otherwise asymmetric (finer)
            flatbuf.set_fc_option(model, where, asymmetric_inputs=inputs is None or not inputs.symmetric)
            how = " dynamic-range" + (" (the scheme's dynamic int8 activations)" if inputs is not None else "")
        else:
            flatbuf.dequantize_in_front(model, where, weight.levels.shape)
            how = " weight-only" + (" (blocks stored as per-channel int4 rows, reshaped after DEQUANTIZE)"
                                    if block_rows and weight.scales.shape[1] > 1 else "")
        per_channel = weight.scales.shape[1] == 1
        kind = f"int{weight.bits} " + ("per-channel" if per_channel else f"blockwise b{weight.group}") + how
        kinds[kind] = kinds.get(kind, 0) + 1
    if config.qtype == "fp16":
        for where in found.values():  # the float FULLY_CONNECTED weights left
            first = model.subgraphs[where[0][0]].tensors[where[0][1]]
            values = np.frombuffer(flatbuf.buffer_bytes(model, first), dtype=np.float32)
            flatbuf.place_float16(model, where, values)
            flatbuf.dequantize_in_front(model, where)
        notes.append(f"{len(found)} float FULLY_CONNECTED weight(s) stored as float16")
    for kind, n in sorted(kinds.items()):
        notes.append(f"{n} layer(s) written as {kind} with the checkpoint's codes and scales")
    if any(k.startswith("int4") and "weight-only" in k for k in kinds):
        notes.append("int4 weight-only computes the checkpoint's result, but XNNPACK does not take dequantized int4 "
                     "as constant weights and repacks them at every call (SmolLM2-135M: a 512-token window 2.2x "
                     "the fp32 file's on 2 cores); --dynamic-range runs TFLite's int4 kernels instead (0.66x, "
                     "activations quantized to int8: +1.4% perplexity on SmolLM2)")
    if unfolded:
        notes.append(f"{unfolded} layer(s) had a preceding multiplication folded into their weights by the converter; "
                     "it is a MUL in front of them again, so their weights are the checkpoint's")
    if raised:
        notes.append(f"{raised} block scale(s) that are zero or subnormal in float16 raised to 2^-14 "
                     "(XNNPACK refuses them)")
    return notes


def set_metadata(model, meta: dict) -> None:
    """squeeze's metadata entry (JSON) on the graph ``model`` (ModelT), replacing an older one."""
    fb = flatbuf.schema()
    entry = fb.MetadataT()
    entry.name = METADATA_KEY.encode()
    entry.buffer = flatbuf.add_buffer(model, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    model.metadata = [m for m in (model.metadata or []) if m.name != entry.name] + [entry]


def add_metadata(raw: bytes, meta: dict) -> bytes:
    model = flatbuf.read(raw)
    set_metadata(model, meta)
    return flatbuf.write(model)


def check_codes(raw: bytes, twins: Twins) -> None:
    """Read the file back: every layer's integers and scales, and W8A8 input scales and zero points, must equal
    the checkpoint's."""
    graph = flatbuf.read(raw)
    held = flatbuf.read_int_weights(graph)
    inputs = flatbuf.read_input_quantization(graph)
    for name, quant in twins.inputs.items():
        if quant.static and inputs.get(name + ".weight") != (quant.scale, quant.zero_point):
            raise VerificationError(f"{name}: the file's input scale and zero point differ from the checkpoint's")
    for weight in twins.weights.values():
        got = held.get(weight.name)
        if got is None or not np.array_equal(got.levels, weight.levels):
            raise VerificationError(f"{weight.name}: the file's codes differ from the checkpoint's")
        safe, _ = flatbuf.safe_block_scales(weight.scales) if weight.bits == 4 else (weight.scales, 0)
        if not np.array_equal(got.scales.astype(np.float32), safe.astype(np.float32)):
            raise VerificationError(f"{weight.name}: the file's scales differ from the checkpoint's")


def export_tflite(src: Path, out: Path, config: TFLiteExport, overwrite: bool = False) -> Artifact:
    """Export the model directory ``src`` (float, or a squeeze checkpoint) to the .tflite file ``out``."""
    from squeeze import __version__

    require_litert()
    model, kind = load_token_model(src, "tflite")
    seq_len = token_length(model, kind, config.seq_len)
    reference = copy.deepcopy(model) if config.verify else None  # the checkpoint as loaded, before float_twins
    if config.kv_cache and kind != "causal-lm":
        raise SqueezeError("--kv-cache applies to causal LMs (prefill and decode signatures); this is an encoder")
    prefill = int(config.prefill_len or min(DEFAULT_PREFILL_LEN, max(1, seq_len // 2)))
    if config.kv_cache and prefill >= seq_len:
        raise SqueezeError(f"--prefill-len {prefill} leaves no room to decode in a cache of {seq_len} tokens "
                           "(--seq-len)")
    twins = float_twins(model, config.dynamic_range)
    eager_attention(model)
    module, args = graph_for(model, kind, seq_len)
    signatures = []
    if config.kv_cache:
        signatures = kv_signatures(copy.deepcopy(model), seq_len, prefill)  # the scoring graph keeps eager attention
    meta = {"kind": kind, "seq_len": seq_len, "vocab_size": int(model.config.vocab_size),
            "source": str(Path(src).resolve()), "version": __version__}
    if signatures:
        meta.update(signatures=[SCORING_SIGNATURE] + [name for name, _, _ in signatures], prefill_len=prefill)
    check = (TokenCheck(kind, int(model.config.vocab_size), seq_len, prefill if signatures else None,
                        text_tokens(src, seq_len + max(1, seq_len // 3)) if kind == "causal-lm" else None)
             if config.verify else None)
    return _write(module, args, twins, out, config, overwrite, meta, check, reference, signatures)


def export_module(module: nn.Module, example_inputs, out: str | Path, config: TFLiteExport | None = None,
                  overwrite: bool = False) -> Artifact:
    """Export a plain nn.Module (float or squeeze-quantized, e.g. a CNN) at its example inputs' shapes."""
    from squeeze import __version__
    from squeeze.fsutil import check_output_path

    require_litert()
    config = config or TFLiteExport()
    out = check_output_path(out, overwrite, kind="file", suffixes=(".tflite",))
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    reference = module.eval()
    model = copy.deepcopy(reference)
    twins = float_twins(model, config.dynamic_range)
    meta = {"kind": "module", "version": __version__}
    check = ModuleCheck(args) if config.verify else None
    return _write(model.eval(), args, twins, out, config, overwrite, meta, check, reference)


def _write(module, args, twins: Twins, out, config, overwrite, meta, check, reference, signatures=()) -> Artifact:
    from squeeze.fsutil import scratch_dir

    graph = flatbuf.read(convert(module, args, signatures))
    notes = place_weights(graph, twins, config)
    if twins.kept:
        reasons = sorted(set(twins.kept.values()))
        notes.append(f"{len(twins.kept)} layer(s) written as float32 (the exact values of their codes), TFLite "
                     f"cannot hold them as integers: {'; '.join(reasons)}")
    weights = twins.weights
    precision = _precision(twins, config)
    set_metadata(graph, {**meta, "precision": precision})
    raw = flatbuf.write(graph)
    check_codes(raw, twins)  # read back from the serialized bytes
    record = None
    with scratch_dir(out.parent, out.name) as tmp_dir:
        final = tmp_dir / out.name
        final.write_bytes(raw)
        if check is not None:
            exact = not weights and config.qtype == "fp32"
            weight_only = not config.dynamic_range and not twins.inputs
            record = check.run(final, reference, exact=exact or (weight_only and config.qtype == "fp32"))
        if out.exists() and not overwrite:
            raise SqueezeError(f"output {str(out)!r} appeared while writing; pass --overwrite to replace it")
        os.replace(final, out)
    return Artifact(out, "tflite", precision, out.stat().st_size, record, notes)


def _precision(twins: Twins, config: TFLiteExport) -> str:
    bits = sorted({w.bits for w in twins.weights.values()})
    if not bits:
        return config.qtype
    if any(q.static for q in twins.inputs.values()):
        return "w8a8"
    dynamic = config.dynamic_range or bool(twins.inputs)
    return "+".join(f"int{b}" for b in bits) + ("-dynamic" if dynamic else "")


def text_tokens(src: Path, n: int) -> torch.Tensor | None:
    """``n`` tokens of the bundled calibration text in the model's tokenizer (None without a tokenizer or text).

    A causal LM is verified on text: on random tokens its predictions are near ties, and TFLite's dynamic-range
    kernels (int8 activations per row) flip them. SmolLM2-135M GPTQ w4g32 in LiteRT
    agrees with torch on 74.5% of random tokens and 94.1% of text tokens, at 1.4% higher perplexity."""
    from squeeze.model import load_tokenizer
    from squeeze.resources import default_calibration_text

    try:
        ids = load_tokenizer(src)(default_calibration_text().read_text()[: 40 * n])["input_ids"]
    except Exception:  # no tokenizer in the directory: random tokens
        return None
    return torch.tensor(ids[:n])[None] if len(ids) >= n else None


class TokenCheck:
    """Token windows of the graph's length (the bundled text for causal LMs, else seeded random tokens) through
    the interpreter and through torch; with ``prefill_len``, also the prefill and decode signatures: a window's
    first ``prefill_len`` tokens prefilled into the cache, then the next tokens decoded one by one, each step's
    logits against torch's at that position."""

    decode_steps = 8

    def __init__(self, kind: str, vocab_size: int, seq_len: int, prefill_len: int | None = None,
                 tokens: torch.Tensor | None = None):
        self.kind, self.vocab_size, self.seq_len, self.prefill_len = kind, vocab_size, seq_len, prefill_len
        self.tokens = tokens

    def run(self, path: Path, reference: nn.Module, exact: bool) -> dict:
        from squeeze.eval.tflite import TFLiteRuntime
        from squeeze.exporters.onnx.verify import compare

        gen = torch.Generator().manual_seed(0)
        lengths = (self.seq_len, max(1, self.seq_len // 3))
        if self.tokens is not None:
            windows = [self.tokens[:, :lengths[0]], self.tokens[:, lengths[0]:lengths[0] + lengths[1]]]
        else:
            windows = [torch.randint(0, self.vocab_size, (1, n), generator=gen) for n in lengths]
        runtime = TFLiteRuntime.from_path(path)
        got = [runtime.logits(w) if self.kind == "causal-lm" else runtime.hidden(w) for w in windows]
        steps = 0
        if self.prefill_len is not None:  # prefill positions 0..P-1, then decode P, P+1, ... one token each
            steps = min(self.decode_steps, self.seq_len - self.prefill_len)
            decoded = runtime.prefill_decode(windows[0][:, :self.prefill_len + steps], self.prefill_len)
        del runtime
        with torch.no_grad():
            refs = [reference(input_ids=w, attention_mask=torch.ones_like(w)) for w in windows]
        refs = [(r.logits if self.kind == "causal-lm" else r.last_hidden_state).float() for r in refs]
        pairs = list(zip(got, refs))
        if steps:
            pairs.append((decoded, refs[0][:, self.prefill_len:self.prefill_len + steps]))
        record = compare(pairs, exact, logits=self.kind == "causal-lm", runtime="litert")
        if steps:
            record["decode_steps_checked"] = steps
        return record


class ModuleCheck:
    """The module's example inputs through the interpreter and through torch."""

    def __init__(self, args: tuple):
        self.args = args

    def run(self, path: Path, reference: nn.Module, exact: bool) -> dict:
        from squeeze.eval.tflite import TFLiteRuntime
        from squeeze.exporters.onnx.verify import compare

        runtime = TFLiteRuntime.from_path(path)
        got = list(runtime.run({n: a.detach().numpy() for n, a in zip(runtime.input_names, self.args)}).values())
        with torch.no_grad():
            ref = reference(*self.args)
        refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        return compare([(torch.from_numpy(np.asarray(g, np.float32)), r.float()) for g, r in zip(got, refs)], exact,
                       logits=False, runtime="litert")
