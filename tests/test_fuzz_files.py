"""Truncated and bit-flipped real files (safetensors, GGUF, ONNX, JSON) never crash a command.

Each mutation (seeded, so a failure is reproducible by its id) is run through the command that reads
the file: it either succeeds (a flip in tensor data is only different numbers) or exits 2 with exactly
one `error:` line; an escaped exception fails the test as a traceback would. llama.cpp is C, so the
GGUF evaluations run in a subprocess, where a crash is a return code, not a dead test session.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from squeeze.cli import main
from squeeze.resources import DEFAULT_MODEL, default_eval_text

SEED = 12


def mutations(data: bytes, header_end: int, flips: int, cuts: int, seed: int) -> dict[str, bytes]:
    """``cuts`` truncations anywhere and ``flips`` single-bit flips, most of them in the first ``header_end``
    bytes (where a flip changes structure, not just a number)."""
    rng = random.Random(seed)
    out = {}
    for _ in range(cuts):
        n = rng.randrange(0, len(data))
        out[f"cut{n}"] = data[:n]
    for i in range(flips):
        pos = rng.randrange(0, header_end if i % 4 else len(data))
        bit = rng.randrange(8)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        out[f"flip{pos}.{bit}"] = bytes(flipped)
    return out


def assert_clean(rc: int, err: str, what: str) -> None:
    assert "Traceback" not in err, (what, err)
    assert rc in (0, 2), (what, rc, err[-2000:])
    if rc == 2:
        lines = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, err)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    import squeeze
    from squeeze import api

    root = tmp_path_factory.mktemp("fuzz")
    text = root / "text.txt"
    text.write_text(default_eval_text().read_text()[:1500])
    ckpt = api.quantize_dir(DEFAULT_MODEL, root / "ckpt", squeeze.RTN(scheme=squeeze.get_scheme("w4g32")))
    squeeze.export(DEFAULT_MODEL, "gguf", root / "m.gguf", qtype="q8_0", verify=False)
    squeeze.export(DEFAULT_MODEL, "onnx", root / "m.onnx", verify=False)
    return {"root": root, "text": text, "ckpt": ckpt, "gguf": root / "m.gguf", "onnx": root / "m.onnx"}


def _run(capfd, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capfd.readouterr().err


def _safetensors_header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_mutated_safetensors(originals, tmp_path, capfd):
    src = originals["ckpt"]
    data = (src / "model.safetensors").read_bytes()
    for name, mutated in mutations(data, _safetensors_header_end(data), flips=12, cuts=4, seed=SEED).items():
        case = tmp_path / name
        shutil.copytree(src, case)
        (case / "model.safetensors").write_bytes(mutated)
        assert_clean(*_run(capfd, "inspect", case), f"inspect {name}")
        assert_clean(*_run(capfd, "eval", case, "--data", originals["text"], "--ctx", "64", "--json"), f"eval {name}")
        shutil.rmtree(case)


@pytest.mark.parametrize("file", ["config.json", "squeeze.json", "tokenizer_config.json", "tokenizer.json"])
def test_mutated_json(originals, tmp_path, capfd, file):
    src = originals["ckpt"]
    data = (src / file).read_bytes()
    limit = min(len(data), 4000)
    for name, mutated in mutations(data[:limit] if file == "tokenizer.json" else data, limit, flips=6, cuts=2,
                                   seed=SEED).items():
        if file == "tokenizer.json" and name.startswith("flip"):
            mutated = mutated + data[limit:]
        case = tmp_path / name
        shutil.copytree(src, case)
        (case / file).write_bytes(mutated)
        assert_clean(*_run(capfd, "eval", case, "--data", originals["text"], "--ctx", "64", "--json"), f"{file} {name}")
        shutil.rmtree(case)


def test_mutated_onnx(originals, tmp_path, capfd):
    data = originals["onnx"].read_bytes()
    for name, mutated in mutations(data, 2000, flips=8, cuts=3, seed=SEED).items():
        case = tmp_path / f"{name}.onnx"
        case.write_bytes(mutated)
        shutil.copy(DEFAULT_MODEL / "tokenizer.json", tmp_path / "tokenizer.json")
        assert_clean(*_run(capfd, "eval", case, "--data", originals["text"], "--ctx", "64",
                            "--tokenizer", DEFAULT_MODEL, "--json"), f"onnx {name}")
        case.unlink()


def _gguf_header_end(path: Path) -> int:
    """Bytes before the tensor data (metadata and tensor infos), from gguf-py."""
    import gguf

    return int(gguf.GGUFReader(str(path)).data_offset)


def test_mutated_gguf(originals, tmp_path, capfd, llama_cpp):
    data = originals["gguf"].read_bytes()
    header_end = _gguf_header_end(originals["gguf"])
    cases = mutations(data, header_end, flips=8, cuts=3, seed=SEED)
    for name, mutated in cases.items():  # gguf-py and transformers read it: pure Python, in-process
        case = tmp_path / f"{name}.gguf"
        case.write_bytes(mutated)
        assert_clean(*_run(capfd, "quantize", case, "-o", tmp_path / "q", "--overwrite"), f"quantize {name}")
        assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # llama.cpp reads it: a subprocess, so that a crash in C is a failed assertion
    for name in list(cases)[::3]:
        r = subprocess.run([sys.executable, "-m", "squeeze.cli", "eval", tmp_path / f"{name}.gguf", "--data",
                            originals["text"], "--ctx", "64", "--json"], capture_output=True, text=True)
        assert_clean(r.returncode, r.stderr, f"eval {name}")


def test_mutations_are_reproducible():
    data = bytes(range(256)) * 4
    assert mutations(data, 100, 5, 2, SEED) == mutations(data, 100, 5, 2, SEED)
    assert len(mutations(data, 100, 5, 2, SEED)) == 7 and all(v != data for v in mutations(data, 100, 5, 2, SEED).values())
