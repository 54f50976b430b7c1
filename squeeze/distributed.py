"""Data-parallel calibration over torch.distributed.

    torchrun --nproc-per-node 2 -m squeeze quantize --method gptq model/ -o out/
    squeeze quantize --workers 2 --method gptq model/ -o out/      # the same, launched for you

Every rank holds the same block and runs its share of the calibration batches through it (batch i goes to
rank i mod N). The per-layer statistics (GPTQ/AWQ Hessians and input energies, SmoothQuant's channel maxima,
activation ranges) are combined across ranks before any layer is quantized, so every rank computes the same
update from the same numbers; rank 0 alone writes the journal and the checkpoint. Backends: gloo on CPUs,
NCCL when the ranks calibrate on CUDA devices (one device per rank).

The combined statistics equal the single-process ones up to floating-point summation order (sums of
per-rank sums instead of one running sum); tests/test_distributed.py counts the codes that differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from squeeze.errors import SqueezeError


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the calibration ranks."""

    rank: int
    world: int

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def share(self, n_batches: int) -> list[int]:
        """The calibration batches this rank runs."""
        return list(range(self.rank, n_batches, self.world))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def sum_int(self, value: int) -> int:
        return int(self.sum_(torch.tensor([value], dtype=torch.int64)).item())

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order."""
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()


def from_environment() -> DataParallel | None:
    """The data-parallel group torchrun started this process in (its RANK/WORLD_SIZE variables), joined on
    first use; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if not torch.distributed.is_available():
        raise SqueezeError("this PyTorch build has no torch.distributed; run squeeze quantize without torchrun")
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return DataParallel(torch.distributed.get_rank(), torch.distributed.get_world_size())


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
