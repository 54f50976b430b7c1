"""Finding things inside models: block lists, linear layers, targets; loading model dirs.

Which attribute holds the transformer blocks is data (`BLOCK_PATHS`), with a
generic fallback (the longest ModuleList of identical modules), not code per
model family.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError

# model_type -> dotted path of the nn.ModuleList holding the repeated blocks.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "bert": "encoder.layer",
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")  # torch.save files: unpickling them can run code


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2), which is a Linear with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out_features, in_features]."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(dotted name, ModuleList) of the model's transformer blocks, or None if it has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = BLOCK_PATHS.get(model_type)
    if path is not None:
        for candidate in (path, path.split(".", 1)[-1]):  # with and without the head wrapper
            blocks = _get(model, candidate)
            if isinstance(blocks, nn.ModuleList):
                return candidate, blocks
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def select_linears(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> dict[str, nn.Module]:
    """Linear layers to quantize, by name.

    targets None: every linear inside the transformer blocks (every linear of a
    model without blocks). Patterns are globs on the module name, a bare name
    matching as a suffix ("q_proj"), or a regex after "re:".
    """
    ignore = list(ignore or [])
    linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    if targets:
        chosen = {n: m for n, m in linears.items() if any(_matches(n, p) for p in targets)}
    else:
        found = find_blocks(model)
        prefix = (found[0] + ".") if found else ""
        chosen = {n: m for n, m in linears.items() if n.startswith(prefix)}
    chosen = {n: m for n, m in chosen.items() if not any(_matches(n, p) for p in ignore)}
    if not chosen:
        what = f"targets={targets}" if targets else "the default targets (linears inside the blocks)"
        raise SqueezeError(f"no Linear layers matched {what} with ignore={ignore} — check --targets/--ignore")
    return chosen


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# ---- model directories -------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def validate_model_dir(path: str | Path, allow_pickle: bool = False) -> Path:
    """Check that ``path`` is a model directory with config.json and weights (safetensors; pickle weights
    only with ``allow_pickle``)."""
    p = Path(path)
    if not p.exists():
        raise SqueezeError(f"model path {str(p)!r} does not exist")
    if not p.is_dir():
        raise SqueezeError(f"model path {str(p)!r} is not a directory (expected a Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise SqueezeError(f"{str(p)!r} has no config.json — is it a Hugging Face model directory?")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SqueezeError(f"{str(p / 'config.json')!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise SqueezeError(f"{str(p / 'config.json')!r} is not a model config (expected a JSON object)")
    files = weight_files(p)
    if not files:
        raise SqueezeError(f"{str(p)!r} has no weight files (*.safetensors or *.bin)")
    pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise SqueezeError(f"{str(p)!r} holds pickle weights ({', '.join(pickles[:3])}), which can run code when "
                           "loaded; convert them to safetensors, or pass --allow-pickle (quantize, eval, export) to "
                           "load them with torch.load(weights_only=True)")
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
    return p


def check_safetensors(path: Path) -> None:
    """Read a .safetensors file's header: a truncated or corrupt file is one error naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except Exception as e:  # SafetensorError has no importable base; OSError for unreadable files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SqueezeError(f"{str(path)!r} is not a readable safetensors file ({reason}); "
                           "re-download or re-create it") from None


def nonfinite_tensors(named_tensors) -> list[str]:
    """Names of the floating-point tensors among (name, tensor) pairs that hold a NaN or an Inf."""
    return [name for name, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_nonfinite(names: list[str], where: str) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise SqueezeError(f"{where!r} holds NaN or Inf weights in {len(names)} tensor(s): {shown}; "
                           "squeeze will not quantize, export or evaluate them (re-create the model)")


def check_finite_files(path: Path, h=None) -> None:
    """Refuse a model directory whose safetensors weights hold NaN/Inf (read tensor by tensor, without a memory
    map, so that checking a large model does not leave it resident). With ``h``, the same read feeds it what
    `directory_hash` hashes (each file's name and bytes)."""
    from squeeze.checkpoint.shards import SafetensorsFile

    bad = []
    for f in weight_files(path):
        if h is not None:
            h.update(f.name.encode())
        if f.suffix == ".safetensors":
            bad += SafetensorsFile(f).scan(h)
    refuse_nonfinite(bad, str(path))


def hash_file(h, path: Path) -> None:
    """Feed a file's bytes to the hash ``h`` in 1 MiB chunks."""
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def directory_hash(path: Path) -> str:
    """sha256 over the model's weight files (names and bytes)."""
    h = hashlib.sha256()
    for f in weight_files(path):
        h.update(f.name.encode())
        hash_file(h, f)
    return h.hexdigest()


def weights_size(path: Path) -> int:
    """Bytes of the weight files in a model directory (what is shipped, tokenizer aside)."""
    return sum(f.stat().st_size for f in weight_files(path))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "generation_config.json",
)


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def auto_class_for(config):
    """AutoModelForCausalLM for decoders, else AutoModel. A config whose ``architectures`` names no
    causal-LM head (all-MiniLM's ["BertModel"]) is an encoder even if its type has an LM-head class."""
    from transformers import AutoModel, AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        return AutoModel
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        return AutoModel
    return AutoModelForCausalLM


# What transformers raises for a config.json or weights it cannot use (a garbled field can surface as any of them).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, AttributeError, TypeError)


def load_hf_config(path: Path):
    """The directory's transformers config; an unusable config.json is one error naming it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except LOAD_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SqueezeError(f"cannot read {str(path / 'config.json')!r}: {reason}") from None


def load_pretrained(path: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a float Hugging Face model directory (causal LM, else a base model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = load_hf_config(path)
    kwargs = {"local_files_only": True, "weights_only": True, "trust_remote_code": False}  # no code from the model
    if dtype is not None:
        kwargs["dtype"] = dtype
    auto = auto_class_for(config)
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError:  # weights_only=True met something that is not plain tensors
        raise SqueezeError(f"{str(path)!r} holds a pickle that is not plain weights (it would run code or build "
                           "objects); squeeze will not load it even with --allow-pickle") from None
    except LOAD_ERRORS as e:
        raise SqueezeError(f"cannot load model weights from {str(path)!r}: {str(e).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would fill them with random values
        raise SqueezeError(f"the weights in {str(path)!r} lack {len(missing)} tensor(s) its config.json needs "
                           f"({', '.join(missing[:3])}); the files are incomplete or corrupt")
    return model.eval()


def load_tokenizer(path: Path):
    """The model's own tokenizer, or None if the directory has none."""
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in TOKENIZER_FILES[:7]):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise SqueezeError(f"cannot load the tokenizer in {str(path)!r}: {str(e).splitlines()[0]}") from None
