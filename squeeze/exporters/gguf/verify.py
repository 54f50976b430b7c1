"""Export-time verification: llama.cpp's logits for the written file vs squeeze's torch model of the same weights.

The torch reference is the model's own architecture holding the weights the file should contain: each
tensor quantized and dequantized by squeeze's codecs (bit-identical to ggml's dequantizers), or, for
calibrated layers, the checkpoint's own blocks. So quantization error cancels out of the comparison, and
a wrong name, permutation, type or metadata shows up as a large KLD and a low top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from squeeze.errors import SqueezeError, VerificationError
from squeeze.exporters.gguf.codecs import get_codec
from squeeze.exporters.gguf.plan import TensorPlan


@dataclass(frozen=True)
class VerifySettings:
    n_seq: int = 4  # token windows run through both runtimes
    seq_len: int = 64
    min_top1: float = 0.90  # below this the file is broken, not merely quantized


def reference_weight(p: TensorPlan, source) -> torch.Tensor:
    """The float32 weight of plan ``p`` exactly as written, computed from the source in HF row order.

    Independent of the file: a missing q/k permutation or a wrong name in the file makes llama.cpp
    disagree with it (row permutation commutes with row-wise block quantization).
    """
    from squeeze.exporters.gguf.codecs import dequantize_blocks
    from squeeze.exporters.gguf.source import BlockLayer, exact_blocks

    if p.exact:
        layer = source.quant_layer(p.hf_name)
        x = layer.dequantize() if isinstance(layer, BlockLayer) else dequantize_blocks(exact_blocks(layer, p.qtype))
    else:
        codec = get_codec(p.qtype)
        x = codec.dequantize(codec.quantize(source.float_tensor(p.hf_name)))
    return torch.from_numpy(np.ascontiguousarray(x.reshape(p.shape), dtype=np.float32))


@torch.no_grad()
def reference_logits(model_dir: Path, plans: list[TensorPlan], source, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the model's architecture (float32) holding the weights the file should hold, for ``tokens``.

    Run block by block (`squeeze.lazy`): each block's weights are computed when it runs and freed after,
    so the check holds one block and the modules outside the blocks, never the whole float model.
    """
    from squeeze.checkpoint.gptq import set_tensor
    from squeeze.lazy import blocks_on_demand, meta_skeleton, release_all
    from squeeze.model import find_blocks, load_hf_config
    from squeeze.offload import return_freed_memory

    cfg = load_hf_config(model_dir)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = meta_skeleton(cfg, torch.float32)
    keys = set(model.state_dict())
    names = {p.hf_name for p in plans}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    missing = sorted(k for k in keys - names if not (k.startswith("lm_head") and tied))
    unexpected = sorted(names - keys)
    if missing or unexpected:
        raise SqueezeError(f"GGUF weights do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    blocks_name, blocks = find_blocks(model) or ("", nn.ModuleList())
    per_block: dict[int, list[TensorPlan]] = {i: [] for i in range(len(blocks))}
    outside = []
    for p in plans:
        head, _, rest = p.hf_name.partition(blocks_name + ".") if blocks_name else ("-", "", "")
        index = rest.split(".", 1)[0] if head == "" and rest else None
        (per_block[int(index)] if index is not None and index.isdigit() else outside).append(p)

    def load(group: list[TensorPlan]) -> None:
        for p in group:
            set_tensor(model, p.hf_name, reference_weight(p, source))

    def unload(i: int) -> None:
        release_all(blocks[i])
        return_freed_memory()

    load(outside)
    model.tie_weights()  # a tied output layer follows the embedding
    with blocks_on_demand(blocks, lambda i: load(per_block[i]), unload):
        out = model(input_ids=tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def verification_tokens(model_dir: Path, vocab_size: int, settings: VerifySettings) -> torch.Tensor:
    """[n_seq, seq_len] windows of the bundled eval text in the model's tokenizer (seeded random ids without one)."""
    from squeeze.calib import read_text, tokenize_stream
    from squeeze.model import load_tokenizer
    from squeeze.resources import default_eval_text

    tokenizer = load_tokenizer(model_dir)
    need = settings.n_seq * settings.seq_len
    if tokenizer is not None:
        # ~8 characters per token is plenty for English text in any tokenizer; no need to tokenize it all
        stream = tokenize_stream(tokenizer, read_text(default_eval_text())[: need * 8])
        if len(stream) >= need and int(stream.max()) < vocab_size:
            return stream[:need].reshape(settings.n_seq, settings.seq_len)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (settings.n_seq, settings.seq_len), generator=gen)


def verify_gguf(path: Path, model_dir: Path, plans: list[TensorPlan], source, settings: VerifySettings) -> dict:
    """Run the file in llama.cpp and torch; VerificationError when top-1 agreement is below the floor."""
    from squeeze.eval.llamacpp import LlamaCppRuntime
    from squeeze.eval.metrics import LMStats

    runtime = LlamaCppRuntime(path)
    tokens = verification_tokens(model_dir, runtime.vocab_size, settings)
    got = runtime.logits(tokens)
    del runtime
    want = reference_logits(model_dir, plans, source, tokens)
    if want.shape != got.shape:
        raise VerificationError(f"llama.cpp returned logits of shape {tuple(got.shape)}, torch {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise VerificationError("llama.cpp produced non-finite logits for the written file")
    stats, ref_stats = LMStats(), LMStats()
    stats.update(got[:, :-1], tokens[:, 1:], want[:, :-1])
    ref_stats.update(want[:, :-1], tokens[:, 1:])
    result = {
        "runtime": "llama.cpp",
        "kld": float(stats.kld),
        "top1_agreement": float(stats.top1_agreement),
        "ppl_llamacpp": float(stats.ppl),
        "ppl_torch": float(ref_stats.ppl),
        "max_abs_logit_diff": float((got - want).abs().max()),
        "tokens": int(stats.count),
    }
    if result["top1_agreement"] < settings.min_top1:
        raise VerificationError(
            f"llama.cpp's top-1 agreement with squeeze's torch model of the same weights is "
            f"{result['top1_agreement']:.3f} (< {settings.min_top1}), KLD {result['kld']:.4g}: the file is broken; "
            "it was removed (use --no-verify to keep it for debugging)")
    return result
