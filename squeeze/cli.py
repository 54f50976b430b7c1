"""The `squeeze` command: flags -> config objects -> squeeze.api.

Bad input is reported as one line on stderr with exit code 2; nothing is
written unless the command completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from squeeze.errors import SqueezeError, VerificationError

METHODS = ("rtn", "gptq", "awq", "smoothquant", "qat")  # the registered passes the CLI exposes (see squeeze.registry)
# Flags that only some methods take: flag -> the config field it sets, per method.
METHOD_FLAGS: dict[str, tuple[str, ...]] = {
    "gptq": ("damp", "block_size", "act_order", "static_groups", "token_cap", "weighted_fit", "shrink",
             "float_target", "uncapped_fit", "calib_precision"),
    "awq": ("token_cap", "shrink", "weighted_fit", "clip", "calib_precision"),
    "smoothquant": ("alpha",),
}
# Training flags (quantize --method qat, distill): flag -> TrainingOptions field
TRAINING_FLAGS: dict[str, str] = {
    "teacher": "teacher", "steps": "steps", "lr": "lr", "grid_lr": "grid_lr", "train_batch_size": "batch_size", "grad_accum": "grad_accum",
    "warmup": "warmup", "weight_decay": "weight_decay", "clip_grad": "clip", "train_precision": "precision",
    "temperature": "temperature", "top_k": "top_k", "ce_weight": "ce_weight", "hidden_layers": "hidden_layers",
    "hidden_weight": "hidden_weight", "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "holdout": "holdout", "work_dir": "work_dir", "train_device": "device",
}
METHOD_FLAGS["qat"] = ("init", "learn_scales", *TRAINING_FLAGS.values())


def training_options(command):
    """The flags of the training passes (squeeze.passes.distill.TrainingOptions; defaults there)."""
    options = [
        click.option("--teacher", default=None,
                     help="Teacher model (directory or GGUF) [distill: required; qat: the model before quantization]."),
        click.option("--steps", type=int, default=None, help="Optimizer steps [200]."),
        click.option("--lr", type=float, default=None,
                     help="Peak learning rate of float parameters (AdamW; warmup, then cosine) [1e-5]."),
        click.option("--grid-lr", type=float, default=None,
                     help="Peak learning rate of quantized weights, in steps of their grid [0.02]."),
        click.option("--train-batch-size", type=int, default=None, help="Sequences per micro-batch [4]."),
        click.option("--grad-accum", type=int, default=None, help="Micro-batches per step [1]."),
        click.option("--warmup", type=int, default=None, help="Warmup steps [10]."),
        click.option("--weight-decay", type=float, default=None, help="AdamW weight decay [0]."),
        click.option("--clip-grad", type=float, default=None, help="Gradient norm limit, 0 for none [1]."),
        click.option("--train-precision", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="Forward arithmetic while training (bfloat16: autocast) [float32]."),
        click.option("--temperature", type=float, default=None, help="Distillation temperature [1]."),
        click.option("--top-k", type=int, default=None, help="Teacher logits kept per token, cached on disk [128]."),
        click.option("--ce-weight", type=float, default=None, help="Weight of the data's cross-entropy in the loss [0]."),
        click.option("--hidden-layers", default=None,
                     help="Hidden states also matched (MSE), comma-separated: 0 the embeddings, i block i's output."),
        click.option("--hidden-weight", type=float, default=None, help="Weight of the hidden-state loss [1]."),
        click.option("--eval-every", type=int, default=None, help="Score the held-out windows every N steps [a tenth of --steps]."),
        click.option("--checkpoint-every", type=int, default=None,
                     help="Save the training state every N steps; a killed run resumes from it [50]."),
        click.option("--holdout", type=int, default=None, help="Data windows kept out of training and scored; the best-scoring state is kept [8]."),
        click.option("--train-device", default=None,
                     help="Device to train on (cpu, cuda, cuda:1) [where the model is loaded: the CPU]."),
        click.option("--work-dir", default=None,
                     help="Teacher targets and training state [$SQUEEZE_CACHE or ~/.cache/squeeze, train/]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _training_kwargs(given: dict) -> dict:
    """TrainingOptions fields from the training flags that were given."""
    out = {TRAINING_FLAGS[k]: v for k, v in given.items() if k in TRAINING_FLAGS and v is not None}
    if "hidden_layers" in out:
        try:
            out["hidden_layers"] = tuple(int(x) for x in out["hidden_layers"].split(",") if x.strip())
        except ValueError:
            raise SqueezeError(f"--hidden-layers takes comma-separated block numbers, got {given['hidden_layers']!r}") \
                from None
    return out
# quantize, eval and export: the one way to load pickle weights (see README, "What squeeze reads")
ALLOW_PICKLE = click.option(
    "--allow-pickle", is_flag=True,
    help="Load pickle weights (.bin/.pt) when a model directory has no safetensors (torch.load with "
         "weights_only=True); refused without it, since unpickling can run code.")
# Scheme defaults per method when neither --scheme nor the flag is given: (bits, granularity, act).
METHOD_SCHEME_DEFAULTS: dict[str, tuple[int, str, str]] = {"smoothquant": (8, "channel", "static")}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="squeeze-quant")
def cli() -> None:
    """squeeze: quantize models, export them, and prove they still work."""


def _scheme_from_flags(scheme, bits, group_size, granularity, asym, act, act_observer, act_asym=False):
    from squeeze.scheme import ActScheme, QuantScheme, get_scheme

    if scheme is not None:
        return get_scheme(scheme)
    if granularity != "group" and group_size is not None:
        raise SqueezeError(f"--group-size applies only to --granularity group, not {granularity!r}")
    if act == "none" and act_asym:
        raise SqueezeError("--act-asym applies to quantized activations; add --act static (or dynamic)")
    activations = None if act == "none" else ActScheme(mode=act, observer=act_observer, symmetric=not act_asym)
    gs = (128 if group_size is None else group_size) if granularity == "group" else None
    return QuantScheme(bits=bits, symmetric=not asym, granularity=granularity, group_size=gs, activations=activations)


def _method_options(method: str, given: dict) -> dict:
    """The method-specific flags that were given, checked against the method (e.g. --damp is GPTQ's)."""
    options = {k: v for k, v in given.items() if v is not None}
    for key in options:
        if key not in METHOD_FLAGS.get(method, ()):
            owners = [m for m, keys in METHOD_FLAGS.items() if key in keys]
            raise SqueezeError(f"--{key.replace('_', '-')} applies only to --method {' / '.join(owners)}, not {method!r}")
    return options


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output checkpoint directory.")
@click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True, help="Quantization method.")
@click.option("--scheme", default=None, help="Named scheme: a preset (w4g128, w4g32-asym, w8a8), a GGUF type (q4_0, q4_k, q6_k) or a GGUF mix (q4_k_m: each layer on the type llama.cpp's mix gives it); overrides --bits etc.")
@click.option("--bits", type=int, default=None, help="Weight bits, 2-8 [default: 4; smoothquant: 8].")
@click.option("--group-size", type=int, default=None, help="Columns per quantization group [default: 128].")
@click.option("--granularity", type=click.Choice(["group", "channel", "tensor"]), default=None,
              help="[default: group; smoothquant: channel]")
@click.option("--asym", is_flag=True, help="Asymmetric grid (zero point) instead of symmetric.")
@click.option("--act", type=click.Choice(["none", "static", "dynamic"]), default=None,
              help="int8 activations: static per-tensor (calibrated) or dynamic per-token [default: none; "
                   "smoothquant: static].")
@click.option("--act-observer", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True)
@click.option("--act-asym", is_flag=True,
              help="Asymmetric activations: uint8 with a calibrated zero point (scheme suffix -azp) instead of "
                   "symmetric int8.")
@click.option("--targets", multiple=True, help="Layers to quantize (glob, suffix, or re:REGEX); repeatable.")
@click.option("--ignore", multiple=True, help="Layers to keep in float (same patterns); repeatable.")
@click.option("--calib", default=None,
              help="Calibration text (.txt or .jsonl with a 'text' field), or 'self' to sample it from the model "
                   "[default: bundled corpus].")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="gptq/awq: arithmetic of the calibration forwards; statistics and solver stay float32 "
                   "(auto: bfloat16 matmuls for a float32 model where the CPU has them natively, else float32) "
                   "[gptq auto, awq float32].")
@click.option("--damp", type=float, default=None, help="gptq: dampening, a fraction of the mean Hessian diagonal [0.01].")
@click.option("--block-size", type=int, default=None, help="gptq: columns per lazy-batch update [128].")
@click.option("--act-order/--no-act-order", default=None,
              help="gptq: quantize columns in order of decreasing Hessian diagonal.")
@click.option("--static-groups/--no-static-groups", default=None,
              help="gptq: fit group scales on the original weight before the updates (contiguous groups).")
@click.option("--token-cap", type=float, default=None,
              help="gptq/awq: a calibration token counts with at most this many times the median token's input "
                   "energy (attention sinks); 0 counts every token as it is [gptq 100, awq 0].")
@click.option("--weighted-fit/--no-weighted-fit", default=None,
              help="gptq/awq: choose group scales by Hessian-diagonal-weighted error instead of min-max [on].")
@click.option("--uncapped-fit/--capped-fit", default=None,
              help="gptq: the weighted fit weighs columns by every token's input energy, uncapped (llama-imatrix's "
                   "statistic) [uncapped on GGUF grids, capped on integer grids].")
@click.option("--clip/--no-clip", default=None,
              help="awq: search per-group clipping ranges on the output error (redundant with the weighted fit "
                   "when --shrink is 1) [off].")
@click.option("--shrink", type=float, default=None,
              help="gptq/awq: trust the calibration inputs' correlations only in part: the Hessian is shrunk "
                   "towards its diagonal by this fraction in [0, 1] (gptq: 1 is importance-weighted rounding "
                   "without error updates) [gptq 0.5, awq 1].")
@click.option("--float-target/--no-float-target", default=None,
              help="gptq: match the float model's outputs, not the float layer's on already-quantized inputs.")
@click.option("--alpha", type=float, default=None, help="smoothquant: migration strength in [0, 1] [0.5].")
@click.option("--init", type=click.Choice(["gptq", "rtn", "awq"]), default=None,
              help="qat: the pass that puts the weights on the grid before training [gptq].")
@click.option("--learn-scales/--fixed-scales", default=None,
              help="qat: train the group scales (zero points, block mins) too, LSQ-style, on the grid the format stores "
                   "them on (float16; K-quants: integer sub-block scales under the fixed super-block scale).")
@training_options
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe (overrides method/scheme flags).")
@click.option("--max-shard-size", default=None,
              help="Largest weight file of the checkpoint (e.g. 2GB); more are written as shards with an index [5GB].")
@click.option("--resume/--no-resume", default=None,
              help="Continue an interrupted run of the same command (default: whenever one is found); --resume "
                   "fails if there is none, --no-resume starts over.")
@click.option("--offload-activations", type=click.Path(path_type=Path), default=None,
              help="Keep the calibration activations in this directory, not in memory (by default they go to disk "
                   "on their own once they would take a quarter of the available memory).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Calibrate with this many processes (torch.distributed, gloo on CPUs, NCCL on GPUs), each "
                   "running its share of the calibration batches: `torchrun --nproc-per-node N -m squeeze quantize`.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@ALLOW_PICKLE
@click.pass_context
def quantize(ctx, model, output, method, scheme, bits, group_size, granularity, asym, act, act_observer, act_asym, targets,
             ignore, calib, nsamples, seqlen, seed, calib_precision, damp, block_size, act_order, static_groups, token_cap, weighted_fit,
             uncapped_fit, clip, shrink, float_target, alpha, init, learn_scales, dtype, recipe, max_shard_size, resume,
             offload_activations, workers, overwrite, allow_pickle, **training) -> int | None:
    """Quantize MODEL (a Hugging Face model directory or a GGUF file) into a checkpoint at OUTPUT."""
    from squeeze.calib import SELF, CalibConfig
    from squeeze.checkpoint.shards import shard_limit
    from squeeze.fsutil import check_output_path
    from squeeze.recipe import Recipe
    from squeeze.registry import get_pass
    from squeeze.scheme import MAX_BITS, MIN_BITS

    from squeeze.sources import validate_source

    validate_source(model, allow_pickle)
    check_output_path(output, overwrite, inputs=(model, recipe, None if calib in (None, SELF) else calib))
    default_bits, default_granularity, default_act = METHOD_SCHEME_DEFAULTS.get(method, (4, "group", "none"))
    bits = default_bits if bits is None else bits
    granularity = granularity or default_granularity
    act = act or default_act
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SqueezeError(f"--bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
    if group_size is not None and group_size <= 0:
        raise SqueezeError(f"--group-size must be a positive integer, got {group_size}")
    _check_calib_file(calib)
    options = _method_options(method, {"damp": damp, "block_size": block_size, "act_order": act_order,
                                       "static_groups": static_groups, "alpha": alpha, "weighted_fit": weighted_fit, "clip": clip,
                                       "uncapped_fit": uncapped_fit,
                                       "float_target": float_target, "shrink": shrink,
                                       "calib_precision": calib_precision, "init": init, "learn_scales": learn_scales,
                                       **_training_kwargs(training),
                                       "token_cap": None if token_cap is None else (token_cap or False)})
    if options.get("token_cap") is False:  # --token-cap 0: no cap
        options["token_cap"] = None
    if recipe is not None:
        config = Recipe.load_yaml(recipe)
    else:
        qscheme = _scheme_from_flags(scheme, bits, group_size, granularity, asym, act, act_observer, act_asym)
        entry = get_pass(method)
        if method == "qat":
            options.setdefault("seed", seed)
        config = entry.config_cls(scheme=qscheme, targets=tuple(targets) or None, ignore=tuple(ignore), **options)
    calib_config = CalibConfig(calib, nsamples, seqlen, seed)
    shard_limit(max_shard_size)
    if workers < 1:
        raise SqueezeError(f"--workers must be at least 1, got {workers}")
    if workers > 1 and "WORLD_SIZE" not in os.environ:  # every input checked: start the ranks
        return _launch_workers(workers, ctx.find_root().obj["argv"])
    _write_dir(model, output, config, calib_config, dtype, overwrite, allow_pickle, max_shard_size, resume,
               offload_activations)


def _check_calib_file(calib) -> None:
    from squeeze.calib import SELF

    if calib is not None and calib != SELF and not Path(calib).is_file():
        what = "is not a file" if Path(calib).exists() else "does not exist"
        raise SqueezeError(f"calibration file {calib!r} {what} (or pass --calib self)")


def _write_dir(model, output, config, calib_config, dtype, overwrite, allow_pickle, max_shard_size, resume,
               offload_activations) -> None:
    """`squeeze.api.quantize_dir` for quantize and prune, saying what it wrote."""
    from squeeze import api

    if offload_activations is not None and not offload_activations.is_dir():
        raise SqueezeError(f"--offload-activations {str(offload_activations)!r} is not a directory")
    out = api.quantize_dir(model, output, config, calib_config, dtype, overwrite, allow_pickle,
                           max_shard_size=max_shard_size, resume={None: "auto", True: "require", False: "never"}[resume],
                           offload_activations=offload_activations,
                           notify=lambda message: click.echo(message, err=True))
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks say nothing
        click.echo(f"wrote {out}", err=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--calib", default=None,
              help="Training text (.txt or .jsonl with a 'text' field), or 'self' to sample it from the teacher "
                   "[default: bundled corpus].")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Training sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per training sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the data windows and the training order.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@training_options
@ALLOW_PICKLE
def distill(model, output, calib, nsamples, seqlen, seed, dtype, overwrite, allow_pickle, **training) -> None:
    """Train MODEL (a quantized or pruned model directory) to match --teacher (the model it was made from);
    write the result, in MODEL's own format, to OUTPUT. Quantized layers train on their own grid."""
    from squeeze.calib import SELF, CalibConfig
    from squeeze.fsutil import check_output_path
    from squeeze.passes.distill import Distill
    from squeeze.sources import validate_source

    validate_source(model, allow_pickle)
    if training.get("teacher") is None:
        raise SqueezeError("squeeze distill needs --teacher: the model MODEL was compressed from")
    validate_source(training["teacher"], allow_pickle)
    check_output_path(output, overwrite, inputs=(model, training["teacher"], None if calib in (None, SELF) else calib))
    _check_calib_file(calib)
    config = Distill(**{"seed": seed, **_training_kwargs(training)})
    _write_dir(model, output, config, CalibConfig(calib, nsamples, seqlen, seed), dtype, overwrite, allow_pickle,
               None, None, None)


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--method", type=click.Choice(PRUNE_METHODS), default=None,
              help="magnitude (|W|, no data), wanda (|W| x input norm), sparsegpt (masks and updates with the "
                   "inverse Hessian) [wanda].")
@click.option("--sparsity", type=float, default=None, help="Share of each layer's weights set to zero, 0-0.9 [0.5].")
@click.option("--mask", default=None, help="N:M pattern instead of --sparsity: N of every M inputs kept (2:4, 4:8).")
@click.option("--targets", multiple=True, help="Layers to prune (glob, suffix, or re:REGEX); repeatable.")
@click.option("--ignore", multiple=True, help="Layers to leave dense (same patterns); repeatable.")
@click.option("--structured", is_flag=True,
              help="Remove FFN channels, attention heads and blocks instead: a smaller dense model.")
@click.option("--ffn", type=float, default=None, help="--structured: share of FFN channels kept (0.75).")
@click.option("--heads", type=float, default=None,
              help="--structured: share of attention heads kept, whole KV groups (0.75 of 4 groups keeps 3).")
@click.option("--layers", type=int, default=None, help="--structured: number of blocks kept.")
@click.option("--params", default=None,
              help="--structured: parameter budget (100M, 1.2B, or a count), met by the FFN width.")
@click.option("--score", type=click.Choice(["activation", "weight"]), default=None,
              help="--structured: importance from calibration activations, or from weight norms (no data) [activation].")
@click.option("--round-to", type=int, default=None,
              help="--structured: kept FFN channels are a multiple of this [64].")
@click.option("--calib", default=None,
              help="Calibration text file for wanda/sparsegpt/--structured [default: the bundled stories sample].")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="wanda/sparsegpt: arithmetic of the calibration forwards [auto].")
@click.option("--block-size", type=int, default=None, help="sparsegpt: columns sharing a mask decision [128].")
@click.option("--damp", type=float, default=None, help="sparsegpt: dampening, a fraction of the mean Hessian diagonal [0.01].")
@click.option("--owl", type=float, default=None,
              help="wanda/sparsegpt with --sparsity: per-block sparsities from the blocks' outlier shares, "
                   "spread this much around the target (OWL; 0.08).")
@click.option("--scheme", default=None,
              help="sparsegpt: also quantize onto this scheme (w4g128, q4_k, ...) in the same sweep, GPTQ's solver.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--max-shard-size", default=None, help="Largest weight file of the output (e.g. 2GB) [5GB].")
@click.option("--resume/--no-resume", default=None, help="As for quantize: continue an interrupted run of the same command.")
@click.option("--offload-activations", type=click.Path(path_type=Path), default=None,
              help="Keep the calibration activations in this directory, not in memory.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@ALLOW_PICKLE
def prune(model, output, method, sparsity, mask, targets, ignore, structured, ffn, heads, layers, params, score,
          round_to, calib, nsamples, seqlen, seed, calib_precision, block_size, damp, owl, scheme, dtype, max_shard_size,
          resume, offload_activations, overwrite, allow_pickle) -> None:
    """Prune MODEL (a Hugging Face model directory) into a model directory at OUTPUT. By default weights are
    set to zero in place, shapes kept (the file is as large and as fast as before: quantize it, or see README
    on pruning); --structured removes channels, heads and blocks: a smaller model every runtime runs faster."""
    from squeeze.calib import SELF, CalibConfig
    from squeeze.checkpoint.shards import shard_limit
    from squeeze.fsutil import check_output_path
    from squeeze.registry import get_pass
    from squeeze.sources import validate_source

    validate_source(model, allow_pickle)
    check_output_path(output, overwrite, inputs=(model, None if calib in (None, SELF) else calib))
    _check_calib_file(calib)
    shapes = {"ffn": ffn, "heads": heads, "layers": layers, "params": params, "score": score, "round_to": round_to}
    if structured:
        config = _structured_config(shapes, {"method": method, "sparsity": sparsity, "mask": mask,
                                             "targets": targets, "ignore": ignore, "block_size": block_size,
                                             "damp": damp, "owl": owl, "scheme": scheme}, calib_precision)
        _write_dir(model, output, config, CalibConfig(calib, nsamples, seqlen, seed), dtype, overwrite, allow_pickle,
                   max_shard_size, resume, offload_activations)
        return
    for key, value in shapes.items():
        if value is not None:
            raise SqueezeError(f"--{key.replace('_', '-')} is an option of --structured pruning")
    method = method or "wanda"
    given = {"calib_precision": calib_precision, "block_size": block_size, "damp": damp, "owl": owl, "scheme": scheme}
    allowed = {"magnitude": (), "wanda": ("calib_precision", "owl"),
               "sparsegpt": ("calib_precision", "block_size", "damp", "owl", "scheme")}
    for key, value in given.items():
        if value is not None and key not in allowed[method]:
            raise SqueezeError(f"--{key.replace('_', '-')} does not apply to --method {method}")
    options = {k: v for k, v in given.items() if v is not None}
    if scheme is not None:
        from squeeze.scheme import get_scheme

        options["scheme"] = get_scheme(scheme)
    config = get_pass(method).config_cls(sparsity=sparsity, mask=mask, targets=tuple(targets) or None,
                                         ignore=tuple(ignore), **options)
    shard_limit(max_shard_size)
    _write_dir(model, output, config, CalibConfig(calib, nsamples, seqlen, seed), dtype, overwrite, allow_pickle,
               max_shard_size, resume, offload_activations)


PARAM_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_param_count(text: str) -> int:
    """ "100M", "1.2B", "135000000" -> a parameter count."""
    value = text.strip().upper()
    unit = PARAM_UNITS.get(value[-1:], 1)
    try:
        count = float(value[:-1] if value[-1:] in PARAM_UNITS else value) * unit
    except ValueError:
        raise SqueezeError(f"--params {text!r} is not a parameter count (100M, 1.2B, 135000000)") from None
    return int(count)


def _structured_config(shapes: dict, unstructured: dict, calib_precision):
    from squeeze.passes.structured import Structured

    for key, value in unstructured.items():
        if value not in (None, ()):
            raise SqueezeError(f"--{key.replace('_', '-')} does not apply to --structured pruning")
    options = {k: v for k, v in shapes.items() if v is not None}
    if "params" in options:
        options["params"] = parse_param_count(options["params"])
    if calib_precision is not None:
        options["calib_precision"] = calib_precision
    return Structured(**options)


@cli.command(name="eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Text file (.txt or .jsonl) to score.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Original model (directory or GGUF file): adds KL divergence and top-1 agreement.")
@click.option("--ctx", type=int, default=None, help="Window length in tokens [default: model context, at most 2048].")
@click.option("--runtime", default=None, help="Force a runtime (torch, llama.cpp, onnxruntime, ...) instead of the artifact's own.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Model directory or GGUF file whose tokenizer to use [default: the model's, else the reference's].")
@click.option("--task", type=click.Path(path_type=Path), default=None,
              help="Multiple-choice JSONL ({context, choices, label} per line): adds task accuracy.")
@click.option("--latency", is_flag=True, help="Also measure forward latency, prefill/decode tokens/s and peak memory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@ALLOW_PICKLE
def eval_cmd(model, data, reference, ctx, runtime, tokenizer, task, latency, as_json, allow_pickle) -> None:
    """Perplexity of MODEL (a model directory or an exported file) on --data, and KLD / top-1 vs --reference."""
    from squeeze import api
    from squeeze.eval.report import text_table
    from squeeze.sources import source_tokenizer, validate_source

    if not model.exists():
        raise SqueezeError(f"model path {str(model)!r} does not exist")
    if not data.is_file():
        raise SqueezeError(f"data file {str(data)!r} " + ("is not a file" if data.exists() else "does not exist"))
    if task is not None and not task.is_file():
        raise SqueezeError(f"task file {str(task)!r} " + ("is not a file" if task.exists() else "does not exist"))
    if reference is not None:
        validate_source(reference, allow_pickle)
    if ctx is not None and ctx < 2:
        raise SqueezeError(f"--ctx must be at least 2, got {ctx}")
    tok = source_tokenizer(validate_source(tokenizer, allow_pickle=True)) if tokenizer is not None else None  # no weights read
    result = api.eval_report(model, data, reference=reference, ctx=ctx, tokenizer=tok, runtime=runtime, task=task,
                             latency=latency, progress=not as_json, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(result))
    else:
        columns = ["ppl", "kld", "top1_agreement", "tokens", "size_bytes", "seconds"]
        if result["embedding_cosine_mean"] is not None:  # an encoder
            columns = ["embedding_cosine_mean", "embedding_cosine_min", "sentences", "size_bytes"]
        elif result["accuracy"] is not None:  # a classifier
            columns = ["accuracy", "top1_agreement", "samples", "size_bytes"]
        columns += ["task_accuracy"] if task else []
        columns += ["p50_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"] if latency else []
        click.echo(text_table([result], columns))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--to", "fmt", required=True, help="Export format: gguf, onnx, tensorrt, tflite, coreml.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output file.")
@click.option("--type", "qtype", default=None, help="Format-specific type (gguf: f32, f16, q8_0, q4_0, q4_k_m, ...; onnx, tflite, coreml: fp32, "
              "fp16).")
@click.option("--requantize", is_flag=True, help="Re-round a calibrated checkpoint onto a different grid (warns).")
@click.option("--no-verify", is_flag=True, help="Skip loading the file in its runtime and comparing with torch.")
@click.option("--kv-cache", is_flag=True, help="onnx/tensorrt: past key/value inputs and outputs for token-by-token "
              "decoding; tflite: also LiteRT-LM's prefill_<n> and decode signatures, the cache as inputs/outputs; "
              "coreml: a stateful program (the cache as Core ML states, flexible token count).")
@click.option("--prefill-len", type=int, default=None,
              help="tflite --kv-cache: tokens per prefill call (default: 128, at most half of --seq-len).")
@click.option("--seq-len", type=int, default=None,
              help="tflite, coreml: the token graph's fixed length (default: the model's context, at most 512 for a "
                   "causal LM and 128 for an encoder).")
@click.option("--dynamic-range", is_flag=True,
              help="tflite: int8/int4 layers run in TFLite's dynamic-range kernels (activations quantized to "
                   "int8 at run time; int4 weights stay int4 in memory, smaller file) instead of computing in "
                   "float on the exact weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@ALLOW_PICKLE
def export(model, fmt, output, qtype, requantize, no_verify, kv_cache, prefill_len, seq_len, dynamic_range, overwrite,
           allow_pickle) -> None:
    """Export MODEL (a float or quantized model directory, or a GGUF file) to a deployment format."""
    from squeeze import api

    artifact = api.export(model, fmt, output, qtype=qtype, verify=not no_verify, requantize=requantize,
                          kv_cache=kv_cache, prefill_len=prefill_len, seq_len=seq_len, dynamic_range=dynamic_range,
                          overwrite=overwrite,
                          allow_pickle=allow_pickle)
    for note in artifact.notes:
        click.echo(note, err=True)
    v = artifact.verification
    if v:
        numbers = [k for k in v if isinstance(v[k], (int, float)) and not isinstance(v[k], bool)]
        click.echo(f"verified in {v['runtime']}: " + ", ".join(f"{k}={v[k]:.6g}" for k in numbers), err=True)
    click.echo(f"wrote {artifact.path} ({artifact.size_bytes} bytes)", err=True)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path, as_json) -> None:
    """Show what a checkpoint holds: method, scheme, size per tensor group, per-layer error."""
    from squeeze.inspect_ckpt import describe, format_description

    d = describe(path)
    click.echo(json.dumps(d, indent=2) if as_json else format_description(d))


def _bench_config_from_flags(name, model, data, task, methods, formats):
    from squeeze.bench import BenchConfig

    if model is None or data is None:
        raise SqueezeError("give a bench config file, or --model and --data (with --method / --format)")
    method_items = []
    for m in methods:
        method, _, scheme = m.partition(":")
        method_items.append({"method": method, **({"scheme": scheme} if scheme else {})})
    format_items = []
    for f in formats or ("torch",):
        fmt, _, qtype = f.partition(":")
        format_items.append({"format": fmt, **({"type": qtype} if qtype else {})})
    return BenchConfig.from_dict({"name": name or Path(model).name, "model": str(model), "data": str(data),
                                  "task": str(task) if task else None, "methods": method_items,
                                  "formats": format_items}, base=Path.cwd())


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Report name (default: the config's name or the model directory's).")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model directory (without a config file).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Evaluation text (without a config file).")
@click.option("--task", type=click.Path(path_type=Path), default=None, help="Multiple-choice JSONL task (optional).")
@click.option("--method", "methods", multiple=True, help="METHOD:SCHEME, e.g. rtn:w4g32-asym; repeatable.")
@click.option("--format", "formats", multiple=True, help="FORMAT[:TYPE], e.g. torch, gguf:q4_0, onnx:int4; repeatable.")
@click.option("--reports", type=click.Path(path_type=Path), default=Path("reports"), show_default=True,
              help="The report goes into REPORTS/<name>/.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path(".squeeze-cache"), show_default=True,
              help="Checkpoints, artifacts and finished cells, reused by later runs.")
@click.option("--keep-going", is_flag=True,
              help="Run every cell even if some fail, and exit 0 (failed cells show in the error column); "
                   "without it the bench stops at the first failed cell and exits 1.")
def bench(config, name, model, data, task, methods, formats, reports, cache_dir, keep_going) -> None:
    """Run a grid of methods x export formats on one model and write reports/<name>/ (JSON, Markdown, HTML, plots)."""
    from squeeze.bench import BenchConfig, bench_report, failure_summary, grid_cells, run_bench
    from squeeze.eval.bench_report import BENCH_COLUMNS, write_report
    from squeeze.eval.device import describe_device
    from squeeze.eval.report import text_table

    if config is not None:
        cfg = BenchConfig.load(config)
        if name:
            cfg = BenchConfig.from_dict({**cfg.__dict__, "name": name})
    else:
        cfg = _bench_config_from_flags(name, model, data, task, methods, formats)
    rows = run_bench(cfg, cache_dir, keep_going=keep_going)
    files = write_report(bench_report(cfg, rows, describe_device()), reports / cfg.name)
    columns = [c for c in BENCH_COLUMNS if c not in ("type", "runtime") and any(r.get(c) is not None for r in rows)]
    click.echo(text_table(rows, columns + (["error"] if any("error" in r for r in rows) else [])))
    click.echo(f"wrote {', '.join(str(f) for f in files)}", err=True)
    summary = failure_summary(rows, len(grid_cells(cfg)))
    if summary and keep_going:
        click.echo(f"warning: {summary}", err=True)
    elif summary:
        click.echo(f"error: {summary}; fix it and rerun (finished cells are cached), or pass --keep-going", err=True)
        raise click.exceptions.Exit(1)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Keep the quantized checkpoints here.")
def quickstart(out) -> None:
    """Quantize the bundled stories260K model (RTN w8, w4g32-asym) and evaluate it against the original."""
    from squeeze.eval.report import text_table
    from squeeze.quickstart import TABLE_COLUMNS, run_quickstart
    from squeeze.resources import DEFAULT_MODEL, default_eval_text

    click.echo(f"model: {DEFAULT_MODEL}\ndata:  {default_eval_text()}", err=True)
    rows = run_quickstart(out)
    click.echo(text_table(rows, TABLE_COLUMNS))


def _launch_workers(workers: int, argv: list[str]) -> int:
    """Run this command again as ``workers`` torch.distributed ranks (torchrun, on a free local port)."""
    args = []
    skip = False
    for arg in argv:  # the same command without --workers
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           "-m", "squeeze", *args]
    return subprocess.run(cmd).returncode


def quiet_third_party_logs() -> None:
    """The command line prints squeeze's lines, not the start-up chatter of optional runtimes: TensorFlow Lite's
    C++ log (oneDNN notices), torchao's missing-CUDA-kernel notices and torch's pytree deprecations (both appear
    once litert-torch has installed torchao). Their warnings and errors still show."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    for name in ("torchao", "torch.utils._pytree", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning bad input into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party_logs()
    try:
        rc = cli.main(args=argv, prog_name="squeeze", standalone_mode=False, obj={"argv": argv})
    except SqueezeError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except VerificationError as e:
        click.echo(f"error: verification failed: {e}", err=True)
        return 1
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except OSError as e:  # the filesystem said no (read-only, full, a directory where a file was expected)
        where = f": {str(e.filename)!r}" if e.filename else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
