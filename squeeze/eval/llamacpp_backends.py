"""llama.cpp from Python through either of two bindings, chosen from an explicit table.

`BACKENDS` lists them in order of preference: llama-cpp-python (pip compiles it from source unless a
wheel is at hand) when it is installed, else llama-cpp-py-sync (a prebuilt wheel: cffi bindings of
libllama). Each opens a GGUF file as a `LlamaModel` (float32 logits for every position of the tokens
it is given, with a KV cache that `reset` empties), tokenizes with the file's own vocabulary, and runs
llama.cpp's quantizer. The two cannot share a process: their libraries carry the same sonames, so a
process uses the first one it opens.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import os
import platform
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from squeeze.errors import MissingExtraError, SqueezeError


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


class LlamaModel(Protocol):
    """A GGUF file loaded in llama.cpp with one context (single sequence, fixed threads)."""

    n_vocab: int

    def reset(self) -> None:
        """Empty the KV cache: the next ``decode`` starts at position 0."""

    def decode(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; float32 logits [len(tokens), n_vocab], one row per position."""

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """``text`` in the file's vocabulary; ``add_bos`` adds BOS only where the vocabulary asks for it."""


class LlamaCppPython:
    """llama-cpp-python (ctypes): its high-level Llama keeps every position's logits (logits_all)."""

    name = "llama-cpp-python"
    module = "llama_cpp"

    def load(self):
        """The imported package; SqueezeError saying why when its library does not load here."""
        try:
            return importlib.import_module(self.module)
        except (ImportError, OSError, RuntimeError) as e:
            raise SqueezeError(f"{self.name} is installed but does not load here: {e}") from None

    def open(self, path: Path, n_ctx: int, n_threads: int, vocab_only: bool = False) -> LlamaModel:
        llama_cpp = self.load()
        try:
            if vocab_only:
                llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            else:
                llm = llama_cpp.Llama(
                    str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                    n_threads=n_threads, n_threads_batch=n_threads, seed=0,
                )
        except ValueError as e:
            raise SqueezeError(f"llama.cpp could not load {str(path)!r}: {e}") from None
        return _LlamaCppPythonModel(llm)

    def quantize(self, src: Path, out: Path, ftype: int, pure: bool, n_threads: int = 1) -> None:
        import ctypes

        llama_cpp = self.load()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread, params.pure = ftype, n_threads, pure
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise SqueezeError(f"llama.cpp could not quantize {str(src)!r}")

    def ggml_base_library(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "lib", "libggml-base.so*")))
        return Path(found[0]) if found else None


class _LlamaCppPythonModel:
    def __init__(self, llm):
        self._llm = llm
        self.n_vocab = llm.n_vocab()

    def reset(self) -> None:
        self._llm.reset()

    def decode(self, tokens: list[int]) -> np.ndarray:
        start = self._llm.n_tokens
        self._llm.eval(tokens)
        return np.array(self._llm.scores[start:start + len(tokens)], dtype=np.float32)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


class LlamaCppPySync:
    """llama-cpp-py-sync (cffi, ABI mode): squeeze drives libllama itself, since the package's Llama keeps
    only the last position's logits. One batch holds the whole window, every position marked for output."""

    name = "llama-cpp-py-sync"
    module = "llama_cpp_py_sync"

    def load(self):
        """(lib, ffi) of libllama; SqueezeError saying why when the library does not load here (its Linux
        wheels need glibc >= 2.38, whatever their manylinux tag says)."""
        try:
            bindings = importlib.import_module(f"{self.module}._cffi_bindings")
            lib, ffi = bindings.get_lib(), bindings.get_ffi()
        except (ImportError, OSError, RuntimeError) as e:
            glibc = re.search(r"version `(GLIBC_[\d.]+)' not found", str(e))
            reason = (f"it needs {glibc[1]}, this system has glibc {platform.libc_ver()[1]}" if glibc
                      else str(e).split(".  ")[0])  # cffi appends a long second sentence
            raise SqueezeError(f"{self.name} is installed but its library does not load here ({reason}); "
                               "install llama-cpp-python instead (pip compiles it: about 4 minutes on 2 cores "
                               "this way): CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install llama-cpp-python") from None
        lib.llama_backend_init()
        return lib, ffi

    def open(self, path: Path, n_ctx: int, n_threads: int, vocab_only: bool = False) -> LlamaModel:
        lib, ffi = self.load()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.vocab_only = vocab_only
        model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if model == ffi.NULL:
            raise SqueezeError(f"llama.cpp could not load {str(path)!r}")
        ctx = ffi.NULL
        if not vocab_only:
            params = lib.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_ctx, n_ctx, 1
            params.n_threads, params.n_threads_batch = n_threads, n_threads
            params.flash_attn_type = 0  # disabled, as llama-cpp-python's default: the same kernels every run
            ctx = lib.llama_init_from_model(model, params)
            if ctx == ffi.NULL:
                lib.llama_model_free(model)
                raise SqueezeError(f"llama.cpp could not create a context of {n_ctx} tokens for {str(path)!r}")
        return _PySyncModel(lib, ffi, model, ctx, n_ctx)

    def quantize(self, src: Path, out: Path, ftype: int, pure: bool, n_threads: int = 1) -> None:
        lib, ffi = self.load()
        params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
        params.ftype, params.nthread, params.pure = ftype, n_threads, pure
        if lib.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
            raise SqueezeError(f"llama.cpp could not quantize {str(src)!r}")

    def ggml_base_library(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "libggml-base.so*")))
        return Path(found[0]) if found else None


class _PySyncModel:
    def __init__(self, lib, ffi, model, ctx, n_ctx: int):
        self._lib, self._ffi, self._model, self._ctx, self._n_ctx = lib, ffi, model, ctx, n_ctx
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._n_past = 0

    def reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self._n_past = 0

    def decode(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if self._n_past + n > self._n_ctx:
            raise SqueezeError(f"{self._n_past + n} tokens exceed the llama.cpp context of {self._n_ctx}")
        lib = self._lib
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = self._n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise SqueezeError(f"llama.cpp could not evaluate {n} tokens (llama_decode returned {rc})")
            logits = lib.llama_get_logits(self._ctx)
            out = np.frombuffer(self._ffi.buffer(logits, n * self.n_vocab * 4), dtype=np.float32)
            self._n_past += n
            return out.reshape(n, self.n_vocab).copy()
        finally:
            lib.llama_batch_free(batch)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2
        tokens = self._ffi.new("llama_token[]", capacity)
        n = self._lib.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_bos, False)
        if n < 0:  # the buffer was too small; -n is the count needed
            capacity = -n
            tokens = self._ffi.new("llama_token[]", capacity)
            n = self._lib.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_bos, False)
        return list(self._ffi.unpack(tokens, n))

    def __del__(self):
        with quiet_stderr():  # llama.cpp logs as it frees
            if getattr(self, "_ctx", None) is not None and self._ctx != self._ffi.NULL:
                self._lib.llama_free(self._ctx)
            if getattr(self, "_model", None) is not None:
                self._lib.llama_model_free(self._model)
        self._ctx = self._model = None


# distribution name -> backend, most preferred first
BACKENDS: dict[str, LlamaCppPython | LlamaCppPySync] = {
    "llama-cpp-python": LlamaCppPython(),
    "llama-cpp-py-sync": LlamaCppPySync(),
}


def installed_backends() -> list[str]:
    """Names of the backends whose package is installed (found without importing it)."""
    return [name for name, backend in BACKENDS.items() if importlib.util.find_spec(backend.module) is not None]


def llama_cpp_backend(name: str | None = None) -> LlamaCppPython | LlamaCppPySync:
    """The backend called ``name``, or the most preferred one installed."""
    if name is not None:
        if name not in BACKENDS:
            raise SqueezeError(f"unknown llama.cpp backend {name!r}; known backends: {', '.join(BACKENDS)}")
        if name not in installed_backends():
            raise MissingExtraError(name, "gguf")
        return BACKENDS[name]
    found = installed_backends()
    if not found:
        raise MissingExtraError(" or ".join(reversed(BACKENDS)), "gguf")
    return BACKENDS[found[0]]
