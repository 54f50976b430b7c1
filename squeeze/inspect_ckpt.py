"""What a model directory holds: method, scheme, and bytes per tensor group (read from headers only)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

from squeeze.checkpoint.gptq import read_metadata
from squeeze.eval.report import human_bytes
from squeeze.model import validate_model_dir, weight_files

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_group(key: str, quantized_prefixes: set[str]) -> str:
    """Coarse kind of a tensor, for the size breakdown."""
    prefix, _, leaf = key.rpartition(".")
    if prefix in quantized_prefixes:
        return "quantized linear"
    if "embed" in key or key.startswith(("wte", "wpe")) or ".wte." in key or ".wpe." in key:
        return "embeddings"
    if "lm_head" in key:
        return "lm_head"
    if "norm" in key or key.split(".")[-2:-1] in (["ln_1"], ["ln_2"], ["ln_f"]):
        return "norms"
    return "other float"


def describe(path: str | Path) -> dict:
    p = validate_model_dir(path, allow_pickle=True)  # only safetensors headers are read: nothing is unpickled
    config = json.loads((p / "config.json").read_text())
    shapes: dict[str, tuple[str, list[int]]] = {}
    for f in weight_files(p):
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                shapes[key] = (sl.get_dtype(), sl.get_shape())
    quantized = {k.rsplit(".", 1)[0] for k in shapes if k.endswith((".qweight", ".gguf_blocks"))}
    groups: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for key, (dtype, shape) in shapes.items():
        n = 1
        for d in shape:
            n *= d
        g = groups[tensor_group(key, quantized)]
        g["tensors"] += 1
        g["bytes"] += n * _BYTES.get(dtype, 4)
    meta = read_metadata(p) or {}
    return {
        "path": str(p),
        "model_type": config.get("model_type"),
        "quantization_config": config.get("quantization_config"),
        "method": meta.get("method"),
        "scheme": (meta.get("scheme") or {}).get("name"),
        "calibration": meta.get("calibration"),
        "source_model": meta.get("source_model"),
        "squeeze_version": meta.get("squeeze_version"),
        "quantized_layers": len(quantized),
        "groups": dict(groups),
        "layers": meta.get("layers", {}),
        "training": meta.get("training") or [],
        "file_bytes": sum(f.stat().st_size for f in weight_files(p)),
    }


def format_description(d: dict) -> str:
    qc = d["quantization_config"]
    lines = [f"path:       {d['path']}", f"model_type: {d['model_type']}"]
    pruned = [r for r in d["layers"].values() if "sparsity" in r]
    if pruned:
        share = sum(r["sparsity"] for r in pruned) / len(pruned)
        methods = sorted({r.get("pruned_by", r.get("method")) for r in pruned})
        patterns = sorted({r["pattern"] for r in pruned})
        lines.append(f"pruned:     {len(pruned)} layers by {', '.join(methods)} ({', '.join(patterns)}), "
                     f"mean sparsity {share:.3f}")
    blocks = {n: r for n, r in d["layers"].items() if r.get("method") == "structured"}
    if blocks:
        kept = [r for r in blocks.values() if r.get("kept")]
        dropped = [n for n, r in blocks.items() if not r.get("kept")]
        lines.append(f"structured: {next(iter(blocks.values()))['pattern']}: {len(kept)} of {len(blocks)} blocks kept"
                     + (f" (removed {', '.join(dropped)})" if dropped else "")
                     + (f", {kept[0]['ffn_channels']} FFN channels and {len(kept[0]['kv_heads'])} KV heads per block"
                        if kept else ""))
    for t in d.get("training", []):
        held = "" if t.get("best_step") is None else f", held-out loss best at step {t['best_step']}"
        loss = f", loss {t['loss'][0]:.4f} -> {t['loss'][-1]:.4f}" if t.get("loss") else ""
        lines.append(f"trained:    {t['method']}: {t['steps']} steps, {t['tokens']:,} tokens in {t['seconds']:.0f} s"
                     f"{loss}{held}")
    if qc is None:
        lines.append("quantized:  no (float checkpoint)")
    else:
        lines.append(f"method:     {d['method'] or qc.get('quant_method')}")
        lines.append(f"scheme:     {d['scheme'] or '-'}  (layout: {json.dumps(qc, sort_keys=True)})")
        lines.append(f"layers:     {d['quantized_layers']} quantized")
        if d["calibration"]:
            c = d["calibration"]
            lines.append(f"calibrated: {c['source']} {c['shape']} sha256 {c['sha256'][:12]}")
        if d["source_model"]:
            lines.append(f"source:     {d['source_model']['path']} sha256 {d['source_model']['sha256'][:12]}")
    lines.append(f"size:       {human_bytes(d['file_bytes'])} on disk")
    lines.append("")
    lines.append(f"{'tensor group':<18}{'tensors':>8}{'bytes':>12}")
    for name, g in sorted(d["groups"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"{name:<18}{g['tensors']:>8}{human_bytes(g['bytes']):>12}")
    errors = [(n, r) for n, r in d["layers"].items() if "weight_rel_mse" in r]
    if errors:
        lines.append("")
        out_header = f"{'output rel. MSE':>18}" if any("output_rel_mse" in r for _, r in errors) else ""
        sparse_header = f"{'sparsity':>10}" if pruned else ""
        lines.append(f"{'layer':<40}{'scheme':>14}{'weight rel. MSE':>18}{out_header}{sparse_header}")
        for n, r in errors:
            extra = f"{r['output_rel_mse']:>18.3e}" if "output_rel_mse" in r else (" " * 18 if out_header else "")
            extra += f"{r['sparsity']:>10.3f}" if "sparsity" in r else ""
            lines.append(f"{n:<40}{r.get('scheme', '-'):>14}{r['weight_rel_mse']:>18.3e}{extra}")
    return "\n".join(lines)

