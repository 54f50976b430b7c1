"""A model directory as a skeleton on the meta device whose weights are read one transformer block at a time.

Used wherever squeeze must run or rewrite a model larger than it may hold: block-by-block quantization
(`squeeze.stream`), and the exporters' verification, which runs the model with each block's weights read
before its forward and freed after it (`LazyModel.running`, `blocks_on_demand`). A float directory and a
squeeze checkpoint both work: a checkpoint's quantized layers are installed as QuantLinears when their
block is read. What stays in memory: the modules outside the blocks (embeddings, final norm, head) while
the model runs, and one block.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from squeeze.checkpoint import gptq as ckpt
from squeeze.checkpoint.shards import ShardedReader, model_weight_files
from squeeze.errors import SqueezeError
from squeeze.model import LOAD_ERRORS, auto_class_for, check_finite_files, find_blocks, load_hf_config

QUANTIZED_SUFFIXES = (".qweight", ".gguf_blocks")


class LazyUnavailable(Exception):
    """This model cannot be read block by block (the message says why)."""


@contextmanager
def params_on_meta():
    """Inside, modules create their parameters on the meta device; buffers stay where they are made."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def release(module: nn.Module) -> None:
    """Every parameter and persistent buffer of ``module`` (not its sub-modules) back to meta."""
    for name, p in list(module._parameters.items()):
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
    for name, b in list(module._buffers.items()):
        if b is not None and b.device.type != "meta" and name not in module._non_persistent_buffers_set:
            module._buffers[name] = b.to("meta")


def release_all(module: nn.Module) -> None:
    for m in module.modules():
        release(m)


def meta_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model ``config`` describes, parameters on meta (nothing allocated, nothing initialized), weights tied."""
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights(), params_on_meta():
            model = auto_class_for(config).from_config(config, dtype=dtype)
        model.tie_weights()  # as from_pretrained does (tie_word_embeddings)
    except LOAD_ERRORS as e:
        raise SqueezeError(f"cannot build the model its config.json describes: {e}") from None
    return model.eval()


@contextmanager
def blocks_on_demand(blocks: nn.ModuleList, load: Callable[[int], None], unload: Callable[[int], None]):
    """Inside, running a block first calls ``load(i)`` and, once its forward returns, ``unload(i)``."""
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda module, args, i=i: load(i)))
        handles.append(block.register_forward_hook(lambda module, args, out, i=i: unload(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _float_dtype(config, reader: ShardedReader, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `squeeze.load` gives: the one asked for, else config.json's, else the weights' (transformers' "auto")."""
    if dtype is not None:
        return dtype
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype):
        return declared
    for key in reader.keys():
        if reader.dtype(key).is_floating_point:
            return reader.dtype(key)
    return torch.float32


class LazyModel:
    """A Hugging Face model directory (float, or a squeeze checkpoint) as a skeleton whose weights are read
    when they are needed. ``hash_weights``: read every file once upfront for its sha256 (``self.sha256``),
    refusing NaN/Inf in the same read."""

    def __init__(self, path: Path, dtype: torch.dtype | None = None, hash_weights: bool = False):
        self.path = path
        files = model_weight_files(path)
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise LazyUnavailable("its weights are not safetensors")
        self.reader = ShardedReader(files)
        self.sha256 = None
        if hash_weights:
            h = hashlib.sha256()  # `squeeze.model.directory_hash` of the weights
            check_finite_files(path, h)
            self.sha256 = h.hexdigest()
        config = load_hf_config(path)
        self.scheme, self.layer_schemes = None, {}
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
        if qc is not None:
            try:
                self.scheme = ckpt.scheme_from_quantization_config(qc)
            except (SqueezeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise SqueezeError(f"{str(path / 'config.json')!r}: quantization_config: {e}") from None
            self.layer_schemes = ckpt.read_layer_schemes(path)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
        self.dtype = _float_dtype(config, self.reader, dtype) if qc is None else (dtype or torch.float32)
        self.model = meta_skeleton(config, self.dtype)
        found = find_blocks(self.model)
        if found is None:
            raise LazyUnavailable("squeeze finds no transformer blocks in it")
        self.blocks_name, self.blocks = found
        # quantized layers of a checkpoint: module name -> its tensors' names in the files
        self.quantized: dict[str, list[str]] = {}
        for key in self.reader.keys():
            for suffix in QUANTIZED_SUFFIXES:
                if key.endswith(suffix):
                    self.quantized[key[: -len(suffix)]] = []
        for key in self.reader.keys():
            owner = key.rpartition(".")[0]
            if owner in self.quantized:
                self.quantized[owner].append(key)
        canonical: dict[int, str] = {}
        self.keys: dict[str, str] = {}  # every float state key -> the key its tensor is stored under (tied: once)
        for key, t in self.model.state_dict(keep_vars=True).items():
            if key.rpartition(".")[0] not in self.quantized:
                self.keys[key] = canonical.setdefault(id(t), key)
        missing = [k for k in set(self.keys.values()) if k not in self.reader]
        if missing:
            raise LazyUnavailable(f"its weight files name tensors differently from the model ({missing[0]!r})")

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_name}.{index}."

    def outer_keys(self) -> list[str]:
        prefix = self.blocks_name + "."
        return [k for k in self.keys if not k.startswith(prefix)]

    def block_keys(self, index: int) -> list[str]:
        return [k for k in self.keys if k.startswith(self.block_prefix(index))]

    def read(self, key: str) -> torch.Tensor:
        """The float tensor of ``key`` in the model's dtype, as `squeeze.load` holds it."""
        t = self.reader.get(self.keys[key])
        return t.to(self.dtype) if t.is_floating_point() else t

    def materialize(self, keys: list[str]) -> None:
        """Read the float tensors ``keys`` into the skeleton; tied keys share one tensor."""
        done: dict[str, nn.Parameter | torch.Tensor] = {}
        for key in keys:
            source = self.keys[key]
            owner_name, _, local = key.rpartition(".")
            owner = self.model.get_submodule(owner_name) if owner_name else self.model
            if source in done and local in owner._parameters:
                owner._parameters[local] = done[source]
                continue
            ckpt.set_tensor(self.model, key, self.read(key))
            done[source] = owner._parameters.get(local, owner._buffers.get(local))

    def install_quantized(self, prefix: str) -> None:
        """Build the checkpoint's quantized layers under ``prefix`` ("" for all) as QuantLinears from the files."""
        state = {k: self.reader.get(k) for layer, keys in self.quantized.items()
                 if (layer + ".").startswith(prefix) for k in keys}
        if state:
            try:
                ckpt.install_checkpoint_tensors(self.model, state, self.scheme, self.layer_schemes)
            except (KeyError, IndexError, ValueError, RuntimeError) as e:
                raise SqueezeError(f"checkpoint {str(self.path)!r} is inconsistent ({type(e).__name__}: {e}); "
                                   "re-create it") from None

    def load_block(self, index: int) -> None:
        self.install_quantized(self.block_prefix(index))
        self.materialize(self.block_keys(index))

    def load_outside(self) -> None:
        self.materialize(self.outer_keys())
        blocks = self.blocks_name + "."
        for layer in self.quantized:
            if not layer.startswith(blocks):
                self.install_quantized(layer + ".")

    def release_block(self, index: int) -> None:
        release_all(self.blocks[index])

    def release_outside(self) -> None:
        blocks = {id(m) for m in self.blocks.modules()}
        for m in self.model.modules():
            if id(m) not in blocks:
                release(m)

    @contextmanager
    def outside_blocks(self):
        self.load_outside()
        try:
            yield
        finally:
            self.release_outside()

    @contextmanager
    def running(self, on_block: Callable[[int], None] | None = None):
        """The model, runnable: outside modules in memory, each block read when it runs and freed after it.
        ``on_block(i)``: called with each block once its weights are in (e.g. to lower its layers)."""
        from squeeze.offload import return_freed_memory

        def load(i: int) -> None:
            self.load_block(i)
            if on_block is not None:
                on_block(i)

        def unload(i: int) -> None:
            self.release_block(i)
            return_freed_memory()

        with self.outside_blocks(), blocks_on_demand(self.blocks, load, unload):
            yield self.model
