"""Reproduce reports/structured.md: structured pruning of SmolLM2-135M, and what it buys in llama.cpp and onnxruntime.

    python bench/structured.py            # every cell (about 40 minutes on 2 CPU cores)
    python bench/structured.py --fresh    # measure again instead of reusing finished cells

Model, evaluation and calibration as in bench/prune.py. Cells: the dense model; 25% of the FFN channels
removed (activation importance, and the weight-norm score for comparison); 4 of the 30 blocks removed; both.
Each pruned directory is loaded by plain transformers (its parameter count checked against the one computed
from its config), scored in torch before any recovery, and exported to GGUF (Q8_0) and ONNX (fp32, KV cache),
both verified against torch by their exporters. Speed: decode tokens/s of every model in llama.cpp and in
onnxruntime (greedy, 64-token prompt, 64 new tokens, on each runtime's KV cache), the models interleaved
round by round in one run; the table gives each model's median as a ratio to the dense model's.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.models import smollm2_dir, wikitext_lines  # noqa: E402
from bench.prune import arguments, scored  # noqa: E402
from bench.smollm2 import CTX, EVAL_LINES, Cells  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig  # noqa: E402

# cell -> Structured options (None: the dense model); exported and timed unless only scored
CELLS = {
    "dense": None,
    "ffn0.75": {"ffn": 0.75},
    "ffn0.75-weight": {"ffn": 0.75, "score": "weight"},
    "layers26": {"layers": 26},
    "ffn0.75-layers26": {"ffn": 0.75, "layers": 26},
}
SCORED_ONLY = ("ffn0.75-weight",)
RUNTIMES = {"llama.cpp": "gguf", "onnxruntime": "onnx"}
ROUNDS, PROMPT, NEW = 5, 64, 64


def params_of(model_dir: Path) -> tuple[int, int]:
    """(parameters computed from config.json, parameters of the model plain transformers loads)."""
    import json

    from transformers import AutoModelForCausalLM

    from squeeze.surgery import parameter_count

    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    return (parameter_count(json.loads((model_dir / "config.json").read_text())),
            sum(p.numel() for p in plain.parameters()))


def artifacts(work: Path, name: str, model_dir: Path) -> dict[str, str]:
    paths = {"gguf": work / f"{name}.gguf", "onnx": work / f"{name}.onnx"}
    api.export(model_dir, "gguf", paths["gguf"], overwrite=True, qtype="q8_0")
    api.export(model_dir, "onnx", paths["onnx"], overwrite=True, kv_cache=True)
    return {k: str(v) for k, v in paths.items()}


def cells(work: Path, fresh: bool) -> list[dict]:
    from squeeze.model import weights_size
    from squeeze.passes.structured import Structured

    store = Cells(work / "structured", fresh)
    dense, text = smollm2_dir(), wikitext_lines(EVAL_LINES)
    rows = []
    for name, options in CELLS.items():
        def measure(name=name, options=options):
            out = dense if options is None else work / f"structured-{name}"
            if options is not None:
                api.quantize_dir(dense, out, Structured(**options), CalibConfig(), overwrite=True)
            computed, loaded = params_of(out)
            row = {"name": name, "params": computed, "params_loaded": loaded, "dir": str(out)}
            if options is None:
                row.update(ppl=api.evaluate(dense, text, ctx=CTX, progress=False).ppl, kld=0.0, top1=1.0,
                           bytes=weights_size(dense))
            else:
                row.update(scored(out, dense, text))
            if name not in SCORED_ONLY:
                row["artifacts"] = artifacts(work, name, out)
            return row
        rows.append(store.get(name, measure))
    return rows


def speed(rows: list[dict], work: Path, fresh: bool) -> dict:
    """Median decode tokens/s per (model, runtime), the models interleaved round by round."""
    store = Cells(work / "structured", fresh)

    def measure():
        timed = [r for r in rows if "artifacts" in r]
        samples: dict[str, dict[str, list[float]]] = {r["name"]: {rt: [] for rt in RUNTIMES} for r in timed}
        for _ in range(ROUNDS):
            for runtime, kind in RUNTIMES.items():
                for r in timed:
                    s = api.measure_speed(r["artifacts"][kind], prompt_tokens=PROMPT, new_tokens=NEW, warmup=1, runs=2)
                    samples[r["name"]][runtime].append(s["decode_tokens_per_s"])
        return {"rounds": ROUNDS, "samples": samples,
                "median": {n: {rt: statistics.median(v) for rt, v in per.items()} for n, per in samples.items()}}

    return store.get("speed", measure)


def report(rows: list[dict], timing: dict) -> str:
    dense = next(r for r in rows if r["name"] == "dense")
    med = timing["median"]
    lines = ["# Structured pruning of SmolLM2-135M (issue 13)", "",
             "Made by `python bench/structured.py`: SmolLM2-135M-Instruct (float32), importance on the bundled "
             "stories text (128 x 512 tokens), WikiText-2 test (first "
             f"{EVAL_LINES} lines, windows of {CTX}) scored by `squeeze eval` in torch, before any recovery "
             "(distillation is issue 14). Decode: greedy, "
             f"{PROMPT}-token prompt, {NEW} new tokens on each runtime's KV cache, median of {timing['rounds']} "
             "rounds with the models interleaved in one run; GGUF Q8_0 in llama.cpp (llama-cpp-python), ONNX "
             "fp32 in onnxruntime (CPU), both exported and verified by squeeze.", "",
             "| model | params | of dense | file bytes | ppl | KLD | top-1 | llama.cpp decode tok/s | x dense "
             "| onnxruntime decode tok/s | x dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["params"] != r["params_loaded"]:
            raise SystemExit(f"{r['name']}: config.json gives {r['params']:,} parameters, transformers loaded "
                             f"{r['params_loaded']:,}")
        cols = [r["name"], f"{r['params']:,}", f"{r['params'] / dense['params']:.3f}", f"{r['bytes']:,}",
                f"{r['ppl']:.2f}", f"{r['kld']:.3f}", f"{r['top1']:.3f}"]
        for rt in RUNTIMES:
            if r["name"] in med:
                cols += [f"{med[r['name']][rt]:.1f}", f"{med[r['name']][rt] / med['dense'][rt]:.2f}"]
            else:
                cols += ["-", "-"]
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "params: computed from each config.json, equal to what `AutoModelForCausalLM.from_pretrained` "
              "loads from the directory (the script checks it). ffn0.75-weight ranks channels by weight norms "
              "instead of calibration activations (same size; scored only). SmolLM2's FFN has 1536 channels: "
              "0.75 keeps 1152 per block (a multiple of 64)."]
    weight = next((r for r in rows if r["name"] == "ffn0.75-weight"), None)
    active = next((r for r in rows if r["name"] == "ffn0.75"), None)
    if weight and active:
        lines += ["", f"Weight norms alone are no guide on SmolLM2: the channels they drop take perplexity to "
                  f"{weight['ppl']:,.0f}, against {active['ppl']:.2f} for the channels the calibration activations "
                  "rank lowest."]
    spread = ("every round of every pruned model was faster than every round of the dense model, in both "
              "runtimes" if _separated(timing) else "the rounds of pruned and dense models overlap")
    lines += ["", f"Speed: the medians over {timing['rounds']} rounds; {spread} (samples in the cell file "
              "`speed.json`)."]
    return "\n".join(lines) + "\n"


def _separated(timing: dict) -> bool:
    """Whether every round of every pruned model beat every round of the dense model, in every runtime."""
    samples = timing["samples"]
    return all(min(v) > max(samples["dense"][rt]) for name, per in samples.items() if name != "dense"
               for rt, v in per.items())


def main() -> None:
    parser = arguments(__doc__, "structured.md")
    parser.add_argument("--cells-only", action="store_true", help="prune, score and export; time nothing yet")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = cells(args.work, args.fresh)
    if args.cells_only:
        return
    args.report.write_text(report(rows, speed(rows, args.work, args.fresh)))
    print(f"wrote {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
