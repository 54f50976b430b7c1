"""The sequential layer-by-layer calibration runner shared by every calibrated pass.

The inputs of the first transformer block (hidden states plus every other
argument the model passes it: attention mask, position ids, rotary
embeddings, ...) are captured once. Blocks are then processed one at a time:
only the block being calibrated sits on the compute device, the pass
quantizes it, and the *quantized* block's outputs become the next block's
inputs (as GPTQ does), so later blocks learn to correct earlier errors.

Which attribute holds the blocks is data (`squeeze.model.BLOCK_PATHS` plus a
generic fallback); the linears of a block are those `select_linears` chose.
"""

from __future__ import annotations

import copy
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from squeeze.errors import SqueezeError
from squeeze.model import find_blocks
from squeeze.modules import dequantize_once
from squeeze.offload import OffloadedBatches, return_freed_memory
from squeeze.precision import calib_autocast
from squeeze.replay import BlockReplay

CALIB_BATCH_SIZE = 8


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states and the other positional/keyword arguments of a block call."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)  # positional arguments after the hidden states
    kwargs: list[dict] = field(default_factory=list)
    # With run_sequential(track_float=True): the float model's hidden states for the same batches, and a
    # float copy of the block being processed (what the quantized block should reproduce).
    reference: list[torch.Tensor] | None = None
    reference_block: nn.Module | None = None
    # Set by run_sequential for the block being processed: its passes replay the unchanged modules' outputs.
    replay: BlockReplay | None = None
    # The dtype block forwards autocast to (`squeeze.precision.calib_autocast`); None: the model's own.
    autocast: torch.dtype | None = None
    # Data-parallel calibration (`squeeze.distributed`): these are this rank's batches; passes combine their
    # statistics across ranks with it. None: one process.
    dp: object | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def batch(self, i: int, reference: bool = False) -> "BlockInputs":
        """Batch ``i`` alone (of the float stream with ``reference``)."""
        hidden = self.reference if reference else self.hidden
        return BlockInputs(hidden[i : i + 1], self.args[i : i + 1], self.kwargs[i : i + 1], autocast=self.autocast,
                           dp=self.dp)

    def forward(self, block: nn.Module, i: int):
        """``block`` called on batch ``i`` (under autocast when set)."""
        h, a, k = self.hidden[i], self.args[i], self.kwargs[i]
        if self.autocast is None:
            return block(h, *a, **k)
        with torch.autocast(h.device.type, dtype=self.autocast):
            return block(h, *a, **k)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, device,
                         hidden=None) -> BlockInputs:
    """Run the model on ``input_ids`` up to its first block and keep what that block is called with (the hidden
    states appended to ``hidden`` when given: `squeeze.offload.OffloadedBatches`)."""
    captured = BlockInputs() if hidden is None else BlockInputs(hidden=hidden)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach().to(device))
        captured.args.append(_to(tuple(args[1:]), device))
        captured.kwargs.append(_to(dict(kwargs), device))
        raise _Captured

    model_device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(input_ids), CALIB_BATCH_SIZE):
            try:
                model(input_ids[start : start + CALIB_BATCH_SIZE].to(model_device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@contextmanager
def _replaying(block: nn.Module, inputs: BlockInputs, observed: set[nn.Module] | None):
    """Yields ``start(i)``, to call before batch ``i``: with ``inputs.replay`` set for ``block``, the
    modules unchanged since the last pass are replayed (`squeeze.replay`); otherwise it does nothing."""
    replay = inputs.replay
    if replay is None or replay.block is not block:
        yield lambda i: None
        return
    with replay.pass_(observed) as run:
        yield run.batch


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, in_place: bool = False) -> list[torch.Tensor]:
    """The block's output hidden states for every captured batch (``in_place``: written over the inputs)."""
    if in_place:
        outputs = inputs.hidden
    else:
        outputs = inputs.hidden.sibling() if isinstance(inputs.hidden, OffloadedBatches) else [None] * len(inputs)
    stream_dtype = inputs.hidden[0].dtype if len(inputs) else None
    with _replaying(block, inputs, None) as start, dequantize_once(block):
        for i in range(len(inputs)):
            start(i)
            # the stream between blocks keeps its dtype whatever the forward computed in
            outputs[i] = block_output(inputs.forward(block, i)).to(stream_dtype)
    return outputs


class _AllObserved(Exception):
    """Raised once every observed layer has seen its input: the rest of the block need not run."""


@torch.no_grad()
def collect_inputs(block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], observe: Callable) -> None:
    """Run the block on every batch, calling ``observe(name, x)`` with each named layer's input.

    A batch stops as soon as every layer in ``layers`` has been called once:
    quantizing q/k/v needs only the attention norm, not the rest of the block.
    """
    seen: set[str] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):  # statistics in float32 whatever the forward ran in
            observe(name, x)
        seen.add(name)
        if len(seen) == len(layers):
            raise _AllObserved

    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: hook(n, a[0])) for n, m in layers.items()]
    try:
        with _replaying(block, inputs, set(layers.values())) as start, dequantize_once(block):
            for i in range(len(inputs)):
                start(i)
                seen.clear()
                try:
                    inputs.forward(block, i)
                except _AllObserved:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        return_freed_memory()


@torch.no_grad()
def collect_paired_inputs(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], prefix: str, observe: Callable
) -> None:
    """Like `collect_inputs`, calling ``observe(name, x, x_ref)`` with each layer's input in the block and the
    same layer's input in the float copy (``inputs.reference_block`` on ``inputs.reference``), batch by batch."""
    ref_layers = {n: inputs.reference_block.get_submodule(n[len(prefix):]) for n in layers}
    for i in range(len(inputs)):
        ref_x: dict[str, torch.Tensor] = {}
        collect_inputs(inputs.reference_block, inputs.batch(i, reference=True), ref_layers,
                       lambda n, x: ref_x.__setitem__(n, x))
        collect_inputs(block, inputs.batch(i), layers, lambda n, x: observe(n, x, ref_x[n]))


def block_layers(layers: dict[str, nn.Module], blocks_name: str, n_blocks: int) -> list[dict[str, nn.Module]]:
    """Split the selected layers by block; layers outside the blocks cannot be calibrated sequentially."""
    per_block: list[dict[str, nn.Module]] = [{} for _ in range(n_blocks)]
    outside = []
    for name, module in layers.items():
        prefix = blocks_name + "."
        index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
        if not index.isdigit() or int(index) >= n_blocks:
            outside.append(name)
            continue
        per_block[int(index)][name] = module
    if outside:
        raise SqueezeError(f"layers outside the transformer blocks cannot be calibrated: {outside[:3]} — "
                           "exclude them with --ignore (or --targets)")
    return per_block


def calibration_device(requested: torch.device | str | None, home: torch.device) -> torch.device:
    """Where blocks are calibrated: ``requested``, else CUDA when present for a model held on the CPU (one block
    is moved there at a time and back), else where the model is."""
    if requested is not None:
        return torch.device(requested)
    if home.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return home


# (block name prefix such as "model.layers.3.", the block, its selected layers by full name, its inputs) -> records
ProcessBlock = Callable[[str, nn.Module, dict[str, nn.Module], BlockInputs], dict[str, dict]]


class BlockIO(Protocol):
    """Where blocks come from and go to when the model is not held in memory (`squeeze.stream`): the runner
    asks for each block before it and hands it back after; blocks a resumed run already finished are only run."""

    def finished(self, index: int) -> bool: ...

    def load(self, index: int, block: nn.Module, finished: bool) -> None:
        """Fill ``block``'s weights: the finished (quantized) ones, or the ones this pass starts from."""

    def done(self, index: int, prefix: str, block: nn.Module, records: dict[str, dict] | None) -> None:
        """``block`` is through (``records`` None: it was finished before); keep what is new, free its weights."""

    def outside_blocks(self) -> AbstractContextManager:
        """The modules outside the blocks, in memory for the capture of the first block's inputs."""

    def activations(self, tokens: int, streams: int, device: torch.device) -> OffloadedBatches | None:
        """Where ``streams`` hidden-state streams of ``tokens`` calibration tokens are kept: on disk, or None
        (in memory)."""


@torch.no_grad()
def advance(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace each batch's hidden states by the block's output, batch by batch: the activations stay one buffer."""
    run_block(block, inputs, in_place=True)


def _find_blocks(model: nn.Module, desc: str) -> tuple[str, nn.ModuleList]:
    found = find_blocks(model)
    if found is None:
        raise SqueezeError(f"{desc}: cannot find the transformer blocks of {type(model).__name__}; "
                           "add its block list to squeeze.model.BLOCK_PATHS")
    return found


def _share(input_ids: torch.Tensor, dp) -> torch.Tensor:
    """This rank's calibration sequences: batches (of CALIB_BATCH_SIZE) i with i mod world = rank."""
    if dp is None:
        return input_ids
    batches = list(torch.split(input_ids, CALIB_BATCH_SIZE))
    mine = [batches[i] for i in dp.share(len(batches))]
    if not mine:
        raise SqueezeError(f"{len(batches)} calibration batches cannot feed {dp.world} ranks; use fewer workers "
                           f"or more --nsamples (batches of {CALIB_BATCH_SIZE})")
    return torch.cat(mine)


REPLAY_MIN_BYTES = 256 * 2**20


def _replay_bound(inputs: BlockInputs) -> int:
    """What replay may keep (`squeeze.replay`): half what the block's input stream takes (at least 256 MiB),
    nothing when the stream is kept on disk."""
    if isinstance(inputs.hidden, OffloadedBatches):
        return 0
    return max(REPLAY_MIN_BYTES, sum(h.numel() * h.element_size() for h in inputs.hidden) // 2)


def _progress(bar, blocks_name: str, index: int, tokens: int, seconds: float) -> None:
    bar.set_postfix_str(f"{blocks_name}.{index} done, {tokens / max(seconds, 1e-9):,.0f} tok/s")


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calib,
    process_block: ProcessBlock,
    device: torch.device | str | None = None,
    desc: str = "calibrate",
    track_float: bool = False,
    precision: str = "float32",
    io: BlockIO | None = None,
    feed_float: bool = False,
) -> dict[str, dict]:
    """Calibrate ``model`` block by block; ``process_block(prefix, block, its layers, inputs)`` returns records.

    ``process_block`` quantizes the block in place (replacing its layers in
    ``model``); the runner then feeds the quantized block's outputs forward (``feed_float``: the float
    block's, computed before ``process_block`` changes it).
    ``track_float`` also carries the float model's hidden states (``inputs.reference``) and hands
    ``process_block`` a float copy of each block (``inputs.reference_block``): one more block pass each.
    ``precision``: the arithmetic of the block forwards (`squeeze.precision`; statistics stay float32).
    ``io``: blocks are loaded before and given back after (a streamed model); None: they are all in memory.
    """
    if calib is None:
        raise SqueezeError(f"{desc} needs calibration data (--calib FILE, or --calib self)")
    if io is None and find_blocks(model) is None and getattr(model, "config", None) is None:
        return _run_whole_module(model, layers, calib, process_block, device, track_float, precision)
    blocks_name, blocks = _find_blocks(model, desc)
    per_block = block_layers(layers, blocks_name, len(blocks))
    with io.outside_blocks() if io is not None else nullcontext():
        home = next(model.parameters()).device
        device = calibration_device(device, home)
        dp = getattr(io, "dp", None)
        input_ids = _share(calib.input_ids, dp)
        store = io.activations(input_ids.numel(), 2 if track_float else 1, device) if io is not None else None
        inputs = capture_block_inputs(model, blocks[0], input_ids, device, store)
        inputs.dp = dp
    inputs.autocast = calib_autocast(precision, device, next(model.parameters()).dtype)
    if track_float:
        inputs.reference = store.copy("reference") if store is not None else list(inputs.hidden)
    records: dict[str, dict] = {}
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", leave=False)
    for index in bar:
        started = time.perf_counter()
        finished = io is not None and io.finished(index)
        if io is not None:
            io.load(index, blocks[index], finished=finished and not track_float)
        block = blocks[index].to(device)
        if track_float:
            inputs.reference_block = copy.deepcopy(block)
            if finished:
                io.load(index, block, finished=True)
        block_records = None
        if not finished:
            if feed_float:
                outputs = run_block(block, inputs)
            inputs.replay = BlockReplay(block, _replay_bound(inputs))
            block_records = process_block(f"{blocks_name}.{index}.", block, per_block[index], inputs) \
                if per_block[index] else {}
            records.update(block_records)
            inputs.replay = None
        if feed_float and not finished:
            inputs.hidden = outputs
        else:
            advance(block, inputs)
        if track_float:
            reference = BlockInputs(inputs.reference, inputs.args, inputs.kwargs, autocast=inputs.autocast, dp=dp)
            advance(inputs.reference_block, reference)
            inputs.reference_block = None
        block.to(home)
        if io is not None:
            io.done(index, f"{blocks_name}.{index}.", block, block_records)
        _progress(bar, blocks_name, index, calib.input_ids.numel(), time.perf_counter() - started)
    return records


def _run_whole_module(model: nn.Module, layers: dict[str, nn.Module], calib, process_block: ProcessBlock,
                      device, track_float: bool, precision: str) -> dict[str, dict]:
    """A plain nn.Module without transformer blocks (a CNN, an MLP) is calibrated as one block: the module
    itself, called on the calibration samples (``calib.input_ids``: model inputs stacked along dim 0, e.g.
    `squeeze.calib.tensor_calibration`)."""
    home = next(model.parameters()).device
    device = calibration_device(device, home)
    hidden = [batch.to(device) for batch in torch.split(calib.input_ids, CALIB_BATCH_SIZE)]
    inputs = BlockInputs(hidden, [()] * len(hidden), [{}] * len(hidden))
    inputs.autocast = calib_autocast(precision, device, next(model.parameters()).dtype)
    model.to(device)
    if track_float:
        inputs.reference, inputs.reference_block = list(hidden), copy.deepcopy(model)
    try:
        return process_block("", model, layers, inputs)
    finally:
        model.to(home)


def run_blockwise(model: nn.Module, layers: dict[str, nn.Module], process_block: ProcessBlock, io: BlockIO,
                  desc: str) -> dict[str, dict]:
    """Like `run_sequential` with no calibration data (``inputs`` None): each block loaded, processed, given back."""
    blocks_name, blocks = _find_blocks(model, desc)
    per_block = block_layers(layers, blocks_name, len(blocks))
    records: dict[str, dict] = {}
    for index in tqdm(range(len(blocks)), desc=desc, unit="block", leave=False):
        if io.finished(index):
            io.done(index, f"{blocks_name}.{index}.", blocks[index], None)
            continue
        io.load(index, blocks[index], finished=False)
        block_records = process_block(f"{blocks_name}.{index}.", blocks[index], per_block[index], None)
        records.update(block_records)
        io.done(index, f"{blocks_name}.{index}.", blocks[index], block_records)
    return records


@torch.no_grad()
def groups_by_shared_input(block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module]) -> list[list[str]]:
    """The block's layers in execution order, grouped by the input tensor they share (q/k/v, gate/up).

    Used for "true sequential" quantization: each group is quantized on inputs
    that already went through the quantized groups before it.
    """
    seen: list[tuple[str, tuple]] = []
    alive: list[torch.Tensor] = []  # held so that no later input can reuse a freed input's memory address

    def observe(name: str, x: torch.Tensor) -> None:
        if all(name != n for n, _ in seen):
            alive.append(x)
            seen.append((name, (x.data_ptr(), tuple(x.shape), x.stride())))

    one = BlockInputs(inputs.hidden[:1], inputs.args[:1], inputs.kwargs[:1])
    collect_inputs(block, one, layers, observe)
    groups: list[list[str]] = []
    last_key = None
    for name, key in seen:
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_key = key
    missing = [n for n in layers if all(n != s for s, _ in seen)]
    return groups + ([missing] if missing else [])
