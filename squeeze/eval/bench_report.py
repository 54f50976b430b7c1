"""Write a bench report: report.json, report.md and report.html with PNG plots beside them."""

from __future__ import annotations

import html
import json
from pathlib import Path

from squeeze.eval.device import device_line
from squeeze.eval.report import COLUMNS, markdown_table

BENCH_COLUMNS = ("method", "scheme", "format", "type", "runtime", "ppl", "kld", "top1_agreement", "task_accuracy",
                 "size_bytes", "p50_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes")
PLOTS = {
    "ppl_vs_size.png": ("size_bytes", "size on disk (KiB)", 1 / 1024),
    "ppl_vs_decode_latency.png": ("decode_ms_per_token", "decode latency (ms / token)", 1.0),
}


def _label(row: dict) -> str:
    kind = row["format"] if row.get("type", "-") == "-" else f"{row['format']}:{row['type']}"
    return f"{row['method']} {row.get('scheme', '-')} {kind}".replace(" -", "")


def write_plots(rows: list[dict], out_dir: Path) -> list[str]:
    """One scatter per entry of PLOTS: perplexity against size / decode latency, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r and r.get("ppl") is not None]
    names = []
    for name, (key, xlabel, scale) in PLOTS.items():
        points = [(r[key] * scale, r["ppl"], _label(r)) for r in done if r.get(key) is not None]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for x, y, label in points:
            ax.scatter([x], [y], s=36)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_title(f"perplexity vs {xlabel.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        names.append(name)
    return names


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """report.json, report.md, report.html and the plots, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    columns = [c for c in BENCH_COLUMNS if any(r.get(c) is not None for r in rows)]
    if any("error" in r for r in rows):
        columns.append("error")
    plots = write_plots(rows, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    settings = report["config"]["latency"]
    intro = [
        f"# squeeze bench: {report['name']}",
        "",
        f"Model `{report['model']}`; data `{report['config']['data']}`"
        + (f"; task `{report['config']['task']}`" if report["config"].get("task") else "") + ".",
        f"Device: {device_line(report['device'])}.",
        f"Latency: batch {settings['batch']}, prompt {settings['prompt_tokens']} tokens, "
        f"{settings['new_tokens']} new tokens, {settings['warmup']} warm-up + {settings['runs']} timed runs. "
        "KLD and top-1 agreement are against the float model.",
        "",
    ]
    md = intro + [markdown_table(rows, columns), ""] + [f"![{p}]({p})" for p in plots] + [""]
    (out_dir / "report.md").write_text("\n".join(md))
    head = "".join(f"<th>{html.escape(COLUMNS[c][0])}</th>" for c in columns)
    body = ""
    for r in rows:
        cells = ("-" if r.get(c) is None else COLUMNS[c][1](r[c]) for c in columns)
        body += "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>\n"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>squeeze bench</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
        "text-align:right}</style></head><body>"
        + "".join(f"<p>{html.escape(line.lstrip('# '))}</p>" for line in intro if line)
        + f"<table><tr>{head}</tr>\n{body}</table>"
        + "".join(f"<p><img src='{p}' alt='{p}'></p>" for p in plots)
        + "</body></html>\n"
    )
    (out_dir / "report.html").write_text(page)
    return [out_dir / n for n in ("report.json", "report.md", "report.html", *plots)]
