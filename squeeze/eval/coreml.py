"""Runs an exported .mlpackage with Core ML (macOS only: coremltools' Linux wheel has no Core ML runtime).

squeeze's token graphs have one fixed sequence length (`FixedWindowGraph`), as for the TFLite runtime; a
stateful package (--kv-cache) prefills each window into a fresh cache. Elsewhere than macOS, opening a package
fails in one line saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.eval.token_graph import FixedWindowGraph

METADATA_KEY = "squeeze"


def read_metadata(path: Path) -> dict:
    """The squeeze entry of a package's user-defined metadata ({} if none), without loading the model."""
    from squeeze.exporters.coreml.exporter import require_coremltools

    ct = require_coremltools()
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:  # a damaged or foreign package: one line
        raise SqueezeError(f"{str(path)!r} is not a readable Core ML package ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    raw = model.user_defined_metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


class CoreMLRuntime(FixedWindowGraph):
    """A .mlpackage predicted by Core ML: logits for causal LMs, hidden states for encoders."""

    name = "coreml"

    def __init__(self, model, path: Path, metadata: dict, tokenizer=None):
        self.model = model
        self._set_metadata(path, metadata, tokenizer, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
        self.max_context = metadata.get("max_tokens_per_call") or self.seq_len
        self.input_names = list(metadata.get("inputs", []))

    @classmethod
    def from_path(cls, path: Path) -> CoreMLRuntime:
        from squeeze.eval.onnxruntime import _tokenizer_for

        path = Path(path)
        if path.suffix.lower() != ".mlpackage" or not path.is_dir():
            raise SqueezeError(f"{str(path)!r} is not a .mlpackage directory")
        metadata = read_metadata(path)
        if sys.platform != "darwin":
            raise SqueezeError(f"running {path.name} needs Core ML, which only macOS has (this is {sys.platform}); "
                               "its weights were checked at export, evaluate it on a Mac")
        import coremltools as ct

        units = ct.ComputeUnit.CPU_ONLY if metadata.get("precision", "").endswith("fp32") else ct.ComputeUnit.ALL
        model = ct.models.MLModel(str(path), compute_units=units)
        source = metadata.get("source")
        return cls(model, path, metadata, _tokenizer_for(path, {"squeeze.source": source} if source else {}))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.model.predict({k: np.asarray(v) for k, v in feeds.items()})
        return {k: np.asarray(v) for k, v in out.items()}

    def _first(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return next(iter(self.run(feeds).values()))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.kind != "causal-lm":
            raise SqueezeError(f"{self.path.name} is an {self.kind} graph without logits; perplexity needs a causal LM")
        n = input_ids.shape[1]
        if self.metadata.get("stateful"):  # each window prefilled into a fresh KV cache state in one call
            from squeeze.exporters.coreml.stateful import causal_mask

            limit = int(self.metadata["max_tokens_per_call"])
            if n > limit:
                raise SqueezeError(f"{self.path.name} takes at most {limit} tokens per call; use --ctx {limit}")
            output = self.model.get_spec().description.output[0].name
            rows = [np.asarray(self.model.predict({"input_ids": row[None].numpy().astype(np.int32),
                                                   "causal_mask": causal_mask(n, n).numpy()},
                                                  state=self.model.make_state())[output])
                    for row in input_ids]
            return torch.from_numpy(np.concatenate(rows).astype(np.float32, copy=False))
        rows = [self._first({"input_ids": self._windows(row[None]).numpy().astype(np.int32)})[:, :n]
                for row in input_ids]
        return torch.from_numpy(np.concatenate(rows).astype(np.float32, copy=False))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """An encoder's last hidden state for each row (padding masked)."""
        n = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [self._first({"input_ids": self._windows(ids[None]).numpy().astype(np.int32),
                             "attention_mask": self._windows(m[None]).numpy().astype(np.int32)})[:, :n]
                for ids, m in zip(input_ids, mask)]
        return torch.from_numpy(np.concatenate(rows).astype(np.float32, copy=False))
