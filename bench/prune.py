"""Reproduce reports/prune.md: unstructured and 2:4 pruning of SmolLM2-135M, alone and followed by GPTQ.

    python bench/prune.py            # every cell (about half an hour on 2 CPU cores)
    python bench/prune.py --fresh    # measure again instead of reusing finished cells

Model, evaluation and calibration as in bench/smollm2.py: SmolLM2-135M-Instruct dequantized to float32,
the first 300 lines of WikiText-2 test (windows of 512, KLD and top-1 against the dense model), the bundled
stories calibration text (128 windows of 512 tokens: `squeeze prune`'s defaults).

Cells: magnitude, Wanda and SparseGPT at 50% and at 2:4; Wanda and SparseGPT at 50% with OWL's per-block
sparsities (--owl 0.08); then GPTQ w4g128 on the dense model and on the 50% Wanda and SparseGPT models
(pruned weights stay zero through GPTQ; the cell checks it), and SparseGPT pruning and quantizing to w4g128
in one sweep. Zeros change neither the file's size nor any runtime's speed: the table gives bytes to show
it, and no speed column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.models import cache_dir, smollm2_dir, wikitext_lines  # noqa: E402
from bench.smollm2 import CTX, EVAL_LINES, Cells  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"mask": "2:4"}}
THEN_GPTQ = ("wanda", "sparsegpt")
OWL = 0.08
SCHEME = "w4g128"


def prune_config(method: str, pattern: str, **options):
    from squeeze.passes.prune import Magnitude, SparseGPT, Wanda

    return {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}[method](**PATTERNS[pattern], **options)


def scored(out: Path, dense: Path, text: Path) -> dict:
    from squeeze.model import weights_size

    r = api.evaluate(out, text, reference=dense, ctx=CTX, progress=False)
    return {"ppl": r.ppl, "kld": r.kld, "top1": r.top1_agreement, "bytes": weights_size(out)}


def zeros_kept(pruned: Path, quantized: Path) -> bool:
    """Every weight that is zero after pruning is zero after quantization."""
    from squeeze.model import select_linears

    before, after = api.load(pruned), api.load(quantized)
    return all(bool((after.get_submodule(n).dequantized_weight()[m.weight == 0] == 0).all())
               for n, m in select_linears(before).items())


def cells(work: Path, fresh: bool, on_row=None, finished_only: bool = False) -> list[dict]:
    """Every cell, in order of the issue's acceptance first; ``on_row(rows)`` after each one. ``finished_only``:
    the cells already measured, nothing run."""
    store = _Finished(work) if finished_only else Cells(work, fresh)
    missing = getattr(store, "missing", [])
    dense, text = smollm2_dir(), wikitext_lines(EVAL_LINES)
    from squeeze.model import weights_size
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    rows = _Rows(on_row)
    rows.append(store.get("dense", lambda: {"method": "dense", "pattern": "-", "then": "-",
                                            "ppl": api.evaluate(dense, text, ctx=CTX, progress=False).ppl,
                                            "kld": 0.0, "top1": 1.0, "bytes": weights_size(dense)}))
    for pattern in PATTERNS:
        for method in METHODS:
            def measure(method=method, pattern=pattern):
                out = work / f"{method}-{pattern.replace('%', '')}"
                api.quantize_dir(dense, out, prune_config(method, pattern), CalibConfig(), overwrite=True)
                return {"method": method, "pattern": pattern, "then": "-", **scored(out, dense, text)}
            rows.append(store.get(f"{method}-{pattern.replace('%', '')}", measure))

    def gptq(source: Path, out: Path) -> None:
        api.quantize_dir(source, out, GPTQ(scheme=get_scheme(SCHEME)), CalibConfig(), overwrite=True)

    def dense_gptq():
        out = work / f"dense-gptq-{SCHEME}"
        gptq(dense, out)
        return {"method": "dense", "pattern": "-", "then": f"gptq {SCHEME}", **scored(out, dense, text)}

    for method in THEN_GPTQ:
        def measure(method=method):
            pruned, out = work / f"{method}-50", work / f"{method}-50-gptq-{SCHEME}"
            gptq(pruned, out)
            return {"method": method, "pattern": "50%", "then": f"gptq {SCHEME}", **scored(out, dense, text),
                    "zeros_kept": zeros_kept(pruned, out)}
        rows.append(store.get(f"{method}-50-gptq-{SCHEME}", measure))
    rows.append(store.get(f"dense-gptq-{SCHEME}", dense_gptq))

    def joint():
        out = work / f"sparsegpt-50-joint-{SCHEME}"
        api.quantize_dir(dense, out, prune_config("sparsegpt", "50%", scheme=get_scheme(SCHEME)), CalibConfig(),
                         overwrite=True)
        return {"method": "sparsegpt", "pattern": "50%", "then": f"{SCHEME} in the same sweep",
                **scored(out, dense, text)}
    rows.append(store.get(f"sparsegpt-50-joint-{SCHEME}", joint))
    for method in THEN_GPTQ:
        def owl(method=method):
            out = work / f"{method}-50-owl"
            api.quantize_dir(dense, out, prune_config(method, "50%", owl=OWL), CalibConfig(), overwrite=True)
            return {"method": method, "pattern": f"50% owl {OWL}", "then": "-", **scored(out, dense, text)}
        rows.append(store.get(f"{method}-50-owl", owl))
    if missing:
        rows.missing = missing
    return rows


class _Finished(Cells):
    """The cells already measured; the others are left out (None)."""

    def __init__(self, work: Path):
        super().__init__(work, False)
        self.missing: list[str] = []

    def get(self, key: str, measure) -> dict | None:
        if (self.dir / f"{key}.json").is_file():
            return super().get(key, measure)
        self.missing.append(key)
        return None


class _Rows(list):
    """A list that calls ``on_row(self)`` after each append (the report is rewritten as cells finish)."""

    def __init__(self, on_row=None):
        super().__init__()
        self.on_row = on_row
        self.missing: list[str] = []

    def append(self, row) -> None:
        if row is None:  # a cell not measured (finished_only)
            return
        super().append(row)
        if self.on_row is not None:
            self.on_row(list(self))


def report(rows: list[dict]) -> str:
    missing = getattr(rows, "missing", [])
    lines = ["# Pruning SmolLM2-135M: magnitude, Wanda, SparseGPT (issue 13)", "",
             "Made by `python bench/prune.py`: SmolLM2-135M-Instruct (float32), WikiText-2 test (first "
             f"{EVAL_LINES} lines, windows of {CTX}), KLD and top-1 against the dense model, calibration on the "
             "bundled stories text (128 x 512 tokens). Scored by `squeeze eval` in torch.", "",
             "| method | pattern | then | ppl | KLD | top-1 | weight bytes | pruned zeros kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = {True: "yes", False: "**no**"}.get(r.get("zeros_kept"), "-")
        lines.append(f"| {r['method']} | {r['pattern']} | {r['then']} | {r['ppl']:.2f} | {r['kld']:.3f} "
                     f"| {r['top1']:.3f} | {r['bytes']:,} | {kept} |")
    lines += ["", "Anchor (Wanda paper, LLaMA-2-7B, WikiText): dense 5.12; 50% magnitude 14.89, SparseGPT 6.51, "
              "Wanda 6.42; 2:4 magnitude 54.59, SparseGPT 10.17, Wanda 11.02.", "",
              "The pruned checkpoints are as large as the dense one (zeros are stored) and run at the dense speed "
              "in every runtime squeeze exports to; a smaller, faster model needs structured pruning."]
    if missing:
        lines += ["", f"Not measured in this run (`python bench/prune.py` measures them): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def arguments(description: str, report_name: str) -> argparse.ArgumentParser:
    """The flags of the pruning benchmarks (they share the work directory and its SmolLM2 cells)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-prune")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / report_name)
    parser.add_argument("--fresh", action="store_true", help="measure again instead of reusing finished cells")
    return parser


def main() -> None:
    parser = arguments(__doc__, "prune.md")
    parser.add_argument("--finished-only", action="store_true",
                        help="write the report from the cells already measured; run nothing")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = cells(args.work, args.fresh, lambda done: args.report.write_text(report(done)), args.finished_only)
    args.report.write_text(report(rows))
    print(f"wrote {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
