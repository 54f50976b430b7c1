"""Calibration activations kept on disk when they would not fit the memory budget.

The runner holds the hidden states of every calibration batch between blocks (one buffer, overwritten
block by block). `OffloadedBatches` is the same list kept as one file per batch: a batch is read when a
block runs on it and written back when the block's output replaces it, so memory holds one batch at a time.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

# Activations are kept on disk (with no --offload-activations given) once they would take more than this
# share of the memory available when the run starts.
AUTO_OFFLOAD_SHARE = 0.25


class OffloadedBatches:
    """A list of tensors stored as files in ``directory`` (which must exist); read back onto ``device``."""

    def __init__(self, directory: Path, device: torch.device | str = "cpu", label: str = "hidden", count: int = 0):
        self.directory, self.device, self.label = Path(directory), torch.device(device), label
        self._count = count  # with count > 0, items must be set before they are read

    def _file(self, i: int) -> Path:
        return self.directory / f"{self.label}-{i:06d}.pt"

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if not -self._count <= i < self._count:
            raise IndexError(i)
        return torch.load(self._file(i % self._count), map_location=self.device, weights_only=True)

    def __setitem__(self, i: int, tensor: torch.Tensor) -> None:
        if not -self._count <= i < self._count:
            raise IndexError(i)
        staged = self._file(i % self._count).with_suffix(".partial")
        torch.save(tensor.detach().cpu().clone(), staged)
        os.replace(staged, self._file(i % self._count))

    def append(self, tensor: torch.Tensor) -> None:
        self._count += 1
        self[self._count - 1] = tensor

    def __iter__(self):
        return (self[i] for i in range(self._count))

    def copy(self, label: str) -> "OffloadedBatches":
        """The same tensors under another label in the same directory."""
        other = OffloadedBatches(self.directory, self.device, label)
        for t in self:
            other.append(t)
        return other

    def sibling(self) -> "OffloadedBatches":
        """An empty list of the same length under the other of two labels (block outputs beside their inputs)."""
        label = self.label[:-1] if self.label.endswith("~") else self.label + "~"
        return OffloadedBatches(self.directory, self.device, label, self._count)


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps freed pages of tensors below its mmap threshold
    (which rises as large tensors are freed), so without this RSS creeps up block by block."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_ALLOCATION_BYTES = 8 * 2**20


def map_large_allocations(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Ask glibc to serve every allocation of ``threshold`` bytes or more with its own mapping, unmapped when
    freed (True if it took). By default the threshold rises up to 32 MiB as large tensors are freed, and the
    8-32 MiB tensors of a calibration pass then fragment the heap: on a 1.1B model's GPTQ block the peak was
    2.21 GB with glibc's default and 1.96 GB with 8 MiB (the page faults of fresh mappings cost a few percent
    of the block's time). For the rest of the process."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def should_offload(activation_bytes: int) -> bool:
    """Whether activations of this size go to disk when the user did not say."""
    available = available_memory_bytes()
    return available is not None and activation_bytes > AUTO_OFFLOAD_SHARE * available
