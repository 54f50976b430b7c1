"""What runtimes of fixed-length token graphs (LiteRT, Core ML) share: the file's metadata and window padding."""

from __future__ import annotations

from pathlib import Path

import torch

from squeeze.errors import SqueezeError


class FixedWindowGraph:
    """A token graph exported at one sequence length (its squeeze metadata says which): a shorter window is
    padded at the end (causal attention never looks forward; an encoder's padding is masked), a longer one is
    refused."""

    def _set_metadata(self, path: Path, metadata: dict, tokenizer, size_bytes: int) -> None:
        self.path = path
        self.metadata = metadata
        self.kind = metadata.get("kind", "module")
        self.seq_len = metadata.get("seq_len")
        self.vocab_size = metadata.get("vocab_size")
        self.max_context = self.seq_len
        self.tokenizer = tokenizer
        self.size_bytes = size_bytes

    def _windows(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.seq_len is None:
            raise SqueezeError(f"{self.path.name} is not a token graph squeeze wrote (no sequence length in it)")
        if input_ids.shape[1] > self.seq_len:
            raise SqueezeError(f"{self.path.name} takes windows of at most {self.seq_len} tokens, got "
                               f"{input_ids.shape[1]}; use --ctx {self.seq_len} (or export with a longer --seq-len)")
        return torch.nn.functional.pad(input_ids, (0, self.seq_len - input_ids.shape[1]))
