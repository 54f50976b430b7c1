"""Runtimes that turn token windows into logits. Torch now; ONNX Runtime, llama.cpp, ... later."""

from __future__ import annotations

import torch
from torch import nn


class TorchRuntime:
    """Runs a torch causal LM (a Hugging Face model, or any module returning logits)."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        config = getattr(model, "config", None)
        self.vocab_size = getattr(config, "vocab_size", None)
        self.max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids.to(self.device))
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float().cpu()
