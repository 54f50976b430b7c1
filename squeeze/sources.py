"""Model sources: a Hugging Face directory or a GGUF file, read the same way by every command.

A GGUF file is read as a float model: transformers' own GGUF loader dequantizes its tensors
(kept in float32: fp16/bf16 would not hold the dequantized values exactly) and builds the
config and tokenizer from the file's metadata. Architectures transformers cannot read from
GGUF are refused in one line that names them.
"""

from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import (
    PICKLE_SUFFIXES, WEIGHT_SUFFIXES, directory_hash, hash_file, load_pretrained, load_tokenizer, nonfinite_tensors,
    refuse_nonfinite, validate_model_dir, weight_files, weights_size)
from squeeze.optional import require

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """A path naming a .gguf file (it may not exist yet)."""
    return Path(path).suffix.lower() == ".gguf" and not Path(path).is_dir()


def read_gguf_fields(path: Path) -> dict:
    """A GGUF file's metadata fields (gguf-py, tensors not loaded); a file that is not GGUF is one error."""
    gguf = require("gguf", "gguf")
    try:
        with Path(path).open("rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise SqueezeError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic)")
        return gguf.GGUFReader(str(path)).fields
    except (ValueError, OSError, IndexError) as e:
        raise SqueezeError(f"cannot read the GGUF file {str(path)!r}: {e}") from None


def gguf_architecture(path: Path) -> str:
    """The file's ``general.architecture``, read from its header without loading tensors."""
    field = read_gguf_fields(path).get("general.architecture")
    if field is None:
        raise SqueezeError(f"{str(path)!r} is not a GGUF model (no general.architecture)")
    return str(field.contents())


def supported_gguf_architectures() -> list[str]:
    """Architectures transformers reads from GGUF (``general`` and ``tokenizer`` are sections, not models)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def validate_gguf(path: str | Path) -> Path:
    """Check that ``path`` is a GGUF model of an architecture transformers can read."""
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"model path {str(p)!r} does not exist")
    arch = gguf_architecture(p)
    require("accelerate", "gguf")  # transformers' GGUF loader needs it
    known = supported_gguf_architectures()
    if arch not in known:
        raise SqueezeError(f"{str(p)!r} holds a {arch!r} model, which transformers cannot read from GGUF "
                           f"(it reads: {', '.join(known)})")
    return p


def validate_source(path: str | Path, allow_pickle: bool = False) -> Path:
    """A model squeeze can read: a Hugging Face model directory (pickle weights only with ``allow_pickle``)
    or a GGUF file."""
    return validate_gguf(path) if is_gguf(path) else validate_model_dir(path, allow_pickle)


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_gguf_model(path: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The GGUF file's model, dequantized by transformers (float32 unless ``dtype`` says otherwise)."""
    from transformers import AutoConfig

    from squeeze.model import auto_class_for

    path = validate_gguf(path)
    _quiet_transformers()
    try:
        kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
        config = AutoConfig.from_pretrained(path.parent, **kwargs)
        model = auto_class_for(config).from_pretrained(path.parent, dtype=dtype or torch.float32, **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise SqueezeError(f"transformers could not read {str(path)!r}: {str(e).splitlines()[0]}") from None
    # The weights are now plain float tensors: drop transformers' record of the GGUF quantization so the
    # model behaves (and saves) like any float model.
    from squeeze.model import nonfinite_tensors, refuse_nonfinite

    refuse_nonfinite(nonfinite_tensors(model.state_dict().items()), str(path))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model.eval()


def load_gguf_tokenizer(path: Path):
    """The tokenizer stored in the GGUF file, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                             trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise SqueezeError(f"cannot read the tokenizer of {str(path)!r}: {str(e).splitlines()[0]}") from None


def source_tokenizer(path: Path):
    """The tokenizer of a model directory or GGUF file (None if a directory has none)."""
    return load_gguf_tokenizer(path) if is_gguf(path) else load_tokenizer(path)


def source_hash(path: Path) -> str:
    """sha256 of a GGUF file's bytes, or over a model directory's weight files."""
    if not is_gguf(path):
        return directory_hash(path)
    h = hashlib.sha256()
    hash_file(h, path)
    return h.hexdigest()


def source_size(path: Path) -> int:
    """Bytes of the weights a source ships."""
    return path.stat().st_size if is_gguf(path) else weights_size(path)


@contextmanager
def as_model_dir(path: Path, scratch: Path, allow_pickle: bool = False):
    """``path`` as a Hugging Face directory of safetensors weights: itself, or a temporary copy under
    ``scratch`` (config, tokenizer, safetensors), removed afterwards, of a GGUF file (dequantized to
    float32) or of a directory whose only weights are pickles (``allow_pickle``: read with
    torch.load(weights_only=True), which refuses a pickle that would run code)."""
    from squeeze.fsutil import scratch_dir

    if is_gguf(path):
        model, tokenizer, label = load_gguf_model(path), load_gguf_tokenizer(path), f"{path.stem}.dequantized"
    else:
        path = validate_model_dir(path, allow_pickle)
        if weight_files(path)[0].suffix not in PICKLE_SUFFIXES:
            yield path
            return
        model = load_pretrained(path)
        refuse_nonfinite(nonfinite_tensors(model.state_dict().items()), str(path))
        tokenizer, label = None, f"{path.name}.safetensors"
    with scratch_dir(scratch, label) as tmp:
        model.save_pretrained(tmp)
        del model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:  # the directory's own config, tokenizer and other small files, as they are
            for f in path.iterdir():
                if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
                    shutil.copyfile(f, tmp / f.name)
        yield tmp
