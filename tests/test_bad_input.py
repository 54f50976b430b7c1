"""Bad input, command by command: exit 2, exactly one `error:` line naming the file or flag, no traceback,
nothing written and no temporary left (the commands run in-process through squeeze.cli.main, so an
uncaught exception fails the test as a traceback would)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from squeeze.cli import main
from squeeze.resources import DEFAULT_MODEL


def run_cli(capfd, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (directories -1), hidden temporaries included."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def copy_model(root: Path, name: str) -> Path:
    out = root / name
    shutil.copytree(DEFAULT_MODEL, out)
    return out


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """Broken inputs built once: each case names the ones it uses."""
    root = tmp_path_factory.mktemp("corpus")
    weights = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    truncated = copy_model(root, "truncated")
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    header_only = copy_model(root, "header_cut")
    (header_only / "model.safetensors").write_bytes(weights[:6])
    bad_header = copy_model(root, "bad_header")
    (bad_header / "model.safetensors").write_bytes(weights[:8] + b"{not json" + weights[17:])
    empty_weights = copy_model(root, "empty_weights")
    (empty_weights / "model.safetensors").write_bytes(b"")
    not_object = copy_model(root, "config_list")
    (not_object / "config.json").write_text("[1, 2]")
    return root


# name -> (argv with {root} for the corpus directory, text the error line must contain)
CASES: dict[str, tuple[tuple[str, ...], str]] = {
    "quantize truncated safetensors": (("quantize", "{root}/truncated", "-o", "{out}/q"), "truncated/model.safetensors"),
    "quantize safetensors cut in header": (("quantize", "{root}/header_cut", "-o", "{out}/q"), "header_cut/model.safetensors"),
    "quantize corrupt safetensors header": (("quantize", "{root}/bad_header", "-o", "{out}/q"), "bad_header/model.safetensors"),
    "quantize empty safetensors": (("quantize", "{root}/empty_weights", "-o", "{out}/q"), "empty_weights/model.safetensors"),
    "quantize config not an object": (("quantize", "{root}/config_list", "-o", "{out}/q"), "config_list/config.json"),
    "eval truncated safetensors": (("eval", "{root}/truncated", "--data", "{model}/config.json"), "truncated/model.safetensors"),
    "eval corrupt safetensors header": (("eval", "{root}/bad_header", "--data", "{model}/config.json"), "bad_header/model.safetensors"),
    "export truncated safetensors": (("export", "{root}/truncated", "--to", "gguf", "-o", "{out}/m.gguf"), "truncated/model.safetensors"),
    "export onnx truncated safetensors": (("export", "{root}/truncated", "--to", "onnx", "-o", "{out}/m.onnx"), "truncated/model.safetensors"),
    "inspect truncated safetensors": (("inspect", "{root}/truncated"), "truncated/model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_corpus(case, corpus_root, tmp_path, capfd, monkeypatch):
    argv, must_name = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    fill = {"root": corpus_root, "out": out, "model": DEFAULT_MODEL}
    before_out, before_root = tree(out), tree(corpus_root)
    rc, stdout, err = run_cli(capfd, *(a.format(**fill) for a in argv))
    assert rc == 2, (stdout, err)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert must_name in lines[0], lines[0]
    assert "Traceback" not in err
    assert tree(out) == before_out and tree(corpus_root) == before_root  # nothing written, no temporary left
