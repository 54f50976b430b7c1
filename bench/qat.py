"""Reproduce reports/qat.md: QAT with distillation against its GPTQ start, and distillation after pruning.

    python bench/qat.py              # the stories260K cells (a few minutes on 2 CPU cores)
    python bench/qat.py --smollm2    # also SmolLM2-135M (about an hour of training per cell on 2 CPU cores)
    python bench/qat.py --fresh      # measure again instead of reusing finished cells

stories260K: GPTQ on each scheme, then `squeeze quantize --method qat` on the same scheme (GPTQ start,
distillation against the float model on the bundled calibration text; and with `--calib self`, sequences
sampled from the model), scored by `squeeze eval` on the bundled evaluation text. The share of GPTQ's
perplexity gap to fp32 that QAT recovers is (gptq - qat) / (gptq - fp32).

SmolLM2-135M (float32, WikiText-2 test first 300 lines, windows of 512): QAT+KD at w3g64 from GPTQ's
result; and the model with 25% of its FFN channels removed (bench/structured.py) distilled from the dense
model, with its llama.cpp decode speed (Q8_0) against the dense model's in one run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.models import cache_dir, smollm2_dir, wikitext_lines  # noqa: E402
from bench.prune import arguments  # noqa: E402
from bench.smollm2 import CTX, EVAL_LINES, Cells  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import SELF, CalibConfig  # noqa: E402
from squeeze.resources import DEFAULT_MODEL, default_eval_text  # noqa: E402

STORIES_SCHEMES = ("w3g32", "w2g32")
STORIES_CALIB = CalibConfig(nsamples=128, seqlen=256)
STORIES_TRAIN = {"steps": 300, "batch_size": 8, "lr": 1e-4}
SMOLLM2_SCHEME = "w3g64"
# SmolLM2 is a general-domain model scored on Wikipedia text: it trains on sequences sampled from itself (the
# LLM-QAT recipe, no data needed) rather than the bundled children's stories; GPTQ, the QAT start, sees the same
SMOLLM2_CALIB = CalibConfig(SELF, nsamples=256, seqlen=512)
# bench/structured.py's pruned model (its calibration: the bundled stories, default windows)
SMOLLM2_PRUNE_CALIB = CalibConfig()
# 120 steps x 2048 tokens: about 30 minutes of training per cell on 2 CPU cores (bfloat16 autocast)
SMOLLM2_TRAIN = {"steps": 120, "batch_size": 2, "grad_accum": 2, "lr": 1e-5, "precision": "bfloat16"}
# the pruned model's weights are all float and far from the teacher: a larger step, and more steps (a
# distillation step costs about half a QAT step: 300 steps are about 45 minutes, inside the 60-minute budget)
SMOLLM2_DISTILL = {"steps": 300, "lr": 1e-4}


def _training(out: Path) -> dict:
    log = json.loads((out / "squeeze.json").read_text())["training"][-1]
    return {"train_steps": log["steps"], "train_tokens": log["tokens"], "train_seconds": log["seconds"],
            "best_step": log["best_step"], "loss_first": log["loss"][0], "loss_last": log["loss"][-1]}


def stories_cells(work: Path, fresh: bool) -> list[dict]:
    from squeeze.passes.distill import QAT
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    store, text = Cells(work / "stories", fresh), default_eval_text()
    ppl = lambda model: api.evaluate(model, text, progress=False).ppl  # noqa: E731
    rows = [store.get("fp32", lambda: {"name": "fp32", "ppl": ppl(DEFAULT_MODEL)})]
    for scheme in STORIES_SCHEMES:
        def gptq(scheme=scheme):
            out = work / f"stories-gptq-{scheme}"
            api.quantize_dir(DEFAULT_MODEL, out, GPTQ(scheme=get_scheme(scheme)), STORIES_CALIB, overwrite=True)
            return {"name": f"gptq {scheme}", "scheme": scheme, "ppl": ppl(out)}
        rows.append(store.get(f"gptq-{scheme}", gptq))
        for data in ("text", SELF):
            def qat(scheme=scheme, data=data):
                out = work / f"stories-qat-{scheme}-{data}"
                calib = STORIES_CALIB if data == "text" else CalibConfig(SELF, STORIES_CALIB.nsamples,
                                                                         STORIES_CALIB.seqlen)
                config = QAT(scheme=get_scheme(scheme), work_dir=str(work / "train"), **STORIES_TRAIN)
                api.quantize_dir(DEFAULT_MODEL, out, config, calib, overwrite=True)
                return {"name": f"qat {scheme}" + (" (self data)" if data == SELF else ""), "scheme": scheme,
                        "ppl": ppl(out), **_training(out)}
            rows.append(store.get(f"qat-{scheme}-{data}", qat))
    return rows


def smollm2_cells(work: Path, fresh: bool) -> list[dict]:
    from squeeze.passes.distill import QAT, Distill
    from squeeze.passes.gptq import GPTQ
    from squeeze.passes.structured import Structured
    from squeeze.scheme import get_scheme

    store, dense, text = Cells(work / "smollm2", fresh), smollm2_dir(), wikitext_lines(EVAL_LINES)
    ppl = lambda model: api.evaluate(model, text, ctx=CTX, progress=False).ppl  # noqa: E731
    rows = [store.get("fp32", lambda: {"name": "fp32", "ppl": ppl(dense)})]

    def gptq():
        out = work / f"smollm2-gptq-{SMOLLM2_SCHEME}"
        api.quantize_dir(dense, out, GPTQ(scheme=get_scheme(SMOLLM2_SCHEME)), SMOLLM2_CALIB, overwrite=True)
        return {"name": f"gptq {SMOLLM2_SCHEME}", "scheme": SMOLLM2_SCHEME, "ppl": ppl(out)}
    rows.append(store.get(f"gptq-{SMOLLM2_SCHEME}", gptq))

    def qat():  # from the GPTQ cell's checkpoint (its layers are quantized: QAT trains them as they are)
        out = work / f"smollm2-qat-{SMOLLM2_SCHEME}"
        config = QAT(scheme=get_scheme(SMOLLM2_SCHEME), teacher=str(dense), work_dir=str(work / "train"),
                     **SMOLLM2_TRAIN)
        api.quantize_dir(work / f"smollm2-gptq-{SMOLLM2_SCHEME}", out, config, SMOLLM2_CALIB, overwrite=True)
        return {"name": f"qat {SMOLLM2_SCHEME}", "scheme": SMOLLM2_SCHEME, "ppl": ppl(out), **_training(out)}
    rows.append(store.get(f"qat-{SMOLLM2_SCHEME}", qat))

    pruned = work / "smollm2-ffn0.75"

    def prune():
        api.quantize_dir(dense, pruned, Structured(ffn=0.75), SMOLLM2_PRUNE_CALIB, overwrite=True)
        return {"name": "ffn 0.75", "ppl": ppl(pruned)}
    rows.append(store.get("ffn0.75", prune))

    def distill():
        out = work / "smollm2-ffn0.75-distilled"
        config = Distill(teacher=str(dense), work_dir=str(work / "train"), **{**SMOLLM2_TRAIN, **SMOLLM2_DISTILL})
        api.quantize_dir(pruned, out, config, SMOLLM2_CALIB, overwrite=True)
        return {"name": "ffn 0.75 distilled", "ppl": ppl(out), **_training(out), **decode_ratio(work, dense, out)}
    rows.append(store.get("ffn0.75-distill", distill))
    dirs = {f"gptq {SMOLLM2_SCHEME}": work / f"smollm2-gptq-{SMOLLM2_SCHEME}",
            f"qat {SMOLLM2_SCHEME}": work / f"smollm2-qat-{SMOLLM2_SCHEME}", "ffn 0.75": pruned,
            "ffn 0.75 distilled": work / "smollm2-ffn0.75-distilled"}
    for row in rows:  # closeness to the fp32 model on the same text, beside perplexity
        if row["name"] in dirs and "kld" not in row:
            res = api.eval_report(dirs[row["name"]], text, reference=dense, ctx=CTX, progress=False)
            row.update(kld=res["kld"], top1=res["top1_agreement"])
            (store.dir / f"{row['cell']}.json").write_text(json.dumps(row, indent=2))
    return rows


def decode_ratio(work: Path, dense: Path, model: Path, rounds: int = 5) -> dict:
    """llama.cpp decode tokens/s (Q8_0) of ``model`` against ``dense``, interleaved round by round."""
    paths = {name: api.export(d, "gguf", work / f"{name}-q8_0.gguf", overwrite=True, qtype="q8_0").path
             for name, d in (("dense", dense), ("distilled", model))}
    samples = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            samples[name].append(api.measure_speed(path, prompt_tokens=64, new_tokens=64, warmup=1,
                                                   runs=2)["decode_tokens_per_s"])
    med = {n: statistics.median(v) for n, v in samples.items()}
    return {"decode_tok_s": med["distilled"], "dense_decode_tok_s": med["dense"],
            "decode_ratio": med["distilled"] / med["dense"]}


def loss_plot(work: Path, out: Path) -> bool:
    """Training loss (a 10-step running mean) and held-out loss of every trained cell, from their squeeze.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(d for d in work.glob("*-qat-*") if (d / "squeeze.json").is_file()) + \
        sorted(d for d in work.glob("*-distilled") if (d / "squeeze.json").is_file())
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for d in runs:
        log = json.loads((d / "squeeze.json").read_text())["training"][-1]
        loss = log["loss"]
        smooth = [sum(loss[max(0, i - 9):i + 1]) / len(loss[max(0, i - 9):i + 1]) for i in range(len(loss))]
        line, = ax.plot(range(1, len(loss) + 1), smooth, label=d.name)
        if log["eval"]:
            ax.plot(*zip(*log["eval"]), "o--", color=line.get_color(), markersize=3, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (KL, top-128)")
    ax.set_yscale("log")
    ax.set_title("training loss (lines, 10-step mean) and held-out loss (dots)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def recovered(rows: list[dict], name: str, start: str) -> str:
    by = {r["name"]: r for r in rows}
    fp32, a, b = by["fp32"]["ppl"], by[start]["ppl"], by[name]["ppl"]
    return f"{(a - b) / (a - fp32):.0%}"


def report(stories: list[dict], smollm2: list[dict] | None) -> str:
    lines = ["# QAT and distillation (issue 14)", "",
             "Made by `python bench/qat.py` (`--smollm2` for the second table). Perplexity by `squeeze eval` in "
             "torch; recovered = the share of the starting point's perplexity gap to fp32 that training closed.", "",
             "## stories260K", "",
             f"Bundled evaluation text; GPTQ and QAT calibrated/trained on the bundled stories text "
             f"({STORIES_CALIB.nsamples} x {STORIES_CALIB.seqlen} tokens; `self`: as many sequences sampled from "
             f"the model). QAT: {STORIES_TRAIN['steps']} steps of {STORIES_TRAIN['batch_size']} sequences, KD "
             "(top-128 logits plus one bin for the rest of the vocabulary, T = 1) against the fp32 model, from GPTQ's codes on the same grid.", "",
             "| model | ppl | recovered of GPTQ's gap | train tokens | train s | held-out best step |",
             "|---|---|---|---|---|---|"]
    for r in stories:
        rec = recovered(stories, r["name"], f"gptq {r['scheme']}") if r["name"].startswith("qat") else "-"
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {rec} | {r.get('train_tokens', '-')} "
                     f"| {r.get('train_seconds', '-')} | {r.get('best_step', '-')} |")
    lines += ["", "q2_k: no stories260K layer can take it (its rows of 64 and 172 weights do not split into "
              "Q2_K's 256-weight super-blocks; llama.cpp falls back to another type for every one of them)."]
    if smollm2:
        t = SMOLLM2_TRAIN
        lines += ["", "## SmolLM2-135M", "",
                  f"WikiText-2 test (first {EVAL_LINES} lines), windows of {CTX}. Training data: "
                  f"{SMOLLM2_CALIB.nsamples} windows of {SMOLLM2_CALIB.seqlen} tokens sampled from SmolLM2 itself "
                  "(temperature 1; GPTQ calibrated on the same windows), 8 held out; "
                  f"{t['steps']} steps of {t['batch_size']} x {t['grad_accum']} windows, {t['precision']} autocast, "
                  f"on 2 CPU cores. QAT starts from the GPTQ row's checkpoint (float parameters lr {t['lr']:g}, "
                  "quantized weights 0.02 grid steps); distillation: "
                  f"{SMOLLM2_DISTILL['steps']} steps, every block parameter at lr {SMOLLM2_DISTILL['lr']:g}, teacher = "
                  "the dense model. KD: top-128 logits plus one bin for the rest of the vocabulary, T = 1. The pruned model is bench/structured.py's (25% of FFN channels by calibration "
                  "activations on the bundled stories). Decode: llama.cpp Q8_0, 64 new tokens, medians of 5 "
                  "interleaved rounds against the dense model in one run.", "",
                  "| model | ppl | recovered | KLD vs fp32 | top-1 vs fp32 | train tokens | train s | decode x dense |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in smollm2:
            rec = "-"
            if r["name"].startswith("qat"):
                rec = recovered(smollm2, r["name"], f"gptq {SMOLLM2_SCHEME}")
            elif r["name"] == "ffn 0.75 distilled":
                rec = recovered(smollm2, r["name"], "ffn 0.75")
            ratio = f"{r['decode_ratio']:.2f}" if "decode_ratio" in r else "-"
            kld = f"{r['kld']:.3f}" if "kld" in r else "-"
            top1 = f"{r['top1']:.1%}" if "top1" in r else "-"
            lines.append(f"| {r['name']} | {r['ppl']:.2f} | {rec} | {kld} | {top1} | {r.get('train_tokens', '-')} "
                         f"| {r.get('train_seconds', '-')} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arguments(__doc__, "qat.md")
    parser.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M cells (hours on 2 CPU cores)")
    args = parser.parse_args()
    work = args.work if args.work != cache_dir() / "bench-prune" else cache_dir() / "bench-qat"
    work.mkdir(parents=True, exist_ok=True)
    stories = stories_cells(work, args.fresh)
    smollm2 = smollm2_cells(work, args.fresh) if args.smollm2 else None
    text = report(stories, smollm2)
    plot = args.report.with_name("qat-loss.png")
    if loss_plot(work, plot):
        text += f"\n![training and held-out loss]({plot.name})\n"
    args.report.write_text(text)
    print(f"wrote {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
