"""A Llama-family decoder with its KV cache as registered buffers: what Core ML turns into a stateful program.

Core ML (iOS 18) keeps state tensors between predictions (``ct.StateType``); coremltools makes every buffer the
torch program mutates in place a state. So the cache is two float16 buffers (Core ML states are float16)
[layers, 1, kv_heads, cache, head_dim], written at the positions of the tokens of each call and read up to
the last one. Inputs: input_ids [1, q] and an additive causal_mask [1, 1, q, end] (end = tokens in the cache
after this call, so the call's positions are end - q .. end - 1); both lengths are flexible. The forward is
written out from the Hugging Face modules' own layers (projections, norms, rotary embedding, MLP), so every
quantized linear is the checkpoint's, and the export checks it against the Hugging Face forward in torch.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.errors import SqueezeError

STATEFUL_MODEL_TYPES = ("llama", "mistral", "qwen2")  # q/k/v/o projections, rotary embedding, pre-norm MLP


def causal_mask(q: int, end: int) -> torch.Tensor:
    """The additive mask of a call with ``q`` tokens ending at cache position ``end``."""
    return torch.full((q, end), float("-inf")).triu(end - q + 1)[None, None]


class StatefulDecoder(nn.Module):
    """logits = f(input_ids, causal_mask), the KV cache in ``key_cache`` / ``value_cache``."""

    def __init__(self, model: nn.Module, cache_len: int):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "model_type", None) not in STATEFUL_MODEL_TYPES:
            raise SqueezeError(f"--kv-cache for Core ML supports {', '.join(STATEFUL_MODEL_TYPES)} decoders, not "
                               f"{getattr(cfg, 'model_type', None)!r}; export without it (whole-window logits)")
        self.model = model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, 1, self.kv_heads, cache_len, self.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float16))

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        q_len, end = input_ids.shape[1], causal_mask.shape[-1]
        past = end - q_len
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, torch.arange(past, end, device=h.device).unsqueeze(0))
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, q_len, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.key_cache[i, :, :, past:end] = k.to(torch.float16)
            self.value_cache[i, :, :, past:end] = v.to(torch.float16)
            keys = repeat_kv(self.key_cache[i, :, :, :end].to(q.dtype), groups)
            values = repeat_kv(self.value_cache[i, :, :, :end].to(q.dtype), groups)
            scores = q @ keys.transpose(-1, -2) * attn.scaling + causal_mask
            out = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(1, q_len, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h))


@torch.no_grad()
def check_against_model(decoder: StatefulDecoder, model: nn.Module, vocab_size: int, prefill: int,
                        steps: int) -> dict:
    """A seeded window through the stateful forward (prefill, then one token per call) against the Hugging Face
    forward of the whole window: the program Core ML gets computes what the model computes."""
    from squeeze.errors import VerificationError
    from squeeze.exporters.onnx.verify import logits_stats, max_rel_diff

    ids = torch.randint(0, vocab_size, (1, prefill + steps), generator=torch.Generator().manual_seed(0))
    decoder.reset()
    parts = [decoder(ids[:, :prefill], causal_mask(prefill, prefill))]
    for p in range(prefill, prefill + steps):
        parts.append(decoder(ids[:, p : p + 1], causal_mask(1, p + 1)))
    decoder.reset()
    got, ref = torch.cat(parts, dim=1).float(), model(ids).logits.float()
    record = {"max_rel_diff": max_rel_diff(got, ref), **logits_stats(got, ref), "decode_steps_checked": steps}
    if record["top1_agreement"] < 0.99 or record["max_rel_diff"] > 0.05:  # float16 cache: ~1e-3 measured
        raise VerificationError(f"the stateful forward differs from the model's ({record}); --kv-cache cannot "
                                "export this model faithfully")
    return record
