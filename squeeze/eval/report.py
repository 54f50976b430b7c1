"""Result tables: the same rows printed to a terminal or written as Markdown."""

from __future__ import annotations

from typing import Any, Sequence

# column key -> (header, formatter)
COLUMNS: dict[str, tuple[str, Any]] = {
    "name": ("model", str),
    "method": ("method", str),
    "scheme": ("scheme", str),
    "ppl": ("ppl", lambda v: f"{v:.4f}"),
    "ppl_delta_pct": ("Δppl %", lambda v: f"{v:+.2f}"),
    "kld": ("KLD", lambda v: f"{max(v, 0.0):.5f}"),  # KL >= 0; a float32 -1e-9 prints as 0
    "top1_agreement": ("top-1 agree", lambda v: f"{100 * v:.2f}%"),
    "size_bytes": ("size", lambda v: human_bytes(v)),
    "tokens": ("tokens", str),
    "seconds": ("eval s", lambda v: f"{v:.1f}"),
    "quant_seconds": ("quant s", lambda v: f"{v:.1f}"),
    "format": ("format", str),
    "type": ("type", str),
    "runtime": ("runtime", str),
    "task_accuracy": ("task acc", lambda v: f"{100 * v:.1f}%"),
    "p50_ms": ("fwd p50 ms", lambda v: f"{v:.1f}"),
    "p95_ms": ("fwd p95 ms", lambda v: f"{v:.1f}"),
    "prefill_tokens_per_s": ("prefill tok/s", lambda v: f"{v:.0f}"),
    "decode_tokens_per_s": ("decode tok/s", lambda v: f"{v:.1f}"),
    "peak_rss_bytes": ("peak RSS", lambda v: human_bytes(v)),
    "embedding_cosine_mean": ("mean cosine", lambda v: f"{v:.5f}"),
    "embedding_cosine_min": ("min cosine", lambda v: f"{v:.5f}"),
    "sentences": ("sentences", str),
    "accuracy": ("accuracy", lambda v: f"{100 * v:.2f}%"),
    "samples": ("samples", str),
    "error": ("error", str),
}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cells(rows: Sequence[dict], columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    headers = [COLUMNS[c][0] for c in columns]
    body = [[("-" if r.get(c) is None else COLUMNS[c][1](r[c])) for c in columns] for r in rows]
    return headers, body


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    headers, body = _cells(rows, columns)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(b) for b in body)])


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    headers, body = _cells(rows, columns)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out)
