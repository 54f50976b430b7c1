"""Replay of a block's unchanged sub-module outputs from one calibration pass over the block to the next.

True-sequential GPTQ runs a block once per group of layers (q/k/v, o, gate/up, down) and once more for its
output, and every pass recomputed everything before the layers it observes. Between two passes only the
layers quantized in between changed; a sub-module that finished before the first of them ran on the same
inputs with the same weights, so its output is the same tensor as last time. `BlockReplay` keeps those
outputs (only the ones the next pass can use, only for modules that own tensors) and returns them instead
of running the module: the matmuls of a block are then computed about once for all passes, not 2-3 times.

Memory: the kept outputs are bounded (``max_bytes``; the runner gives half the size of the block's input
stream, so replay adds at most half to the activations of a large model); a call that would pass the bound is recomputed next time. Only
modules holding a linear layer are kept: a norm's output costs as much memory as an attention block's and
saves almost no time.

Changes are found, not declared: a module whose object or parameters (their version counters) differ from
the previous pass counts as changed, so in-place edits (AWQ's folded scales) and replaced layers
(QuantLinear) both invalidate what ran after them. Every forward of a block visits its modules in the same
order, so a module call is identified by (name, call index) and placed on a tick line of entries and
exits; a replayed call jumps the line to its recorded exit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from squeeze.model import is_linear
from squeeze.modules import QuantLinear

Key = tuple[str, int]  # (module name in the block, call index within one forward)
MAX_DEPTH = 2  # modules at most this deep in the block (self_attn, self_attn.q_proj) are cached


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _fingerprint(module: nn.Module) -> tuple:
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return (id(module), tuple((id(t), t._version) for t in own))


class BlockReplay:
    """Kept outputs of one block's sub-modules across the passes of `collect_inputs` / `run_block`."""

    def __init__(self, block: nn.Module, max_bytes: int | None = None):
        self.block = block
        self.max_bytes = max_bytes  # None: no bound
        self.kept_bytes = 0
        self.span: dict[Key, tuple[int, int]] = {}  # (entry tick, exit tick), the same in every forward
        self.cache: dict[tuple[int, str, int], tuple[Any, tuple[int, ...]]] = {}
        self.fingerprints: dict[str, tuple] = {}
        self.replayed = 0  # module calls served from the cache (for tests and logs)

    def _changes(self) -> int:
        """Tick of the first entry into a module changed since the last pass; forget what came after it."""
        now = {name: _fingerprint(m) for name, m in self.block.named_modules()}
        changed = {n for n, fp in now.items() if self.fingerprints.get(n) != fp}
        self.fingerprints = now
        entries = [enter for (name, _), (enter, _) in self.span.items() if name in changed]
        first = min(entries, default=math.inf)
        self.span = {k: s for k, s in self.span.items() if s[0] < first and s[1] < first}
        self.cache = {k: v for k, v in self.cache.items() if (k[1], k[2]) in self.span}
        self.kept_bytes = sum(_nbytes(output) for output, _ in self.cache.values())
        return first

    @contextmanager
    def pass_(self, observed: set[nn.Module] | None) -> Iterator["_Pass"]:
        """One pass over every batch. ``observed``: the layers whose inputs this pass collects (they change
        before the next pass, so only what ends before the first of them is kept); None keeps nothing."""
        run = _Pass(self, self._changes(), observed)
        with run.hooked():
            yield run


class _Pass:
    def __init__(self, replay: BlockReplay, first_change: float, observed: set[nn.Module] | None):
        self.replay, self.first_change, self.observed = replay, first_change, observed
        self.batch_index = 0
        self.tick = 0
        self.calls: dict[str, int] = {}
        self.current: dict[str, Key] = {}
        self.observed_entered = False

    def batch(self, index: int) -> None:
        self.batch_index, self.tick, self.calls, self.observed_entered = index, 0, {}, False
        self.current = {}

    def _enter(self, name: str, module: nn.Module) -> None:
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        key = (name, call)
        self.tick += 1
        self.current[name] = key
        span = self.replay.span.get(key)
        if span is None:
            self.replay.span[key] = (self.tick, -1)
        if self.observed is not None and module in self.observed:
            self.observed_entered = True

    def _exit(self, name: str, output: Any, cacheable: bool) -> None:
        self.tick += 1
        key = self.current[name]
        enter, _ = self.replay.span[key]
        self.replay.span[key] = (enter, self.tick)
        if cacheable and self.observed is not None and not self.observed_entered:
            slot = (self.batch_index, *key)
            if slot not in self.replay.cache:
                prefix = name + "."
                for old in [s for s in self.replay.cache if s[0] == self.batch_index and s[1].startswith(prefix)]:
                    self.replay.kept_bytes -= _nbytes(self.replay.cache.pop(old)[0])  # the parent's covers them
                size = _nbytes(output)
                if self.replay.max_bytes is None or self.replay.kept_bytes + size <= self.replay.max_bytes:
                    self.replay.cache[slot] = (output, tuple(t._version for t in _tensors(output)))
                    self.replay.kept_bytes += size

    def _cached(self, name: str) -> tuple[bool, Any]:
        key = self.current[name]
        span = self.replay.span.get(key)
        hit = self.replay.cache.get((self.batch_index, *key))
        if span is None or hit is None or not span[1] < self.first_change:
            return False, None
        output, versions = hit
        if tuple(t._version for t in _tensors(output)) != versions:  # changed in place downstream: recompute
            return False, None
        self.tick = span[1] - 1  # the exit hook adds the last tick
        self.replay.replayed += 1
        return True, output

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles, patched = [], []
        for name, module in self.replay.block.named_modules():
            if not name:
                continue
            computes = any(is_linear(m) or isinstance(m, QuantLinear) for m in module.modules())
            cacheable = name.count(".") < MAX_DEPTH and computes
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n, m)))
            handles.append(module.register_forward_hook(lambda m, a, out, n=name, c=cacheable: self._exit(n, out, c)))
            if cacheable:
                patched.append((module, module.__dict__.get("forward")))
                module.forward = self._replaying(name, module.forward)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    def _replaying(self, name: str, forward):
        def run(*args, **kwargs):
            hit, output = self._cached(name)
            return output if hit else forward(*args, **kwargs)

        return run
