"""llama.cpp runtime: logits of a GGUF file for token windows.

Windows are evaluated exactly as given (no BOS is inserted), each from an empty KV cache, in one
batch (n_batch >= the window), single-sequence and with a fixed thread count, so results are
deterministic and follow the same protocol as the torch runtime. llama.cpp is reached through
llama-cpp-python or llama-cpp-py-sync, whichever is installed (squeeze/eval/llamacpp_backends.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.eval.llamacpp_backends import quiet_stderr

DEFAULT_CONTEXT = 2048


def gguf_metadata(path: Path) -> dict:
    """A GGUF file's metadata except the tokenizer arrays (read with gguf-py, without loading tensors)."""
    from squeeze.sources import read_gguf_fields

    fields = read_gguf_fields(path)
    return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.")}


class LlamaCppRuntime:
    """Runs a .gguf file in llama.cpp on the CPU; ``backend`` names a binding (llamacpp_backends.BACKENDS),
    by default the preferred one installed."""

    name = "llama.cpp"

    def __init__(self, path: Path, tokenizer=None, n_threads: int | None = None, backend: str | None = None):
        from squeeze.eval.llamacpp_backends import llama_cpp_backend

        self.path = Path(path)
        self.tokenizer = tokenizer
        self.size_bytes = self.path.stat().st_size
        # half the cores: ggml's spinning threads get ~10x slower when the machine is oversubscribed
        self.n_threads = n_threads or max(1, min((os.cpu_count() or 2) // 2, 8))
        meta = gguf_metadata(self.path)
        arch = meta.get("general.architecture")
        if arch is None:
            raise SqueezeError(f"{str(self.path)!r} is not a GGUF model (no general.architecture)")
        self.max_context = int(meta.get(f"{arch}.context_length") or DEFAULT_CONTEXT)
        self.backend = llama_cpp_backend(backend)  # before any work: a missing binding is a one-line hint
        self._llm = None
        self._n_ctx = 0
        self.vocab_size = self._model(min(self.max_context, DEFAULT_CONTEXT)).n_vocab

    @classmethod
    def from_path(cls, path: Path) -> "LlamaCppRuntime":
        """The file in llama.cpp; text is tokenized by the model directory beside it (an export's source),
        else by the file's own tokenizer in llama.cpp, as llama-perplexity does."""
        from squeeze.model import load_tokenizer

        beside = Path(path).parent
        runtime = cls(path, tokenizer=load_tokenizer(beside) if (beside / "config.json").is_file() else None)
        if runtime.tokenizer is None:
            runtime.tokenizer = LlamaCppTokenizer(runtime)
        return runtime

    def _model(self, n_ctx: int):
        """The llama.cpp model with a context of at least ``n_ctx`` tokens (re-created if too small)."""
        if self._llm is not None and n_ctx <= self._n_ctx:
            return self._llm
        self._llm = None
        with quiet_stderr():
            self._llm = self.backend.open(self.path, n_ctx, self.n_threads)
        self._n_ctx = n_ctx
        return self._llm

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, L] int64 -> float32 logits [b, L, V]."""
        b, length = input_ids.shape
        if length > self.max_context:
            raise SqueezeError(f"window of {length} tokens exceeds the model's context ({self.max_context})")
        llm = self._model(max(length, min(self.max_context, DEFAULT_CONTEXT)))
        out = np.empty((b, length, self.vocab_size), dtype=np.float32)
        for i, row in enumerate(input_ids.tolist()):
            llm.reset()
            out[i] = llm.decode(row)
        return torch.from_numpy(out)

    def generate(self, prompt_ids: list[int], n_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids``, token by token on llama.cpp's KV cache."""
        llm = self._model(min(self.max_context, max(DEFAULT_CONTEXT, len(prompt_ids) + n_tokens)))
        llm.reset()
        last = llm.decode(list(prompt_ids))[-1]
        out = []
        for _ in range(n_tokens):
            token = int(np.argmax(last))
            out.append(token)
            last = llm.decode([token])[-1]
        return out

    def decode(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding of each row of ``prompt`` [b, L] (what `squeeze.eval.latency` times): [b, L + new]."""
        rows = [row + self.generate(row, new_tokens) for row in prompt.tolist()]
        return torch.tensor(rows, dtype=torch.int64)


class LlamaCppTokenizer:
    """A GGUF file's own tokenizer run by llama.cpp, called like a transformers tokenizer on one text."""

    def __init__(self, runtime: LlamaCppRuntime):
        self._runtime = runtime

    def __call__(self, text: str, add_special_tokens: bool = True, **_ignored) -> dict:
        if not isinstance(text, str):
            raise SqueezeError("the llama.cpp tokenizer takes one text at a time")
        llm = self._runtime._model(self._runtime._n_ctx or DEFAULT_CONTEXT)
        # add_bos=True adds BOS only where the vocabulary asks for it (tokenizer.ggml.add_bos_token).
        return {"input_ids": llm.tokenize(text, add_bos=add_special_tokens)}
