"""GPTQ w4g32-asym through llm-compressor, for bench/quality.py (runs in an interpreter that has llmcompressor).

    python bench/llmc_gptq.py MODEL_DIR CALIB_IDS.pt OUT_DIR IGNORE1,IGNORE2 [BITS,GROUP,sym|asym,ACTORDER]

Writes OUT_DIR/weights.safetensors (the quantized layers' dequantized weights,
which llm-compressor leaves in ``module.weight``) and OUT_DIR/info.json
(wall time of ``oneshot``, peak RSS, version).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main(model_dir: str, calib_file: str, out_dir: str, ignore: str, scheme: str = "4,32,asym,none") -> None:
    """``scheme`` = "bits,group,sym|asym,actorder" (actorder: none, static, group, weight)."""
    import llmcompressor
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.load(calib_file)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    bits, group, symmetry, actorder = scheme.split(",")
    weights = QuantizationArgs(num_bits=int(bits), type="int", symmetric=symmetry == "sym", strategy="group",
                               group_size=int(group))
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head", *(f"re:.*{name}" for name in ignore.split(",") if name)],
        block_size=128,
        dampening_frac=0.01,
        actorder=None if actorder == "none" else actorder,
    )
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - start
    quantized = {f"{name}.weight": m.weight.detach().clone().contiguous()
                 for name, m in model.named_modules() if hasattr(m, "weight_scale")}
    save_file(quantized, f"{out_dir}/weights.safetensors")
    info = {"quant_s": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "version": llmcompressor.__version__, "layers": len(quantized)}
    with open(f"{out_dir}/info.json", "w") as fh:
        json.dump(info, fh)


if __name__ == "__main__":
    main(*sys.argv[1:6])
