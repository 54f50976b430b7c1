"""Public entry points. The CLI calls only these.

    model = squeeze.load("model/")
    squeeze.quantize(model, squeeze.RTN(scheme=squeeze.get_scheme("w4g32-asym")))
    squeeze.save(model, "model-w4/", source="model/")
    squeeze.evaluate("model-w4/", data="text.txt", reference="model/")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from squeeze.calib import SELF, CalibConfig, CalibrationSet, load_calibration, read_text, tokenize_stream
from squeeze.checkpoint import gptq as ckpt
from squeeze.checkpoint.record import TRAINING_RECORD, checkpoint_metadata, checkpoint_scheme, keeps_float, layer_record
from squeeze.checkpoint.shards import shard_limit
from squeeze.errors import SqueezeError
from squeeze.exporters import OUTPUT_SUFFIXES, Artifact, get_exporter
from squeeze.eval.evaluate import EvalResult, choose_context, evaluate_tokens
from squeeze.eval.runtimes import TorchRuntime, open_runtime
from squeeze.fsutil import atomic_output_dir, check_output_path
from squeeze.model import (LOAD_ERRORS, auto_class_for, check_finite_files, load_hf_config, load_pretrained,
                           nonfinite_tensors, refuse_nonfinite, validate_model_dir)
from squeeze.modules import QuantLinear
from squeeze.recipe import Recipe
from squeeze.registry import pass_for_config
from squeeze.sources import as_model_dir, is_gguf, load_gguf_model, source_hash, source_tokenizer, validate_source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_recipe(config) -> Recipe:
    return config if isinstance(config, Recipe) else Recipe((config,))


def quantize(model: nn.Module, config, calib: CalibrationSet | None = None, *, teachers: dict | None = None
             ) -> dict[str, dict]:
    """Apply a pass config (or a Recipe of them) to ``model`` in place; returns per-layer records.

    Passes that train (`Distill`, `QAT`) learn from a teacher: the model as it is now (before any pass of the
    recipe), or the model their ``teacher`` names. Its targets are computed before the first pass runs and
    read from disk while training (``teachers``: already computed, by recipe position). The training logs
    come back under the key ``"<training>"``.
    """
    recipe = _as_recipe(config)
    for pass_config in recipe.passes:
        entry = pass_for_config(pass_config)
        if entry.needs_calibration(pass_config) and calib is None:
            raise SqueezeError(f"method {entry.name!r} with this scheme needs calibration data")
    teachers = teacher_targets(recipe, calib, model, known=teachers)
    records: dict[str, dict] = {}
    for i, pass_config in enumerate(recipe.passes):
        entry = pass_for_config(pass_config)
        if getattr(pass_config, "trains", False):
            out = entry.apply(model, pass_config, calib, teacher=teachers[i], records=records)
        else:
            with torch.no_grad():
                out = entry.apply(model, pass_config, calib)
        for name, rec in out.items():
            if name == TRAINING_RECORD:
                records.setdefault(TRAINING_RECORD, []).append({"method": entry.name, **rec})
            else:
                records[name] = layer_record(records.get(name), entry.name, pass_config, rec)
    return records


def teacher_targets(recipe, calib: CalibrationSet | None, model: nn.Module | None = None,
                    known: dict | None = None) -> dict:
    """The teacher's targets (`squeeze.passes.distill_core.TeacherTargets`) for every training pass of the
    recipe, by position (``known`` ones kept): computed from ``model`` as it is now, or from the pass's
    ``teacher`` path (loaded, scored and dropped), or read from the cache when the same teacher already scored
    the same tokens. Without ``model``, passes whose teacher is the model itself are left out."""
    from squeeze.passes.distill import work_dir
    from squeeze.passes.distill_core import compute_targets, model_fingerprint, open_targets, targets_key

    out, own_id = dict(known or {}), None
    for i, p in enumerate(_as_recipe(recipe).passes):
        if not getattr(p, "trains", False) or i in out or (p.teacher is None and model is None):
            continue
        if calib is None:
            raise SqueezeError(f"method {pass_for_config(p).name!r} trains: it needs data (--calib FILE or self)")
        if p.teacher is None:
            own_id = own_id or model_fingerprint(model)
            teacher_id = own_id
        else:
            teacher_id = source_hash(validate_source(p.teacher))
        top_k, layers, temperature = p.target_spec()
        root, key = work_dir(p) / "teacher", targets_key(teacher_id, calib.input_ids, top_k, layers, temperature)
        found = open_targets(root, key)
        if found is None:
            teacher = model if p.teacher is None else load(p.teacher)
            found = compute_targets(teacher, calib.input_ids, root, key, top_k, layers, temperature)
            del teacher
        out[i] = found
    return out


def prune(model: nn.Module, config, calib: CalibrationSet | None = None) -> dict[str, dict]:
    """Prune ``model`` in place with a pruning pass config (`Magnitude`, `Wanda`, `SparseGPT`, or `Structured`,
    which rewrites its modules and config to smaller sizes) or a Recipe; returns records per layer (sparsity,
    weight error) or, for `Structured`, per original block. The same as `quantize`, named for what it does."""
    return quantize(model, config, calib)


def _reshapes(recipe: Recipe) -> bool:
    """The recipe changes the model's shapes (structured pruning): its config comes from the model."""
    return any(getattr(p, "reshapes", False) for p in recipe.passes)


def _resolve_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise SqueezeError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load(path: str | Path, dtype: str | None = None, allow_pickle: bool = False) -> nn.Module:
    """Load a model: a float Hugging Face directory, a squeeze/GPTQ quantized checkpoint, or a GGUF file
    (dequantized by transformers, float32 unless ``dtype`` says otherwise). NaN/Inf weights are refused;
    pickle-only weights (.bin) load only with ``allow_pickle`` (then with torch.load(weights_only=True))."""
    model = _load_unchecked(path, dtype, allow_pickle)
    refuse_nonfinite(nonfinite_tensors(model.state_dict().items()), str(path))
    return model


def _load_unchecked(path: str | Path, dtype: str | None, allow_pickle: bool) -> nn.Module:
    if is_gguf(path):
        return load_gguf_model(Path(path), _resolve_dtype(dtype))
    p = validate_model_dir(path, allow_pickle)
    config = json.loads((p / "config.json").read_text())
    if "quantization_config" not in config:
        return load_pretrained(p, _resolve_dtype(dtype))
    from transformers.initialization import no_init_weights

    try:
        scheme = ckpt.scheme_from_quantization_config(config["quantization_config"])
    except (SqueezeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise SqueezeError(f"{str(p / 'config.json')!r}: quantization_config: {e}") from None
    layer_schemes = ckpt.read_layer_schemes(p)
    hf_config = load_hf_config(p)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    torch_dtype = _resolve_dtype(dtype) or getattr(hf_config, "dtype", None) or torch.float32
    if not isinstance(torch_dtype, torch.dtype):
        torch_dtype = DTYPES.get(str(torch_dtype), torch.float32)
    try:
        with no_init_weights():
            model = auto_class_for(hf_config).from_config(hf_config, dtype=torch_dtype)
    except LOAD_ERRORS as e:
        raise SqueezeError(f"cannot build the model {str(p / 'config.json')!r} describes: {e}") from None
    return ckpt.load_into(model, p, scheme, layer_schemes)


def save(
    model: nn.Module,
    out: str | Path,
    recipe=None,
    *,
    source: str | Path | None = None,
    calib: CalibrationSet | None = None,
    records: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a quantized model as a GPTQ-layout checkpoint directory, atomically (in shards of at most
    ``max_shard_size``, e.g. "2GB"; default 5GB)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    passes = _as_recipe(recipe).passes if recipe is not None else ()
    if not layers and not (passes and all(keeps_float(p) for p in passes)):
        raise SqueezeError("the model has no quantized layers to save; run squeeze.quantize first")
    layer_schemes = {n: m.scheme for n, m in layers.items()}
    scheme = checkpoint_scheme(layer_schemes, passes) if layers else None  # None: pruned, float
    shard_bytes = shard_limit(max_shard_size)
    source_path = Path(source) if source is not None else None
    recipe_dict = _as_recipe(recipe).to_dict() if recipe is not None else None
    metadata = checkpoint_metadata(scheme, layer_schemes, records, recipe_dict, calib, source_path,
                                   source_hash(source_path) if source_path else None)
    target = check_output_path(out, overwrite, inputs=(source_path,))
    with atomic_output_dir(target, overwrite) as tmp:
        desc_act = not all(m.has_ordered_groups() for m in layers.values())  # act-order without static groups
        from_gguf = source_path is not None and is_gguf(source_path)
        source_dir = None if from_gguf else source_path
        reshaped = recipe is not None and _reshapes(_as_recipe(recipe))
        config = ckpt.checkpoint_config(model, None if reshaped else source_dir, scheme, layer_schemes, desc_act)
        ckpt.write_checkpoint(tmp, ckpt.checkpoint_state(model).items(), config, metadata, source_dir, shard_bytes)
        if from_gguf:  # the GGUF file's own tokenizer, written as Hugging Face files
            source_tokenizer(source_path).save_pretrained(tmp)
    return target


def quantize_dir(
    model_path: str | Path,
    out: str | Path,
    config,
    calib: CalibConfig | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    *,
    max_shard_size: str | int | None = None,
    resume: str = "auto",
    offload_activations: str | Path | None = None,
    notify=None,
) -> Path:
    """Quantize a model directory (or GGUF file) with ``config`` and write the checkpoint to ``out``.

    A directory of safetensors weights is quantized one transformer block at a time (`squeeze.stream`):
    memory grows with one block, not the model, and ``resume`` ("auto": when an interrupted run of the same
    inputs left its journal; "require"; "never") continues a killed run. Other sources load whole.
    ``offload_activations``: a directory to keep the calibration activations in (else memory, or the
    temporary output once they would take a quarter of the available memory).
    ``notify(message)`` hears what the user should know (resuming, loading whole and why).
    """
    from squeeze.stream import RESUME_MODES, StreamUnavailable, quantize_streamed

    if resume not in RESUME_MODES:
        raise SqueezeError(f"resume must be one of {', '.join(RESUME_MODES)}, got {resume!r}")
    notify = notify or (lambda message: None)
    shard_bytes = shard_limit(max_shard_size)
    src = validate_source(model_path, allow_pickle)
    calib = calib or CalibConfig()
    check_output_path(out, overwrite, inputs=(src, None if calib.path == SELF else calib.path))
    recipe = _as_recipe(config)
    needs_calibration = any(pass_for_config(p).needs_calibration(p) for p in recipe.passes)
    calib_set = None
    if needs_calibration and calib.path != SELF:  # a bad calibration file is reported before the model loads
        calib_set = load_calibration(source_tokenizer(src), calib)
    if _reshapes(recipe) and len(recipe.passes) == 1 and not is_gguf(src) and \
            (calib_set is not None or not needs_calibration):
        from squeeze.passes.structured import prune_dir

        try:
            return prune_dir(src, Path(out), recipe.passes[0], calib_set, overwrite, shard_bytes)
        except StreamUnavailable as e:
            notify(f"loading {str(src)!r} whole: {e}")
    elif not is_gguf(src) and not any(getattr(p, "trains", False) for p in recipe.passes) and \
            (calib_set is not None or not needs_calibration):  # training updates every block together
        try:
            return quantize_streamed(src, Path(out), recipe, calib_set, _resolve_dtype(dtype), overwrite, resume,
                                     shard_bytes, notify, offload_activations)
        except StreamUnavailable as e:
            notify(f"loading {str(src)!r} whole: {e}")
    if resume == "require":
        raise SqueezeError("--resume needs a model directory of safetensors weights quantized block by block")
    # a teacher named by path is scored before the student loads: the two are never in memory together
    named = [p.teacher for p in recipe.passes if getattr(p, "teacher", None) is not None]
    if named and calib_set is None and calib.path == SELF:  # data sampled from the teacher, not the student
        teacher = load(named[0], dtype, allow_pickle)
        calib_set = load_calibration(source_tokenizer(validate_source(named[0])), calib, model=teacher)
        del teacher
    early = teacher_targets(recipe, calib_set) if calib_set is not None else {}
    model = load(src, dtype, allow_pickle)
    if needs_calibration and calib_set is None:
        calib_set = load_calibration(source_tokenizer(src), calib, model=model)
    teachers = teacher_targets(recipe, calib_set, model, known=early)
    records = quantize(model, recipe, calib_set, teachers=teachers)
    return save(model, out, recipe, source=src, calib=calib_set, records=records, overwrite=overwrite,
                max_shard_size=shard_bytes)


def export(model: str | Path, fmt: str, output: str | Path, overwrite: bool = False, allow_pickle: bool = False,
           **options) -> Artifact:
    """Export the model directory ``model`` to ``fmt`` at ``output``; options go to that format's config.

    Options left at None are the format's defaults; an option the format does not take is an error.
    ``allow_pickle``: see squeeze.load (pickle-only weights are read into a temporary safetensors copy).
    """
    from dataclasses import fields

    export_fn, config_cls = get_exporter(fmt)
    known = {f.name for f in fields(config_cls)}
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    unknown = sorted(set(given) - known)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise SqueezeError(f"{flags} does not apply to --to {fmt}")
    config = config_cls(**{k: v for k, v in options.items() if k in known and v is not None})
    src = Path(model)
    if not src.exists():
        raise SqueezeError(f"model path {str(src)!r} does not exist")
    kind = "dir" if fmt == "coreml" else "file"  # an .mlpackage is a directory
    out = check_output_path(output, overwrite, kind=kind, inputs=(src,), suffixes=OUTPUT_SUFFIXES[fmt])
    if not is_gguf(src):  # a GGUF input is checked as it is dequantized (squeeze.load), pickles as they load
        check_finite_files(validate_model_dir(src, allow_pickle))
    if is_gguf(src) and getattr(config_cls, "reads_gguf", False):
        return export_fn(src, out, config, overwrite)
    # a GGUF input is dequantized, pickle weights are loaded, into a temporary safetensors directory
    with as_model_dir(src, out.parent, allow_pickle) as model_dir:
        return export_fn(model_dir, out, config, overwrite)


def _open(model, runtime: str | None = None, allow_pickle: bool = False):
    """A runtime for an nn.Module or an artifact path (an already opened runtime is returned as is)."""
    if hasattr(model, "logits") and not isinstance(model, nn.Module):
        return model
    if isinstance(model, nn.Module):
        size = sum(t.numel() * t.element_size() for t in ckpt.checkpoint_state(model).values())
        return TorchRuntime(model, size_bytes=size)
    return open_runtime(model, runtime, allow_pickle)


def _tokenizer_for(tokenizer, *runtimes):
    for candidate in (tokenizer, *(rt.tokenizer for rt in runtimes if rt is not None)):
        if candidate is not None:
            return candidate
    raise SqueezeError("evaluation needs a tokenizer: the model has none; pass --reference (or tokenizer=...)")


def evaluate(
    model: str | Path | nn.Module,
    data: str | Path,
    reference: str | Path | nn.Module | None = None,
    ctx: int | None = None,
    tokenizer=None,
    runtime: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of ``model`` on the text in ``data``; with ``reference``, also KLD and top-1 agreement.

    ``model`` is an nn.Module or an artifact path (model directory, .gguf, ...) run by the
    runtime that fits it (``runtime`` forces one). Every runtime sees the same tokens: those of
    ``tokenizer``, else the model directory's, else the reference directory's.
    """
    rt = _open(model, runtime)
    ref_rt = _open(reference) if reference is not None else None
    tokenizer = _tokenizer_for(tokenizer, rt, ref_rt)
    if ref_rt is not None and ref_rt.vocab_size != rt.vocab_size:
        raise SqueezeError(f"reference vocabulary ({ref_rt.vocab_size}) differs from the model's ({rt.vocab_size})")
    ctx = choose_context(rt, ctx)
    if ctx < 2:
        raise SqueezeError(f"--ctx must be at least 2, got {ctx}")
    if rt.max_context and ctx > rt.max_context:  # positions beyond the trained ones score garbage, slowly
        raise SqueezeError(f"--ctx {ctx} is beyond the model's {rt.max_context} positions; pass --ctx "
                           f"{rt.max_context} or less")
    tokens = tokenize_stream(tokenizer, read_text(data))
    if len(tokens) < 2:
        raise SqueezeError(f"{str(data)!r} holds fewer than 2 tokens; nothing to score")
    result = evaluate_tokens(rt, tokens, ctx, ref_rt, rt.size_bytes, progress)
    if not math.isfinite(result.ppl):
        raise SqueezeError(f"{_name(model)!r} gave non-finite logits (ppl {result.ppl}) on {str(data)!r}: its "
                           "weights hold NaN/Inf or its arithmetic overflows")
    return result


def _name(model) -> str:
    """A path naming ``model`` for messages (runtimes of files keep theirs)."""
    if isinstance(model, (str, Path)):
        return str(model)
    path = getattr(model, "path", None)
    return str(path) if path is not None else "the model"


def is_encoder(rt) -> bool:
    """An encoder (sentence embeddings), not a causal LM with logits: a Hugging Face model that cannot generate."""
    if hasattr(rt, "kind"):  # onnxruntime records the kind the exporter saw
        return rt.kind == "encoder"
    model = getattr(rt, "model", None)
    return getattr(model, "config", None) is not None and hasattr(model, "can_generate") and not model.can_generate()


def evaluate_encoder(model, data: str | Path, reference, tokenizer=None, runtime: str | None = None):
    """Mean cosine of ``model``'s sentence embeddings against ``reference``'s on the sentences of ``data``."""
    from squeeze.eval.embeddings import evaluate_embeddings

    if reference is None:
        raise SqueezeError("an encoder is evaluated against its original: pass --reference")
    rt, ref_rt = _open(model, runtime), _open(reference)
    result = evaluate_embeddings(rt, ref_rt, _tokenizer_for(tokenizer, rt, ref_rt), read_text(data))
    result.size_bytes = rt.size_bytes
    return result


def evaluate_task(
    model: str | Path | nn.Module, task: str | Path, tokenizer=None, runtime: str | None = None, progress: bool = True
):
    """Multiple-choice accuracy of ``model`` on a JSONL task file ({context, choices, label} per line),
    or on the items load_multiple_choice read from one."""
    from squeeze.eval.tasks import evaluate_multiple_choice, load_multiple_choice

    items = task if isinstance(task, list) else load_multiple_choice(task)
    rt = _open(model, runtime)
    return evaluate_multiple_choice(rt, _tokenizer_for(tokenizer, rt), items, progress)


def measure_speed(model: str | Path | nn.Module, runtime: str | None = None, **settings) -> dict:
    """Latency and throughput of ``model`` in its runtime (settings: batch, prompt_tokens, new_tokens, warmup, runs)."""
    from squeeze.eval.device import describe_device
    from squeeze.eval.latency import measure_lm_throughput, peak_rss_bytes

    rt = _open(model, runtime)
    stats = measure_lm_throughput(rt, **settings).to_dict()
    return {**stats, "runtime": rt.name, "peak_rss_bytes": peak_rss_bytes(), "device": describe_device()}


# Keys of `squeeze eval --json`: the same on every runtime (null where not measured).
EVAL_JSON_KEYS = (
    "ppl", "kld", "top1_agreement", "tokens", "windows", "ctx", "size_bytes", "runtime", "seconds",
    "embedding_cosine_mean", "embedding_cosine_min", "sentences", "accuracy", "samples",
    "task_accuracy", "task_accuracy_norm", "task_items",
    "p50_ms", "p95_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "latency_settings",
    "device", "model", "data", "reference",
)


def eval_report(
    model: str | Path,
    data: str | Path,
    reference: str | Path | None = None,
    ctx: int | None = None,
    tokenizer=None,
    runtime: str | None = None,
    task: str | Path | None = None,
    latency: bool | dict = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> dict:
    """Everything `squeeze eval` reports, as one flat dict with the keys of EVAL_JSON_KEYS.

    The artifact is opened once; ``latency`` is True or the settings of measure_speed; ``allow_pickle``
    lets pickle-only model directories load (with torch.load(weights_only=True)).
    """
    from squeeze.eval.device import describe_device
    from squeeze.eval.tasks import load_multiple_choice

    items = load_multiple_choice(task) if task is not None else None  # bad task or text files fail before any work
    if Path(data).suffix.lower() != ".npz":  # classifier inputs are .npz arrays, everything else is text
        read_text(data)
    out = dict.fromkeys(EVAL_JSON_KEYS)
    rt = _open(model, runtime, allow_pickle)
    ref_rt = _open(reference, allow_pickle=allow_pickle) if reference is not None else None
    if getattr(rt, "kind", None) == "module":  # a plain-module graph: a classifier on .npz inputs
        from squeeze.eval.classify import evaluate_classifier

        out.update(evaluate_classifier(rt, ref_rt, data).to_dict(), runtime=rt.name)
    elif is_encoder(rt):
        out.update(evaluate_encoder(rt, data, ref_rt, tokenizer=tokenizer).to_dict())
        out.update(runtime=rt.name)
    else:
        out.update(evaluate(rt, data, reference=ref_rt, ctx=ctx, tokenizer=tokenizer, progress=progress).to_dict())
    if task is not None:
        if tokenizer is None and rt.tokenizer is None and reference is not None:
            tokenizer = source_tokenizer(Path(reference))
        t = evaluate_task(rt, items, tokenizer=tokenizer, progress=progress)
        out.update(task_accuracy=t.accuracy, task_accuracy_norm=t.accuracy_norm, task_items=t.items)
    if latency:
        speed = measure_speed(rt, **(latency if isinstance(latency, dict) else {}))
        out.update(
            p50_ms=speed["forward"]["p50_ms"], p95_ms=speed["forward"]["p95_ms"],
            prefill_tokens_per_s=speed["prefill_tokens_per_s"], decode_tokens_per_s=speed["decode_tokens_per_s"],
            peak_rss_bytes=speed["peak_rss_bytes"],
            latency_settings={k: speed[k] for k in ("batch", "prompt_tokens", "new_tokens")},
        )
    out.update(device=describe_device(), model=str(model), data=str(data),
               reference=str(reference) if reference is not None else None)
    return out
