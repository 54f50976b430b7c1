"""Quantizing a model directory one transformer block at a time, with a journal to resume from.

The model is built with its parameters on the meta device (buffers computed, not loaded, stay real: rotary
tables). The runner asks for each block when it reaches it: the block's weights are read from the
safetensors shards, the pass quantizes it, and its checkpoint tensors go to the journal (one safetensors
file per block inside the temporary output) before it goes back to meta. Modules outside the blocks are in
memory only while the first block's inputs are captured. The checkpoint is assembled from the journal at
the end, one tensor at a time, into shards. What stays in memory: one block, the calibration activations
(one buffer, overwritten block by block), one layer group's statistics.

Resume: the journal records hashes of what the run depends on (model weights, recipe, calibration tokens,
dtype, squeeze version). Running the same command after the process died finds the dead run's temporary
output, takes it over and starts at the first unfinished block; finished blocks are read back (exactly:
the checkpoint form is what the in-memory layers hold, scales already float16) and run forward to rebuild
the next block's inputs. Different inputs start over, saying which input changed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from squeeze import __version__, distributed
from squeeze.checkpoint import gptq as ckpt
from squeeze.checkpoint.record import RUN_LOG_NAME, checkpoint_metadata, checkpoint_scheme, is_pruning, layer_record
from squeeze.checkpoint.shards import ShardedReader, save_tensors
from squeeze.distributed import DataParallel
from squeeze.errors import SqueezeError
from squeeze.fsutil import atomic_output_dir, dead_temporaries, scratch_dir
from squeeze.lazy import LazyModel, LazyUnavailable, release
from squeeze.model import select_linears
from squeeze.modules import QuantLinear
from squeeze.offload import OffloadedBatches, map_large_allocations, return_freed_memory, should_offload
from squeeze.recipe import Recipe
from squeeze.registry import pass_for_config
from squeeze.runner import block_layers
from squeeze.scheme import QuantScheme

JOURNAL_DIR = ".journal"
JOURNAL_NAME = "journal.json"
ACTIVATIONS_DIR = ".activations"
RESUME_MODES = ("auto", "require", "never")


# the model cannot be quantized block by block (the message says why); it is loaded whole instead
StreamUnavailable = LazyUnavailable


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Journal:
    """The finished blocks of a run, each pass's in its own safetensors file, with what made them."""

    def __init__(self, directory: Path, inputs: dict, writer: bool = True):
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.writer = writer
        self.state = {"inputs": inputs, "blocks": {}}
        if not writer:  # another rank's journal, read as that rank writes it
            self.refresh()
            return
        directory.mkdir(exist_ok=True)
        previous = read_journal_inputs(directory.parent)
        if previous == inputs:
            self.state = json.loads(self.path.read_text())
        else:
            for f in directory.iterdir():
                f.unlink()

    def refresh(self) -> None:
        """Read the journal file again (a rank that does not write it)."""
        if self.path.is_file():
            self.state = json.loads(self.path.read_text())

    def finished(self, pass_index: int, block: int) -> bool:
        return f"{pass_index}:{block}" in self.state["blocks"]

    def info(self, pass_index: int, block: int) -> dict:
        return self.state["blocks"][f"{pass_index}:{block}"]

    def block_file(self, pass_index: int, block: int) -> Path:
        return self.directory / f"pass{pass_index}-block{block:05d}.safetensors"

    def write_block(self, pass_index: int, block: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        """The block's tensors, then its entry: a run killed between the two redoes the block."""
        partial = self.block_file(pass_index, block).with_suffix(".partial")
        save_tensors(partial, tensors.items())
        os.replace(partial, self.block_file(pass_index, block))
        self.state["blocks"][f"{pass_index}:{block}"] = {**info, "order": list(tensors)}
        staged = self.path.with_suffix(".partial")
        with staged.open("w") as fh:
            json.dump(self.state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staged, self.path)

    def read_block(self, pass_index: int, block: int) -> tuple[dict[str, torch.Tensor], dict]:
        info = self.info(pass_index, block)
        reader = ShardedReader([self.block_file(pass_index, block)])
        return {k: reader.get(k) for k in info["order"]}, info


def read_journal_inputs(output_dir: Path) -> dict | None:
    """The inputs recorded by the journal in a (temporary) output directory, None if it has no readable one."""
    try:
        return json.loads((output_dir / JOURNAL_DIR / JOURNAL_NAME).read_text())["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PassIO:
    """`squeeze.runner.BlockIO` for pass ``pass_index`` of a streamed run: blocks from the shards (first pass)
    or from the previous pass's journal, finished ones from this pass's; each finished block journaled."""

    def __init__(self, streamed: LazyModel, journal: Journal, pass_index: int, offload: Path | None,
                 auto_offload: Path, notify: Callable[[str], None], dp: DataParallel | None = None):
        self.streamed, self.journal, self.pass_index, self.dp = streamed, journal, pass_index, dp
        self.offload, self.auto_offload, self.notify = offload, auto_offload, notify
        self.loaded: dict[int, list[nn.Module]] = {}
        self.started: dict[int, float] = {}

    def finished(self, index: int) -> bool:
        return self.journal.finished(self.pass_index, index)

    def install(self, pass_index: int, index: int) -> None:
        tensors, info = self.journal.read_block(pass_index, index)
        schemes = {n: QuantScheme.from_dict(d) for n, d in info["layers"].items()}
        quantized = tuple(ckpt.install_checkpoint_tensors(self.streamed.model, tensors, None, schemes))
        for key, t in tensors.items():
            if not key.startswith(quantized):  # the float tensors (norms, biases of float layers)
                ckpt.set_tensor(self.streamed.model, key, t)

    def load(self, index: int, block: nn.Module, finished: bool) -> None:
        self.started[index] = time.perf_counter()
        if finished:
            self.install(self.pass_index, index)
        elif self.pass_index == 0:
            self.streamed.materialize(self.streamed.block_keys(index))
        else:
            self.install(self.pass_index - 1, index)
        self.loaded.setdefault(index, []).extend(block.modules())  # every module that held this block's weights

    def done(self, index: int, prefix: str, block: nn.Module, records: dict[str, dict] | None) -> None:
        if records is not None:
            quantized = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
            info = {
                "records": records,
                "layers": {prefix + n: m.scheme.to_dict() for n, m in quantized.items()},
                "ordered_groups": all(m.has_ordered_groups() for m in quantized.values()),
                "seconds": round(time.perf_counter() - self.started.get(index, time.perf_counter()), 3),
                "peak_rss_bytes": peak_rss_bytes(),
            }
            if self.journal.writer:
                self.journal.write_block(self.pass_index, index, ckpt.checkpoint_state(block, prefix), info)
            if self.dp is not None:  # every rank has the same block; the others read the journal rank 0 wrote
                self.dp.barrier()
                self.journal.refresh()
        for module in self.loaded.pop(index, []) + list(block.modules()):
            release(module)
        return_freed_memory()

    def outside_blocks(self):
        return self.streamed.outside_blocks()

    def activations(self, tokens: int, streams: int, device: torch.device) -> OffloadedBatches | None:
        hidden = getattr(self.streamed.model.config, "hidden_size", 0) or 0
        size = tokens * hidden * self.streamed.dtype.itemsize * streams
        directory = self.offload
        if directory is None and should_offload(size):
            directory = self.auto_offload
            if self.dp is not None:
                directory = directory / f"rank{self.dp.rank}"
            directory.mkdir(parents=True, exist_ok=True)
            self.notify(f"keeping the calibration activations ({size / 1e9:.1f} GB) on disk in {str(directory)!r}: "
                        "they would take more than a quarter of the available memory")
        if directory is None:
            return None
        for f in directory.glob("*.pt"):  # an earlier pass's
            f.unlink()
        return OffloadedBatches(directory, device)

    def restructure(self) -> None:
        """Put the previous pass's quantized layers in place (as meta) so this pass targets what it would in memory."""
        for index in range(len(self.streamed.blocks)):
            self.install(self.pass_index - 1, index)
            for module in self.streamed.blocks[index].modules():
                release(module)


def run_inputs(model_sha256: str, recipe: Recipe, calib, dtype: torch.dtype) -> dict:
    """What a run's result depends on; a journal with other inputs is not resumed."""
    return {
        "squeeze": __version__,
        "torch": torch.__version__,
        "model": model_sha256,
        "recipe": recipe.to_dict(),
        "calibration": None if calib is None else {"sha256": calib.sha256, "shape": list(calib.input_ids.shape)},
        "dtype": str(dtype),
    }


def _differences(old: dict, new: dict) -> str:
    return ", ".join(k for k in new if old.get(k) != new.get(k)) or "the journal"


def find_resumable(out: Path, inputs: dict, resume: str, notify: Callable[[str], None]) -> Path | None:
    """A dead run's temporary output of ``out`` whose journal has the same inputs (None: start over)."""
    if resume == "never":
        return None
    for candidate in dead_temporaries(out):
        old = read_journal_inputs(candidate)
        if old is None:
            continue
        if old == inputs:
            return candidate
        notify(f"starting over: an interrupted run of {str(out)!r} had a different {_differences(old, inputs)}")
    if resume == "require":
        raise SqueezeError(f"--resume: no interrupted run of {str(out)!r} with these inputs to continue "
                           "(run without --resume to start)")
    return None


def _checkpoint_tensors(streamed: LazyModel, journal: Journal, last_pass: int):
    """(name, tensor) in the order `squeeze.checkpoint.gptq.checkpoint_state` gives for the whole model."""
    blocks_prefix = streamed.blocks_name + "."
    emitted_blocks: set[int] = set()
    stored: set[str] = set()
    for key, source in streamed.keys.items():
        if key.startswith(blocks_prefix):
            index = int(key[len(blocks_prefix):].split(".", 1)[0])
            if index not in emitted_blocks:
                emitted_blocks.add(index)
                tensors, _ = journal.read_block(last_pass, index)
                yield from tensors.items()
            continue
        if source in stored:
            continue
        stored.add(source)
        yield key, streamed.read(key)


def _collect(recipe: Recipe, journal: Journal, n_blocks: int) -> tuple[dict, dict, bool, list]:
    """Per-layer records and grids, act-order flag and per-block run log, from the journal."""
    records: dict[str, dict] = {}
    schemes: dict[str, QuantScheme] = {}
    ordered = True
    log = []
    last = len(recipe.passes) - 1
    for p, config in enumerate(recipe.passes):
        name = pass_for_config(config).name
        for i in range(n_blocks):
            info = journal.info(p, i)
            for layer, rec in info["records"].items():
                records[layer] = layer_record(records.get(layer), name, config, rec)
            log.append({"pass": p, "method": name, "block": i, "seconds": info["seconds"],
                        "peak_rss_bytes": info["peak_rss_bytes"]})
            if p == last:
                schemes.update({n: QuantScheme.from_dict(d) for n, d in info["layers"].items()})
                ordered = ordered and info["ordered_groups"]
    return records, schemes, not ordered, log


def quantize_streamed(src: Path, out: Path, recipe: Recipe, calib, dtype: torch.dtype | None, overwrite: bool,
                      resume: str, max_shard_bytes: int, notify: Callable[[str], None],
                      offload: Path | None = None) -> Path:
    """`squeeze.api.quantize_dir` for a model directory of safetensors, one block in memory at a time;
    calibration activations on disk in ``offload`` (else in memory, or in the temporary output past a limit)."""
    if any(getattr(p, "reshapes", False) for p in recipe.passes):
        raise StreamUnavailable("structured pruning in a recipe with other passes runs on the whole model")
    if any(getattr(p, "trains", False) for p in recipe.passes):
        raise StreamUnavailable("training (distillation, QAT) updates every block together")
    map_large_allocations()  # this path exists to keep memory low: no heap fragmentation from 8-32 MiB tensors
    streamed = LazyModel(src, dtype, hash_weights=True)
    if streamed.quantized:
        raise StreamUnavailable("it is a quantized checkpoint")
    for config in recipe.passes:  # layers outside the blocks (an lm_head target) need the whole model
        layers = select_linears(streamed.model, config.targets, config.ignore)
        try:
            block_layers(layers, streamed.blocks_name, len(streamed.blocks))
        except SqueezeError:
            raise StreamUnavailable("the recipe targets layers outside its transformer blocks") from None
    inputs = run_inputs(streamed.sha256, recipe, calib, streamed.dtype)
    dp = distributed.from_environment()
    if dp is not None and not dp.is_writer:
        tmp = Path(dp.broadcast(None))  # rank 0's temporary output, once it has one
        with _offload_dir(offload) as offload_dir:
            journal = Journal(tmp / JOURNAL_DIR, inputs, writer=False)
            _run_passes(streamed, recipe, calib, journal, offload_dir, tmp, lambda message: None, dp)
        dp.barrier()  # rank 0 has written the checkpoint
        return out
    reuse = find_resumable(out, inputs, resume, notify)
    if reuse is not None:
        done = len(json.loads((reuse / JOURNAL_DIR / JOURNAL_NAME).read_text())["blocks"])
        notify(f"resuming an interrupted run: {done} of {len(recipe.passes) * len(streamed.blocks)} blocks were done")
    started = time.time()
    with atomic_output_dir(out, overwrite, reuse) as tmp, _offload_dir(offload) as offload_dir:
        journal = Journal(tmp / JOURNAL_DIR, inputs)
        if dp is not None:
            dp.broadcast(str(tmp))
        _run_passes(streamed, recipe, calib, journal, offload_dir, tmp, notify, dp)
        n_blocks = len(streamed.blocks)
        records, schemes, desc_act, log = _collect(recipe, journal, n_blocks)
        if not schemes and not all(is_pruning(p) for p in recipe.passes):
            raise SqueezeError("the recipe quantized no layers; check --targets/--ignore")
        scheme = checkpoint_scheme(schemes, recipe.passes) if schemes else None  # None: pruned, float
        metadata = checkpoint_metadata(scheme, schemes, records, recipe.to_dict(), calib, src, inputs["model"])
        config_json = ckpt.checkpoint_config(None, src, scheme, schemes, desc_act)
        last = len(recipe.passes) - 1
        ckpt.write_checkpoint(tmp, _checkpoint_tensors(streamed, journal, last), config_json, metadata, src,
                              max_shard_bytes)
        run_log = {"started_unix": int(started), "seconds": round(time.time() - started, 3),
                   "peak_rss_bytes": peak_rss_bytes(), "resumed": reuse is not None,
                   "ranks": 1 if dp is None else dp.world, "blocks": log}
        (tmp / RUN_LOG_NAME).write_text(json.dumps(run_log, indent=2) + "\n")
        shutil.rmtree(tmp / JOURNAL_DIR)
        shutil.rmtree(tmp / ACTIVATIONS_DIR, ignore_errors=True)
    if dp is not None:
        dp.barrier()
    return out


def _run_passes(streamed: LazyModel, recipe: Recipe, calib, journal: Journal, offload_dir: Path | None, tmp: Path,
                notify: Callable[[str], None], dp: DataParallel | None) -> None:
    n_blocks = len(streamed.blocks)
    for p, config in enumerate(recipe.passes):
        io = PassIO(streamed, journal, p, offload_dir, tmp / ACTIVATIONS_DIR, notify, dp)
        if p > 0:
            io.restructure()
        if all(journal.finished(p, i) for i in range(n_blocks)):
            continue
        with torch.no_grad():
            pass_for_config(config).apply(streamed.model, config, calib, io=io)


@contextmanager
def _offload_dir(offload: Path | None):
    """A scratch directory of this run inside the user's ``offload`` directory (None: None)."""
    if offload is None:
        yield None
        return
    offload = Path(offload)
    if not offload.is_dir():
        raise SqueezeError(f"--offload-activations {str(offload)!r} is not a directory")
    with scratch_dir(offload, "activations") as tmp:
        yield tmp
