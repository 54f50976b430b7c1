"""Encoder fidelity: mean-pooled sentence embeddings of a model against its reference, as cosine similarity."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from squeeze.errors import SqueezeError

MAX_TOKENS = 128


@dataclass
class EmbeddingResult:
    embedding_cosine_mean: float
    embedding_cosine_min: float
    sentences: int
    size_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def split_sentences(text: str, limit: int) -> list[str]:
    """Up to ``limit`` sentences of a text (split after . ! ?), in order."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if len(p) > 3][:limit]


def hidden_states(runtime, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [b, L, H] of an encoder runtime (torch module, ONNX graph or TFLite file)."""
    if hasattr(runtime, "hidden"):  # LiteRT
        return runtime.hidden(input_ids, attention_mask)
    if hasattr(runtime, "token_feeds"):  # onnxruntime
        out = runtime.run(runtime.token_feeds(input_ids, attention_mask))
        return torch.from_numpy(next(iter(out.values()))).float()
    with torch.no_grad():
        out = runtime.model(input_ids=input_ids.to(runtime.device), attention_mask=attention_mask.to(runtime.device))
    return out.last_hidden_state.float().cpu()


def embed(runtime, tokenizer, sentences: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled (over real tokens) embeddings [n, H]."""
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS,
                        return_tensors="pt")
        hidden = hidden_states(runtime, enc["input_ids"], enc["attention_mask"])
        mask = enc["attention_mask"].unsqueeze(-1).float()
        chunks.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(chunks)


def evaluate_embeddings(runtime, reference, tokenizer, text: str, limit: int = 256) -> EmbeddingResult:
    sentences = split_sentences(text, limit)
    if not sentences:
        raise SqueezeError("the data file holds no sentences to embed")
    cos = torch.nn.functional.cosine_similarity(embed(runtime, tokenizer, sentences),
                                                embed(reference, tokenizer, sentences), dim=-1)
    return EmbeddingResult(float(cos.mean()), float(cos.min()), len(sentences))
