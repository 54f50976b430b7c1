"""llama.cpp runtime (through llama-cpp-python): logits of a GGUF file for token windows.

Windows are evaluated exactly as given (no BOS is inserted), each from an empty KV cache, in one
batch (n_batch >= the window), single-sequence and with a fixed thread count, so results are
deterministic and follow the same protocol as the torch runtime.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.optional import require

DEFAULT_CONTEXT = 2048


def _import_llama_cpp():
    return require("llama_cpp", "gguf", "llama-cpp-python")


def gguf_metadata(path: Path) -> dict:
    """A GGUF file's metadata except the tokenizer arrays (read with gguf-py, without loading tensors)."""
    from squeeze.sources import read_gguf_fields

    fields = read_gguf_fields(path)
    return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.")}


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints load logs from C to fd 2 even with verbose=False; silence them."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


class LlamaCppRuntime:
    """Runs a .gguf file in llama.cpp on the CPU."""

    name = "llama.cpp"

    def __init__(self, path: Path, tokenizer=None, n_threads: int | None = None):
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
        self._llm = None
        self._n_ctx = 0
        self.vocab_size = self._model(min(self.max_context, DEFAULT_CONTEXT)).n_vocab()

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
        llama_cpp = _import_llama_cpp()
        self._llm = None
        with quiet_stderr():
            try:
                self._llm = llama_cpp.Llama(
                    str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                    n_threads=self.n_threads, n_threads_batch=self.n_threads, seed=0,
                )
            except ValueError as e:
                raise SqueezeError(f"llama.cpp could not load {str(self.path)!r}: {e}") from None
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
            llm.eval(row)
            out[i] = llm.scores[:length]
        return torch.from_numpy(out)

    def generate(self, prompt_ids: list[int], n_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (a smoke test that the file generates)."""
        llm = self._model(min(self.max_context, DEFAULT_CONTEXT))
        llm.reset()
        llm.eval(prompt_ids)
        out = []
        for _ in range(n_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        return out


class LlamaCppTokenizer:
    """A GGUF file's own tokenizer run by llama.cpp, called like a transformers tokenizer on one text."""

    def __init__(self, runtime: LlamaCppRuntime):
        self._runtime = runtime

    def __call__(self, text: str, add_special_tokens: bool = True, **_ignored) -> dict:
        if not isinstance(text, str):
            raise SqueezeError("the llama.cpp tokenizer takes one text at a time")
        llm = self._runtime._model(self._runtime._n_ctx or DEFAULT_CONTEXT)
        # add_bos=True adds BOS only where the vocabulary asks for it (tokenizer.ggml.add_bos_token).
        return {"input_ids": llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)}
