"""Runs an exported .tflite file in the LiteRT interpreter (ai-edge-litert), on the CPU with its default
delegate (XNNPACK), as a deployed app would.

squeeze's token graphs have one fixed sequence length (the file's metadata says which): a shorter window is
padded at the end (causal attention never looks forward; an encoder's padding is masked), a longer one is
refused. A file exported with --kv-cache also has LiteRT-LM's prefill_<len> and decode signatures (the KV
cache as inputs and outputs); scoring uses its whole-window signature, `prefill_decode` the other two.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.eval.token_graph import FixedWindowGraph

METADATA_KEY = "squeeze"


def read_metadata(path: Path) -> dict:
    """The squeeze metadata entry of a .tflite file ({} if it has none), read without unpacking the weights."""
    from ai_edge_litert import schema_py_generated as fb

    raw = Path(path).read_bytes()
    try:
        model = fb.Model.GetRootAs(raw, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == METADATA_KEY.encode():
                return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    except (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError) as e:  # a damaged file: one line
        raise SqueezeError(f"{str(path)!r} is not a readable .tflite file ({type(e).__name__})") from None
    return {}


class TFLiteRuntime(FixedWindowGraph):
    """A .tflite file in the LiteRT interpreter: logits for causal LMs, hidden states for encoders."""

    name = "litert"

    def __init__(self, interpreter, path: Path, metadata: dict, tokenizer=None):
        self.interpreter = interpreter
        self._set_metadata(path, metadata, tokenizer, path.stat().st_size)
        signatures = metadata.get("signatures")
        self.runner = interpreter.get_signature_runner(signatures[0] if signatures else None)
        details = self.runner.get_input_details()
        self.inputs = sorted(details, key=lambda n: _arg_index(n))
        self.input_details = details

    @classmethod
    def from_path(cls, path: Path, threads: int | None = None) -> TFLiteRuntime:
        from squeeze.eval.onnxruntime import _tokenizer_for
        from squeeze.optional import require

        from squeeze.optional import native_output_kept_back

        path = Path(path)
        if path.suffix.lower() != ".tflite" or not path.is_file():
            raise SqueezeError(f"{str(path)!r} is not a .tflite file")
        with native_output_kept_back():  # the runtime's start-up INFO lines
            require("ai_edge_litert", "tflite")
            from ai_edge_litert.interpreter import Interpreter

            metadata = read_metadata(path)
            try:
                interpreter = Interpreter(model_path=str(path), num_threads=threads)
                interpreter.allocate_tensors()  # XNNPACK takes the graph here (and says so)
            except (ValueError, RuntimeError) as e:
                raise SqueezeError(f"LiteRT cannot load {path.name}: {str(e).splitlines()[0]}") from None
        source = metadata.get("source")
        return cls(interpreter, path, metadata, _tokenizer_for(path, {"squeeze.source": source} if source else {}))

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The default signature on ``feeds`` (by input name); outputs by name, in output order. The file's
        batch size is fixed: a larger batch runs in slices of it (the last one padded), as onnxruntime would
        take it whole."""
        batch = {int(self.input_details[n]["shape"][0]) for n in self.inputs if len(self.input_details[n]["shape"])}
        n = len(next(iter(feeds.values())))
        size = batch.pop() if len(batch) == 1 else n
        if size == n:
            return self._invoke(feeds)
        parts = []
        for start in range(0, n, size):
            chunk = {k: np.asarray(v)[start:start + size] for k, v in feeds.items()}
            short = size - len(next(iter(chunk.values())))
            if short:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
            out = self._invoke(chunk)
            parts.append({k: v[:size - short] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner(**{name: np.asarray(feeds[name]).astype(self.input_details[name]["dtype"], copy=False)
                             for name in self.inputs})
        return {k: out[k] for k in sorted(out, key=_arg_index)}

    def first_output(self, *arrays: np.ndarray) -> np.ndarray:
        return next(iter(self._invoke(dict(zip(self.inputs, arrays))).values()))

    def prefill_decode(self, input_ids: torch.Tensor, prefill_len: int) -> torch.Tensor:
        """Through the prefill and decode signatures: the first ``prefill_len`` tokens prefilled into the KV
        cache, then each later token decoded at its position; the decode logits [1, steps, vocab]."""
        names = self.metadata.get("signatures") or []
        prefill_name = next((n for n in names if n.startswith("prefill_")), None)
        if prefill_name is None or "decode" not in names:
            raise SqueezeError(f"{self.path.name} has no prefill/decode signatures (export with --kv-cache)")
        prefill, decode = (self.interpreter.get_signature_runner(n) for n in (prefill_name, "decode"))
        length = int(prefill_name.split("_")[1])
        if prefill_len != length:
            raise SqueezeError(f"{self.path.name} prefills {length} tokens at a time, not {prefill_len}")
        details = prefill.get_input_details()
        cache_len = int(details["mask"]["shape"][-1])
        ids = input_ids.to(torch.int32).numpy()
        if ids.shape[1] > cache_len:
            raise SqueezeError(f"{ids.shape[1]} tokens do not fit {self.path.name}'s cache of {cache_len}")
        cache = {n: np.zeros(d["shape"], d["dtype"]) for n, d in details.items() if n.startswith("kv_cache_")}

        def mask(positions: np.ndarray) -> np.ndarray:  # additive: each position sees the cache up to itself
            allowed = np.arange(cache_len)[None, :] <= positions[:, None]
            return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]

        pos = np.arange(prefill_len, dtype=np.int32)
        out = prefill(tokens=ids[:, :prefill_len], input_pos=pos, mask=mask(pos), **cache)
        cache = {n: out[n] for n in cache}
        logits = []
        for p in range(prefill_len, ids.shape[1]):
            pos = np.asarray([p], np.int32)
            out = decode(tokens=ids[:, p:p + 1], input_pos=pos, mask=mask(pos), **cache)
            cache = {n: out[n] for n in cache}
            logits.append(out["logits"].reshape(1, 1, -1))
        return torch.from_numpy(np.concatenate(logits, axis=1).astype(np.float32))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.kind != "causal-lm":
            raise SqueezeError(f"{self.path.name} is an {self.kind} graph without logits; perplexity needs a causal LM")
        n = input_ids.shape[1]
        rows = [self.first_output(self._windows(row[None]).numpy())[:, :n] for row in input_ids]
        return torch.from_numpy(np.concatenate(rows).astype(np.float32, copy=False))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """An encoder's last hidden state for each row (padding masked)."""
        n = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [self.first_output(self._windows(ids[None]).numpy(), self._windows(m[None]).numpy())[:, :n]
                for ids, m in zip(input_ids, mask)]
        return torch.from_numpy(np.concatenate(rows).astype(np.float32, copy=False))

    def decode(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding by re-running the whole-window graph (every file has it; see `prefill_decode`)."""
        ids = prompt.to(torch.int64)
        for _ in range(new_tokens):
            ids = torch.cat([ids, self.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids


def _arg_index(name: str) -> tuple[int, str]:
    """args_0, args_1, ... / output_0, ... in their numeric order."""
    tail = name.rsplit("_", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (1 << 30, name)
