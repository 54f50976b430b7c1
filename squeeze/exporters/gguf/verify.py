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


def reference_weights(plans: list[TensorPlan], source) -> dict[str, torch.Tensor]:
    """HF name -> float32 weight exactly as written, computed from the source in HF row order.

    Independent of the file: a missing q/k permutation or a wrong name in the file makes llama.cpp
    disagree with this reference (row permutation commutes with row-wise block quantization).
    """
    from squeeze.exporters.gguf.codecs import dequantize_blocks
    from squeeze.exporters.gguf.source import BlockLayer, exact_blocks

    out = {}
    for p in plans:
        if p.exact:
            layer = source.quant_layer(p.hf_name)
            x = layer.dequantize() if isinstance(layer, BlockLayer) else dequantize_blocks(exact_blocks(layer, p.qtype))
        else:
            codec = get_codec(p.qtype)
            x = codec.dequantize(codec.quantize(source.float_tensor(p.hf_name)))
        out[p.hf_name] = torch.from_numpy(np.ascontiguousarray(x.reshape(p.shape), dtype=np.float32))
    return out


def reference_model(model_dir: Path, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The model's architecture (float32) holding ``weights``; tied output follows the embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    missing = [k for k in missing if not (k.startswith("lm_head") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SqueezeError(f"GGUF weights do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


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
    from squeeze.eval.runtimes import TorchRuntime

    runtime = LlamaCppRuntime(path)
    tokens = verification_tokens(model_dir, runtime.vocab_size, settings)
    got = runtime.logits(tokens)
    del runtime
    reference = TorchRuntime(reference_model(model_dir, reference_weights(plans, source)))
    want = reference.logits(tokens)
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
