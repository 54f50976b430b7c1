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
    """Runs a torch model (a Hugging Face model, or any module returning logits); on CUDA when present."""

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
    def from_path(cls, path: Path, allow_pickle: bool = False) -> "TorchRuntime":
        """A model directory, or a GGUF file dequantized to a float model (``--runtime torch``)."""
        from squeeze.api import load
        from squeeze.sources import source_size, source_tokenizer, validate_source

        path = validate_source(path, allow_pickle)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(load(path, allow_pickle=allow_pickle), device, tokenizer=source_tokenizer(path), size_bytes=source_size(path))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids.to(self.device))
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float().cpu()

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the model's KV cache (a plain module re-runs the sequence)."""
        ids = prompt.to(self.device)
        if getattr(self.model, "config", None) is None:
            for _ in range(new_tokens):
                ids = torch.cat([ids, self.logits(ids)[:, -1].argmax(-1, keepdim=True).to(self.device)], dim=1)
            return ids.cpu()
        out = self.model(ids, use_cache=True)
        past = out.past_key_values
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            out = self.model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
        return ids.cpu()  # also waits for the device, so timings include all of the work


# runtime name -> (module, class)
RUNTIMES: dict[str, tuple[str, str]] = {
    "torch": ("squeeze.eval.runtimes", "TorchRuntime"),
    "llama.cpp": ("squeeze.eval.llamacpp", "LlamaCppRuntime"),
    "onnxruntime": ("squeeze.eval.onnxruntime", "OrtRuntime"),
    "tensorrt": ("squeeze.eval.tensorrt", "TensorRTRuntime"),
    "litert": ("squeeze.eval.tflite", "TFLiteRuntime"),
    "coreml": ("squeeze.eval.coreml", "CoreMLRuntime"),
}
# file suffix -> runtime name (directories run in torch)
SUFFIX_RUNTIMES: dict[str, str] = {".gguf": "llama.cpp", ".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt",
                                  ".tflite": "litert", ".mlpackage": "coreml"}


def runtime_for(path: Path) -> str:
    if path.suffix.lower() == ".mlpackage":  # a Core ML package is a directory
        return "coreml"
    if path.is_dir():
        return "torch"
    if path.suffix.lower() in SUFFIX_RUNTIMES:
        return SUFFIX_RUNTIMES[path.suffix.lower()]
    known = ", ".join(sorted(SUFFIX_RUNTIMES))
    raise SqueezeError(f"cannot tell which runtime runs {str(path)!r}: expected a model directory or a file ending in {known}")


def open_runtime(path: str | Path, runtime: str | None = None, allow_pickle: bool = False):
    """A runtime for the artifact at ``path`` (``runtime`` forces one by name; ``allow_pickle``: see squeeze.load)."""
    p = Path(path)
    if not p.exists():
        raise SqueezeError(f"model path {str(p)!r} does not exist")
    name = runtime or runtime_for(p)
    if name not in RUNTIMES:
        raise SqueezeError(f"unknown runtime {name!r}; known runtimes: {', '.join(sorted(RUNTIMES))}")
    module, cls = RUNTIMES[name]
    runtime_cls = getattr(importlib.import_module(module), cls)
    return runtime_cls.from_path(p, allow_pickle) if name == "torch" else runtime_cls.from_path(p)
