"""The `squeeze` command: flags -> config objects -> squeeze.api.

Bad input is reported as one line on stderr with exit code 2; nothing is
written unless the command completes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from squeeze.errors import SqueezeError, VerificationError

METHODS = ("rtn",)  # the registered passes the CLI exposes (kept in step with squeeze.registry)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="squeeze")
def cli() -> None:
    """squeeze: quantize models, export them, and prove they still work."""


def _scheme_from_flags(scheme, bits, group_size, granularity, asym, act, act_observer):
    from squeeze.scheme import ActScheme, QuantScheme, get_scheme

    if scheme is not None:
        return get_scheme(scheme)
    if granularity != "group" and group_size is not None:
        raise SqueezeError(f"--group-size applies only to --granularity group, not {granularity!r}")
    activations = None if act == "none" else ActScheme(mode=act, observer=act_observer)
    gs = (128 if group_size is None else group_size) if granularity == "group" else None
    return QuantScheme(bits=bits, symmetric=not asym, granularity=granularity, group_size=gs, activations=activations)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output checkpoint directory.")
@click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True, help="Quantization method.")
@click.option("--scheme", default=None, help="Named scheme preset (e.g. w4g128, w4g32-asym, w8a8); overrides --bits etc.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits, 2-8.")
@click.option("--group-size", type=int, default=None, help="Columns per quantization group [default: 128].")
@click.option("--granularity", type=click.Choice(["group", "channel", "tensor"]), default="group", show_default=True)
@click.option("--asym", is_flag=True, help="Asymmetric grid (zero point) instead of symmetric.")
@click.option("--act", type=click.Choice(["none", "static", "dynamic"]), default="none", show_default=True,
              help="int8 activations: static per-tensor (calibrated) or dynamic per-token.")
@click.option("--act-observer", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True)
@click.option("--targets", multiple=True, help="Layers to quantize (glob, suffix, or re:REGEX); repeatable.")
@click.option("--ignore", multiple=True, help="Layers to keep in float (same patterns); repeatable.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text (.txt or .jsonl with a 'text' field) [default: bundled corpus].")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe (overrides method/scheme flags).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def quantize(model, output, method, scheme, bits, group_size, granularity, asym, act, act_observer, targets, ignore,
             calib, nsamples, seqlen, seed, dtype, recipe, overwrite) -> None:
    """Quantize the model directory MODEL into a checkpoint at OUTPUT."""
    from squeeze import api
    from squeeze.calib import CalibConfig
    from squeeze.model import validate_model_dir
    from squeeze.recipe import Recipe
    from squeeze.registry import get_pass

    from squeeze.fsutil import check_output_path
    from squeeze.scheme import MAX_BITS, MIN_BITS

    validate_model_dir(model)
    check_output_path(output, overwrite)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SqueezeError(f"--bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
    if group_size is not None and group_size <= 0:
        raise SqueezeError(f"--group-size must be a positive integer, got {group_size}")
    if calib is not None and not calib.is_file():
        raise SqueezeError(f"calibration file {str(calib)!r} does not exist")
    if recipe is not None:
        config = Recipe.load_yaml(recipe)
    else:
        qscheme = _scheme_from_flags(scheme, bits, group_size, granularity, asym, act, act_observer)
        entry = get_pass(method)
        config = entry.config_cls(scheme=qscheme, targets=tuple(targets) or None, ignore=tuple(ignore))
    calib_config = CalibConfig(str(calib) if calib else None, nsamples, seqlen, seed)
    out = api.quantize_dir(model, output, config, calib_config, dtype, overwrite)
    click.echo(f"wrote {out}", err=True)


@cli.command(name="eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Text file (.txt or .jsonl) to score.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Original model directory: adds KL divergence and top-1 agreement.")
@click.option("--ctx", type=int, default=None, help="Window length in tokens [default: model context, at most 2048].")
@click.option("--runtime", default=None, help="Force a runtime (torch, llama.cpp, ...) instead of the artifact's own.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Model directory whose tokenizer to use [default: the model's, else the reference's].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_cmd(model, data, reference, ctx, runtime, tokenizer, as_json) -> None:
    """Perplexity of MODEL (a model directory or an exported file) on --data, and KLD / top-1 vs --reference."""
    from squeeze import api
    from squeeze.eval.report import text_table
    from squeeze.model import load_tokenizer, validate_model_dir

    if not model.exists():
        raise SqueezeError(f"model path {str(model)!r} does not exist")
    if not data.is_file():
        raise SqueezeError(f"data file {str(data)!r} does not exist")
    if reference is not None:
        validate_model_dir(reference)
    if ctx is not None and ctx < 2:
        raise SqueezeError(f"--ctx must be at least 2, got {ctx}")
    tok = load_tokenizer(validate_model_dir(tokenizer)) if tokenizer is not None else None
    result = api.evaluate(model, data, reference=reference, ctx=ctx, tokenizer=tok, runtime=runtime,
                          progress=not as_json).to_dict()
    result.update(model=str(model), data=str(data), reference=str(reference) if reference else None)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(text_table([result], ("ppl", "kld", "top1_agreement", "tokens", "size_bytes", "seconds")))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--to", "fmt", required=True, help="Export format (gguf, ...).")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output file.")
@click.option("--type", "qtype", default=None, help="Format-specific type (gguf: f32, f16, q8_0, q4_0, q4_k_m, ...).")
@click.option("--requantize", is_flag=True, help="Re-round a calibrated checkpoint onto a different grid (warns).")
@click.option("--no-verify", is_flag=True, help="Skip loading the file in its runtime and comparing with torch.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def export(model, fmt, output, qtype, requantize, no_verify, overwrite) -> None:
    """Export MODEL (a float or quantized model directory) to a deployment format."""
    from squeeze import api

    artifact = api.export(model, fmt, output, qtype=qtype, verify=not no_verify, requantize=requantize,
                          overwrite=overwrite)
    for note in artifact.notes:
        click.echo(note, err=True)
    v = artifact.verification
    if v:
        click.echo(f"verified in {v['runtime']}: " + ", ".join(f"{k}={v[k]:.6g}" for k in v if isinstance(v[k], float)),
                   err=True)
    click.echo(f"wrote {artifact.path} ({artifact.size_bytes} bytes)", err=True)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path, as_json) -> None:
    """Show what a checkpoint holds: method, scheme, size per tensor group, per-layer error."""
    from squeeze.inspect_ckpt import describe, format_description

    d = describe(path)
    click.echo(json.dumps(d, indent=2) if as_json else format_description(d))


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning bad input into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="squeeze", standalone_mode=False)
    except SqueezeError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except VerificationError as e:
        click.echo(f"error: verification failed: {e}", err=True)
        return 1
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
