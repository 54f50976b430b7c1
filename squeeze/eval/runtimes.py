"""Runtimes turn token windows into logits, the same way for every artifact.

`RUNTIMES` maps a runtime name to its class (module imported only when used);
`open_runtime` picks one from the artifact (a model directory -> torch, .gguf ->
llama.cpp, .onnx -> onnxruntime) unless one is forced.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError


class TorchRuntime:
    """Runs a torch causal LM (a Hugging Face model, or any module returning logits)."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", tokenizer=None, size_bytes=None):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.size_bytes = size_bytes
        config = getattr(model, "config", None)
        self.vocab_size = getattr(config, "vocab_size", None)
        self.max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @classmethod
    def from_path(cls, path: Path) -> "TorchRuntime":
        from squeeze.api import load
        from squeeze.model import load_tokenizer, validate_model_dir, weights_size

        path = validate_model_dir(path)
        return cls(load(path), tokenizer=load_tokenizer(path), size_bytes=weights_size(path))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids.to(self.device))
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float().cpu()


# runtime name -> (module, class)
RUNTIMES: dict[str, tuple[str, str]] = {
    "torch": ("squeeze.eval.runtimes", "TorchRuntime"),
    "llama.cpp": ("squeeze.eval.llamacpp", "LlamaCppRuntime"),
}
# file suffix -> runtime name (directories run in torch)
SUFFIX_RUNTIMES: dict[str, str] = {".gguf": "llama.cpp"}


def runtime_for(path: Path) -> str:
    if path.is_dir():
        return "torch"
    if path.suffix.lower() in SUFFIX_RUNTIMES:
        return SUFFIX_RUNTIMES[path.suffix.lower()]
    known = ", ".join(sorted(SUFFIX_RUNTIMES))
    raise SqueezeError(f"cannot tell which runtime runs {str(path)!r}: expected a model directory or a file ending in {known}")


def open_runtime(path: str | Path, runtime: str | None = None):
    """A runtime for the artifact at ``path`` (``runtime`` forces one by name)."""
    p = Path(path)
    if not p.exists():
        raise SqueezeError(f"model path {str(p)!r} does not exist")
    name = runtime or runtime_for(p)
    if name not in RUNTIMES:
        raise SqueezeError(f"unknown runtime {name!r}; known runtimes: {', '.join(sorted(RUNTIMES))}")
    module, cls = RUNTIMES[name]
    return getattr(importlib.import_module(module), cls).from_path(p)
