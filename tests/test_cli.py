"""The command line: real runs on the bundled model, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "squeeze.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("quantize", "eval", "inspect", "export", "bench", "quickstart"):
        assert f"  {cmd} " in r.stdout
    assert run("quantize", "--help").returncode == 0 and run("eval", "--help").returncode == 0


def test_quantize_eval_inspect_end_to_end(stories_dir, short_text, tmp_path):
    out = tmp_path / "w4"
    r = run("quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym", stories_dir, "-o", out)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file()
    r = run("eval", out, "--data", short_text, "--reference", stories_dir, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"ppl", "kld", "top1_agreement", "tokens", "size_bytes"} <= set(result)
    assert 0 < result["kld"] < 0.5 and 0.5 < result["top1_agreement"] < 1.0
    assert result["size_bytes"] == (out / "model.safetensors").stat().st_size
    r = run("inspect", out)
    assert r.returncode == 0 and "w4g32-asym" in r.stdout and "quantized linear" in r.stdout


def _bad_input_cases(stories_dir, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    exists = tmp_path / "exists"
    exists.mkdir()
    out = tmp_path / "out"
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (truncated / name).write_bytes((stories_dir / name).read_bytes())
    (truncated / "model.safetensors").write_bytes((stories_dir / "model.safetensors").read_bytes()[:5000])
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    return {
        "missing directory": ("quantize", tmp_path / "nope", "-o", out),
        "no config.json": ("quantize", no_config, "-o", out),
        "no weights": ("quantize", no_weights, "-o", out),
        "unknown method": ("quantize", stories_dir, "-o", out, "--method", "magic"),
        "bits too high": ("quantize", stories_dir, "-o", out, "--bits", "9"),
        "bits too low": ("quantize", stories_dir, "-o", out, "--bits", "1"),
        "group size zero": ("quantize", stories_dir, "-o", out, "--group-size", "0"),
        "group size negative": ("quantize", stories_dir, "-o", out, "--group-size", "-4"),
        "output exists": ("quantize", stories_dir, "-o", exists),
        "unknown scheme": ("quantize", stories_dir, "-o", out, "--scheme", "w4g100"),
        "missing calib file": ("quantize", stories_dir, "-o", out, "--calib", tmp_path / "nope.txt"),
        "eval missing data": ("eval", stories_dir, "--data", tmp_path / "nope.txt"),
        "eval missing model": ("eval", tmp_path / "nope", "--data", stories_dir / "config.json"),
        "inspect missing": ("inspect", tmp_path / "nope"),
        "truncated safetensors": ("quantize", truncated, "-o", out),
        "export onto a directory": ("export", stories_dir, "--to", "gguf", "-o", tmp_path, "--overwrite"),
        "quantize onto its input": ("quantize", model, "-o", model, "--overwrite"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing directory", "no config.json", "no weights", "unknown method", "bits too high", "bits too low",
     "group size zero", "group size negative", "output exists", "unknown scheme", "missing calib file",
     "eval missing data", "eval missing model", "inspect missing", "truncated safetensors", "export onto a directory",
     "quantize onto its input"],
)
def test_bad_input_is_one_line_exit_2_no_output(stories_dir, tmp_path, case):
    args = _bad_input_cases(stories_dir, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp dirs left


def test_import_is_light():
    """`import squeeze` must not pull in transformers (keeps the CLI and API start fast)."""
    code = "import sys, squeeze; print('transformers' in sys.modules, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"]
