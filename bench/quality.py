"""Quality benchmark of the calibrated methods on the bundled model; writes reports/quality.md.

    python bench/quality.py                      # the full grid, 128 x 512-token calibration windows
    python bench/quality.py --llmc-python PY     # llm-compressor installed in another interpreter

Method x bits x group -> perplexity, KLD and top-1 agreement against the float
model on the bundled eval text (never used for calibration), quantization wall
time and peak memory. Every cell runs in its own process so peak RSS is that
cell's. When llm-compressor is importable (here or by --llmc-python) the same
GPTQ configuration runs through it on the same calibration token windows and
both are reported side by side from one run.

llm-compressor 0.14 pins transformers <= 5.17, so it lives in its own environment,
whose own packages come first and which falls back to this environment's CPU torch
through a .pth file (as measured for reports/quality.md):

    python -m venv /tmp/llmc
    python -c "import site; print(site.getsitepackages()[0])" > /tmp/llmc/lib/python3.11/site-packages/zz_main.pth
    /tmp/llmc/bin/pip install --no-deps llmcompressor "transformers<=5.17" compressed-tensors \
        "huggingface-hub>=1.5,<2" loguru httpx httpcore h11 anyio sniffio datasets multiprocess pandas \
        pyarrow dill xxhash  # the light deps, as installed for reports/smollm2.md (llm-compressor 0.14.0.1)
    python bench/quality.py --llmc-python /tmp/llmc/bin/python
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# (label, method, scheme, options, calibration) — the grid of the report.
CELLS = [
    ("rtn", "rtn", "w4g32-asym", {}, None),
    ("gptq", "gptq", "w4g32-asym", {}, "bundled"),
    ("gptq act-order", "gptq", "w4g32-asym", {"act_order": True}, "bundled"),
    ("awq", "awq", "w4g32-asym", {}, "bundled"),
    ("gptq", "gptq", "w4g32-asym", {}, "self"),
    ("gptq act-order", "gptq", "w4g32-asym", {"act_order": True}, "self"),
    ("awq", "awq", "w4g32-asym", {}, "self"),
    ("rtn", "rtn", "w3g32-asym", {}, None),
    ("gptq", "gptq", "w3g32-asym", {}, "bundled"),
    ("gptq act-order", "gptq", "w3g32-asym", {"act_order": True}, "bundled"),
    ("awq", "awq", "w3g32-asym", {}, "bundled"),
    ("gptq", "gptq", "w3g32-asym", {}, "self"),
    ("gptq act-order", "gptq", "w3g32-asym", {"act_order": True}, "self"),
    ("awq", "awq", "w3g32-asym", {}, "self"),
    ("rtn", "rtn", "w8a8", {}, "bundled"),
    ("smoothquant", "smoothquant", "w8a8", {}, "bundled"),
    ("rtn", "rtn", "w8a8-dynamic", {}, None),
    ("smoothquant", "smoothquant", "w8a8-dynamic", {}, "bundled"),
]
# The configuration compared with llm-compressor. It cannot group 172-wide rows (down_proj) by 32,
# so both tools keep down_proj in float for this comparison.
LLMC_IGNORE = ("down_proj",)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _calibration(kind: str | None, nsamples: int, seqlen: int, model, tokenizer):
    from squeeze.calib import SELF, CalibConfig, load_calibration

    if kind is None:
        return None, 0.0
    start = time.perf_counter()
    config = CalibConfig(SELF if kind == "self" else None, nsamples, seqlen, seed=0)
    return load_calibration(tokenizer, config, model=model), time.perf_counter() - start


def run_cell(cell: dict) -> dict:
    """Quantize the bundled model as ``cell`` says and evaluate it (runs in a fresh process)."""
    import torch

    from squeeze import api
    from squeeze.model import load_tokenizer
    from squeeze.registry import get_pass
    from squeeze.resources import DEFAULT_MODEL, default_eval_text
    from squeeze.scheme import get_scheme

    torch.set_num_threads(cell["threads"])
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = api.load(DEFAULT_MODEL)
    calib, calib_s = _calibration(cell["calib"], cell["nsamples"], cell["seqlen"], model, tokenizer)
    entry = get_pass(cell["method"])
    config = entry.config_cls(scheme=get_scheme(cell["scheme"]), ignore=tuple(cell.get("ignore", ())),
                              **cell["options"])
    start = time.perf_counter()
    api.quantize(model, config, calib)
    quant_s = time.perf_counter() - start
    result = api.evaluate(model, default_eval_text(), reference=api.load(DEFAULT_MODEL), tokenizer=tokenizer,
                          progress=False)
    return {**cell, "ppl": result.ppl, "kld": result.kld, "top1": result.top1_agreement, "quant_s": quant_s,
            "calib_s": calib_s, "peak_rss_mib": peak_rss_mib()}


def baseline(threads: int) -> float:
    import torch

    from squeeze import api
    from squeeze.resources import DEFAULT_MODEL, default_eval_text

    torch.set_num_threads(threads)
    return api.evaluate(DEFAULT_MODEL, default_eval_text(), progress=False).ppl


def in_fresh_process(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def evaluate_llmc_weights(weights_file: str, threads: int) -> dict:
    """Evaluate the float model carrying llm-compressor's (already quantized-dequantized) weights."""
    import torch
    from safetensors.torch import load_file

    from squeeze import api
    from squeeze.model import load_tokenizer
    from squeeze.resources import DEFAULT_MODEL, default_eval_text

    torch.set_num_threads(threads)
    model = api.load(DEFAULT_MODEL)
    missing, unexpected = model.load_state_dict(load_file(weights_file), strict=False)
    if unexpected:
        raise RuntimeError(f"llm-compressor weights do not fit the model: {unexpected[:3]}")
    result = api.evaluate(model, default_eval_text(), reference=api.load(DEFAULT_MODEL),
                          tokenizer=load_tokenizer(DEFAULT_MODEL), progress=False)
    return {"ppl": result.ppl, "kld": result.kld, "top1": result.top1_agreement}


def run_llmcompressor(python: str, nsamples: int, seqlen: int, threads: int) -> dict:
    """GPTQ w4g32-asym through llm-compressor on the bundled calibration windows, in ``python``."""
    from squeeze.calib import CalibConfig, load_calibration
    from squeeze.model import load_tokenizer
    from squeeze.resources import DEFAULT_MODEL

    probe = subprocess.run([python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return {"error": f"llm-compressor is not importable by {python} (pip install llmcompressor, "
                         "or pass --llmc-python)"}
    calib = load_calibration(load_tokenizer(DEFAULT_MODEL), CalibConfig(None, nsamples, seqlen, 0))
    with tempfile.TemporaryDirectory(prefix="squeeze-llmc-") as tmp:
        import torch

        torch.save(calib.input_ids, f"{tmp}/calib.pt")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        run = subprocess.run([python, str(ROOT / "bench" / "llmc_gptq.py"), str(DEFAULT_MODEL), f"{tmp}/calib.pt",
                              tmp, ",".join(LLMC_IGNORE)], capture_output=True, text=True, env=env)
        if run.returncode != 0:
            tail = run.stderr.strip().splitlines()[-1:] or ["(no output)"]
            return {"error": f"llm-compressor failed: {tail[0]}"}
        info = json.loads(Path(f"{tmp}/info.json").read_text())
        info.update(in_fresh_process(evaluate_llmc_weights, f"{tmp}/weights.safetensors", threads))
        return info


# ---- report ---------------------------------------------------------------------------


def _row(r: dict, base: float) -> str:
    delta = 100.0 * (r["ppl"] / base - 1.0)
    return (f"| {r['label']} | {r['scheme']} | {r.get('calib') or '-'} | {r['ppl']:.4f} | {delta:+.2f}% | "
            f"{r['kld']:.4f} | {100 * r['top1']:.2f}% | {r['quant_s']:.1f} | {r['peak_rss_mib']:.0f} |")


def write_report(path: Path, base: float, rows: list[dict], llmc: dict | None, ours: dict | None, args) -> None:
    head = ("| method | scheme | calibration | ppl | Δppl | KLD | top-1 | quant s | peak RSS MiB |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [
        "# Calibrated quantization quality (bundled stories260K)",
        "",
        f"Written by `bench/quality.py` in one run. Float32 baseline perplexity **{base:.4f}** on "
        "`calibration/stories260K-samples-eval.txt` (full text, ctx 512); KLD and top-1 agreement against "
        "the float model on the same windows. Calibration: `bundled` = "
        f"{args.nsamples} seeded windows of {args.seqlen} tokens from `stories260K-samples-calib.txt`; "
        f"`self` = {args.nsamples} x {args.seqlen} tokens sampled from the model (temperature 1, seed 0); `-` = "
        f"none. quant s = wall time of `squeeze.quantize` alone (sampling for `self` not included); peak RSS "
        f"of the cell's process. torch threads: {args.threads}. Wall times are from one run on a shared CPU "
        "machine, so compare them within this report, not across runs.",
        "",
        head,
        *(_row(r, base) for r in rows),
        "",
        "## GPTQ: squeeze vs llm-compressor",
        "",
    ]
    if llmc is None or "error" in llmc:
        lines.append(f"Not run: {llmc['error'] if llmc else 'skipped (--no-llmc)'}.")
    else:
        d_ours, d_llmc = ours["ppl"] - base, llmc["ppl"] - base
        lines += [
            f"Same configuration in both: GPTQ w4g32-asym, damp 0.01, block 128, no act-order, the same "
            f"{args.nsamples} x {args.seqlen} calibration windows, llm-compressor {llmc['version']} "
            "(sequential pipeline). llm-compressor cannot group 172-column rows by 32, so `down_proj` stays "
            "float in **both** runs of this comparison.",
            "",
            "| tool | ppl | Δppl | KLD | top-1 | quant s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
            f"| squeeze | {ours['ppl']:.4f} | {100 * d_ours / base:+.2f}% | {ours['kld']:.4f} | "
            f"{100 * ours['top1']:.2f}% | {ours['quant_s']:.1f} | {ours['peak_rss_mib']:.0f} |",
            f"| llm-compressor | {llmc['ppl']:.4f} | {100 * d_llmc / base:+.2f}% | {llmc['kld']:.4f} | "
            f"{100 * llmc['top1']:.2f}% | {llmc['quant_s']:.1f} | {llmc['peak_rss_mib']:.0f} |",
            "",
            f"Ratios squeeze / llm-compressor: perplexity increase **{d_ours / d_llmc:.3f}**, "
            f"wall time **{ours['quant_s'] / llmc['quant_s']:.3f}**.",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell (1 is fastest on a busy box)")
    parser.add_argument("--llmc-python", default=sys.executable, help="interpreter that has llmcompressor")
    parser.add_argument("--no-llmc", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "quality.md")
    args = parser.parse_args()

    base = in_fresh_process(baseline, args.threads)
    print(f"float ppl {base:.4f}", flush=True)
    rows = []
    for label, method, scheme, options, calib in CELLS:
        cell = {"label": label, "method": method, "scheme": scheme, "options": options, "calib": calib,
                "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads}
        rows.append(in_fresh_process(run_cell, cell))
        print(_row(rows[-1], base), flush=True)
    llmc = ours = None
    if not args.no_llmc:
        llmc = run_llmcompressor(args.llmc_python, args.nsamples, args.seqlen, args.threads)
        if "error" not in llmc:
            cell = {"label": "gptq (down_proj float)", "method": "gptq", "scheme": "w4g32-asym", "options": {},
                    "calib": "bundled", "ignore": ["lm_head", *LLMC_IGNORE], "nsamples": args.nsamples,
                    "seqlen": args.seqlen, "threads": args.threads}
            ours = in_fresh_process(run_cell, cell)
        print("llm-compressor:", llmc, flush=True)
    write_report(args.out, base, rows, llmc, ours, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
