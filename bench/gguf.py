"""Reproduce reports/gguf.md: GGUF export of the bundled stories260K, measured by llama.cpp.

    python bench/gguf.py                 # all types, full eval text (~20-30 min on 2 CPU cores)
    python bench/gguf.py --types q4_0 f32 --out /tmp/gguf.md

For every --type: squeeze's RTN export, and llama.cpp's own quantization (llama_model_quantize of
squeeze's f32 file) of the same model, both scored by llama.cpp (llama-cpp-python) on
calibration/stories260K-samples-eval.txt with ctx 512 (perplexity, and KLD / top-1 agreement against
the float torch model). Then GPTQ checkpoints on the matching integer grids, exported without
re-rounding, against llama.cpp's own q4_0 / q4_k_m.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the gguf package: keep bench/ off the import path so `import gguf` finds gguf-py
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from squeeze import api  # noqa: E402
from squeeze.eval.llamacpp import quiet_stderr  # noqa: E402
from squeeze.exporters.gguf.mixes import MIXES  # noqa: E402
from squeeze.resources import DEFAULT_MODEL, default_eval_text  # noqa: E402

CTX = 512
# calibrated runs: (label, GPTQ scheme, --type, requantize, llama.cpp type to beat). The 172-wide down_proj
# has no 32-weight blocks (llama.cpp writes it F16), so GPTQ leaves it float.
# (GPTQ scheme, exported --type, layers left float): the scheme is the type's grid, or for a mix each
# layer's type under that mix. Single-type schemes leave down_proj (172 inputs, no 32-weight blocks) float;
# the mixes give it F16 themselves.
CALIBRATED = (("q4_0", "q4_0", ("mlp.down_proj",)), ("q4_1", "q4_1", ("mlp.down_proj",)),
              ("q4_k_m", "q4_k_m", ()), ("q5_k_m", "q5_k_m", ()))


def llama_quantize(src: Path, out: Path, qtype: str) -> Path:
    """llama.cpp's own quantization of ``src`` (llama_model_quantize, no imatrix; q4_k etc.: --pure)."""
    from squeeze.eval.llamacpp_backends import llama_cpp_backend

    with quiet_stderr():
        llama_cpp_backend().quantize(src, out, MIXES[qtype].ftype, MIXES[qtype].pure, n_threads=1)
    return out


def measure(path: Path) -> dict:
    r = api.evaluate(path, default_eval_text(), reference=DEFAULT_MODEL, ctx=CTX, progress=False)
    return {"ppl": r.ppl, "kld": r.kld, "top1": r.top1_agreement, "size": path.stat().st_size}


def export(src: Path, out: Path, qtype: str, requantize: bool = False) -> Path:
    artifact = api.export(src, "gguf", out, overwrite=True, qtype=qtype, requantize=requantize)
    return artifact.path


def gptq_checkpoint(scheme: str, ignore: tuple[str, ...], out: Path) -> Path:
    """GPTQ (defaults: 128 x 512 tokens of the bundled calibration text); reused if ``out`` already holds it."""
    from squeeze.passes.gptq import GPTQ
    from squeeze.scheme import get_scheme

    if (out / "config.json").is_file():
        return out
    return api.quantize_dir(DEFAULT_MODEL, out, GPTQ(scheme=get_scheme(scheme), ignore=ignore), overwrite=True)


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types and bytes."""
    from gguf import GGUFReader

    def read(p):
        return {t.name: (t.tensor_type, bytes(t.data.reshape(-1).view("uint8"))) for t in GGUFReader(str(p)).tensors}

    return read(a) == read(b)


def fmt_row(label: str, m: dict, base_ppl: float) -> str:
    delta = 100 * (m["ppl"] / base_ppl - 1)
    return (f"| {label} | {m['ppl']:.4f} | {delta:+.3f}% | {m['kld']:.3g} | {100 * m['top1']:.2f}% "
            f"| {m['size']:,} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=list(MIXES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/squeeze-bench-gguf"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "gguf.md")
    ap.add_argument("--no-gptq", action="store_true")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch_fp32 = api.evaluate(DEFAULT_MODEL, default_eval_text(), ctx=CTX, progress=False).ppl
    f32 = export(DEFAULT_MODEL, args.work / "squeeze-f32.gguf", "f32")
    head = "| file | llama.cpp ppl | Δ vs torch fp32 | KLD | top-1 | bytes |\n|---|---|---|---|---|---|"
    lines = [f"torch fp32 perplexity (squeeze.evaluate): **{torch_fp32:.4f}**", "", head]
    versus = ["| type | squeeze RTN ppl | llama.cpp ppl | squeeze KLD | llama.cpp KLD | identical tensors | better |",
              "|---|---|---|---|---|---|---|"]
    own: dict[str, dict] = {}
    identical: dict[str, bool] = {}
    for t in args.types:
        path = f32 if t == "f32" else export(DEFAULT_MODEL, args.work / f"squeeze-{t}.gguf", t)
        m = measure(path)
        lines.append(fmt_row(f"squeeze {t}", m, torch_fp32))
        if MIXES[t].default[0] == "Q":
            theirs = llama_quantize(f32, args.work / f"llamacpp-{t}.gguf", t)
            # identical tensors in the same deterministic runtime give identical numbers: measured once
            same = same_tensors(path, theirs)
            own[t] = {**m, "size": theirs.stat().st_size} if same else measure(theirs)
            identical[t] = same
            lines.append(fmt_row(f"llama.cpp {t}" + (" (identical tensors)" if same else ""), own[t], torch_fp32))
            better = "squeeze" if m["kld"] < own[t]["kld"] else "llama.cpp" if m["kld"] > own[t]["kld"] else "tie"
            versus.append(f"| {t} | {m['ppl']:.4f} | {own[t]['ppl']:.4f} | {m['kld']:.3g} | {own[t]['kld']:.3g} "
                          f"| {'yes' if same else 'no'} | {better} |")
        print(lines[-1], flush=True)
    calibrated = ["| file | llama.cpp ppl | Δ vs torch fp32 | KLD | top-1 | bytes |", "|---|---|---|---|---|---|"]
    if args.no_gptq:
        calibrated = ["(skipped: --no-gptq)"]
    else:
        for scheme, t, ignore in CALIBRATED:
            ckpt = gptq_checkpoint(scheme, ignore, args.work / f"gptq-{scheme}")
            m = measure(export(ckpt, args.work / f"gptq-{t}.gguf", t))
            calibrated.append(fmt_row(f"squeeze GPTQ --scheme {scheme} -> {t}", m, torch_fp32))
            if t not in own:
                own[t] = measure(llama_quantize(f32, args.work / f"llamacpp-{t}.gguf", t))
            calibrated.append(fmt_row(f"llama.cpp {t}", own[t], torch_fp32))
            print(calibrated[-2], flush=True)
    text = REPORT.format(table="\n".join(lines), versus="\n".join(versus), calibrated="\n".join(calibrated),
                         minutes=(time.time() - start) / 60, ctx=CTX, types=" ".join(args.types))
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


REPORT = """# GGUF export: stories260K measured by llama.cpp

Reproduce with `python bench/gguf.py --types {types}` ({minutes:.0f} min on this machine; without
--types it measures every type). Model: the bundled
stories260K (Llama, hidden 64, FFN 172, 5 layers, tied embeddings). Every number is measured by
llama.cpp (llama-cpp-python, CPU) on `calibration/stories260K-samples-eval.txt` (80,298 scored tokens,
windows of {ctx} tokens); KLD and top-1 agreement are against squeeze's float32 torch model.

Hidden size 64 means no row of this model is a multiple of 256: every K-quant tensor falls back as
llama.cpp's own quantizer does (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and the
172-wide ffn_down falls back to F16 in every quantized type. So the K mixes here test the mix rules and
fallbacks; the K-quant codecs themselves are tested on a hidden-256 model in tests/exporters.

## Every type (squeeze RTN, and llama.cpp's own quantization of squeeze's f32 file)

{table}

## squeeze RTN vs llama.cpp's quantizer

The same per-tensor types in both files (squeeze follows llama.cpp's mix rules); squeeze's codecs
reproduce llama.cpp's reference quantizers bit for bit. Where the two files hold identical tensors
(names, types, bytes) the llama.cpp file is not scored again: the runtime is deterministic, so its
numbers are the squeeze file's.

{versus}

## Calibrated GGUF (GPTQ on the block grid, written without re-rounding)

GPTQ with a GGUF scheme rounds onto llama.cpp's own block grid: each block's scales (and mins) are
fitted by llama.cpp's reference quantizer, then GPTQ chooses every code on that fixed grid. `q4_0` is
stored in the checkpoint's GPTQ layout (d and the fixed zero 8); `q4_1` and the K types, whose blocks
carry mins or quantized sub-block scales, are stored as the GGUF blocks themselves. A mix scheme
(`--scheme q4_k_m`) calibrates each layer on the type llama.cpp's mix gives it, shape fallbacks
included, so `squeeze export --to gguf` writes every calibrated tensor without re-rounding (no
--requantize anywhere below). On this model q4_k_m means Q5_0 for most tensors (the Q4_K fallback) and
Q8_0 for attn_v in layers 2 and 4 (Q6_K's fallback); q5_k_m means Q5_1 and Q8_0. down_proj (172 inputs,
no 32-weight blocks; F16 in every file) stays float. GPTQ: 128 windows x 512 tokens of the bundled
calibration text, damp 0.01, no act-order. The K-quant grids themselves (256-weight super-blocks) need
rows of 256: tests/exporters/test_gguf_schemes.py runs GPTQ/AWQ on Q4_K/Q6_K there (hidden-256 model).

{calibrated}
"""

if __name__ == "__main__":
    sys.exit(main())
