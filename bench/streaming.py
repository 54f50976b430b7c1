"""Reproduce reports/streaming.md: peak memory of quantize and export on a model larger than a block-less
design could hold twice, against the checkpoint's own size.

    python bench/streaming.py                  # make the model once (cached), then every step (about an hour)
    python bench/streaming.py --steps rtn      # one step

The model: a Llama-architecture checkpoint of 1.17B parameters (TinyLlama's shape: hidden 2048, FFN 5632,
22 layers, 32 heads, 4 KV heads) with SmolLM2's tokenizer and vocabulary (49152), random weights written
tensor by tensor as float32 safetensors shards of at most 2GB (4.7GB in all). Its quality means nothing;
memory and time do. Each step runs as its own process under /usr/bin/time, which reports the peak RSS.

Steps: rtn (q4_0: 4-bit symmetric groups of 32), gptq (q4_0, 128 x 512 calibration tokens of the bundled stories text), export of
the GPTQ checkpoint (or with --export-source rtn the RTN one: the same layout and sizes) to GGUF and ONNX. Bounds (issue 11): RTN <= 1.5GB; GPTQ and the exports <= half
the float checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.models import cache_dir, smollm2_dir  # noqa: E402
from squeeze.resources import default_calibration_text  # noqa: E402

SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": False, "max_position_embeddings": 2048}
STEPS = ("rtn", "gptq", "gguf", "onnx")
SCHEME = "q4_0"  # 4-bit, groups of 32: GGUF stores it exactly and ONNX as MatMulNBits, so both exports take it
GB = 10**9


def make_model(target: Path) -> Path:
    """The random 1.17B Llama checkpoint (made once, tensor by tensor: never whole in memory)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from squeeze.checkpoint.shards import ShardWriter
    from squeeze.lazy import params_on_meta

    smol = smollm2_dir()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.from_pretrained(smol)
    for key, value in SHAPE.items():
        setattr(config, key, value)
    config.dtype = "float32"
    with no_init_weights(), params_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config)
    writer = ShardWriter(tmp, 2 * GB)
    generator = torch.Generator().manual_seed(0)
    for key, t in skeleton.state_dict().items():
        if key.endswith("norm.weight"):
            value = torch.ones(t.shape)
        else:
            value = torch.randn(t.shape, generator=generator) * 0.02
        writer.add(key, value)
        del value
    writer.close()
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smol / f, tmp / f)
    tmp.rename(target)
    return target


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measured(cmd: list[str]) -> dict:
    """Peak RSS (bytes) and wall seconds of ``cmd`` run under /usr/bin/time."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-3000:]}")
    kb = int(re.findall(r"maxrss_kb=(\d+)", done.stderr)[-1])
    return {"peak_rss_bytes": kb * 1024, "seconds": round(seconds, 1), "command": " ".join(cmd)}


def squeeze_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "squeeze", *[str(a) for a in args]]


def run_step(step: str, model: Path, work: Path, export_source: str = "gptq") -> dict:
    calib = default_calibration_text()
    if step == "rtn":
        return measured(squeeze_cmd("quantize", "--method", "rtn", "--scheme", SCHEME, model,
                                    "-o", work / "rtn", "--overwrite"))
    if step == "gptq":
        return measured(squeeze_cmd("quantize", "--method", "gptq", "--scheme", SCHEME, model,
                                    "-o", work / "gptq", "--calib", calib, "--nsamples", 128, "--seqlen", 512,
                                    "--overwrite"))
    source = work / export_source
    if step == "gguf":
        return measured(squeeze_cmd("export", "--to", "gguf", source, "-o", work / f"{export_source}.gguf", "--overwrite"))
    if step == "onnx":
        return measured(squeeze_cmd("export", "--to", "onnx", source, "-o", work / f"{export_source}.onnx", "--overwrite"))
    raise ValueError(step)


def portable(command: str) -> str:
    """A measured command as a reader would type it: `python`, paths of this checkout relative."""
    command = re.sub(r"^\S*/python3?(\.\d+)?(?=\s)", "python", command)
    return re.sub(r"\S*/(calibration/)", r"\1", command)


def write_report(results: dict, model: Path, out: Path, work: Path) -> None:
    size = checkpoint_bytes(model)
    bounds = {"rtn": 1.5 * GB, "gptq": 0.5 * size, "gguf": 0.5 * size, "onnx": 0.5 * size}
    lines = [
        "# Peak memory of quantize and export, block by block (issue 11)",
        "",
        f"Model: a random-weight Llama checkpoint of 1.17B parameters ({size / GB:.2f} GB float32 safetensors in "
        "2GB shards; TinyLlama's shape with SmolLM2's 49152-token vocabulary). Made and measured by "
        "`python bench/streaming.py`; each step is one process under /usr/bin/time (peak RSS), one run, on "
        "this 2-core machine.",
        "",
        "| step | peak RSS GB | / checkpoint | bound GB | within | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for step in STEPS:
        if step not in results:
            continue
        r = results[step]
        rss = r["peak_rss_bytes"]
        ok = "yes" if rss <= bounds[step] else "**no**"
        lines.append(f"| {step} | {rss / GB:.2f} | {rss / size:.2f} | {bounds[step] / GB:.2f} | {ok} | {r['seconds']} |")
    lines += ["", "Commands (from the repository root):", ""] + [
        f"- {step}: `{portable(results[step]['command'])}`" for step in STEPS if step in results]
    run_log = work / "gptq" / "squeeze-run.json"
    if "gptq" in results and run_log.is_file():
        blocks = json.loads(run_log.read_text())["blocks"]
        seconds = sorted(b["seconds"] for b in blocks)
        peaks = [b["peak_rss_bytes"] / GB for b in blocks]
        lines += ["", "GPTQ per block (`squeeze-run.json`: seconds, and the process's peak RSS so far after each block):",
                  "", f"- seconds per block: median {seconds[len(seconds) // 2]:.1f}, min {seconds[0]:.1f}, "
                  f"max {seconds[-1]:.1f} ({len(blocks)} blocks)",
                  "- peak RSS after each block (GB): " + ", ".join(f"{p:.2f}" for p in peaks)]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="*", choices=STEPS, default=list(STEPS),
                        help="steps to run (none: rewrite the report from the stored results)")
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-streaming")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "streaming.md")
    parser.add_argument("--export-source", choices=("gptq", "rtn"), default="gptq",
                        help="the checkpoint the export steps read (the same 4-bit layout either way)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / "llama-1.1b-random")
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for step in args.steps:
        print(f"{step} ...", file=sys.stderr, flush=True)
        results[step] = run_step(step, model, args.work, args.export_source)
        print(f"{step}: {results[step]['peak_rss_bytes'] / GB:.2f} GB peak, {results[step]['seconds']} s",
              file=sys.stderr, flush=True)
        results_file.write_text(json.dumps(results, indent=2))
    write_report(results, model, args.report, args.work)
    print(f"wrote {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
