"""Calibration data: token sequences from a local text file (or the model itself), with a content hash.

Plain text is read whole; JSONL files use each record's "text" field. The
text is tokenized with the model's own tokenizer as one stream and ``nsamples``
windows of ``seqlen`` tokens are drawn at seeded random offsets. The path
``"self"`` asks for data-free calibration: sequences sampled from the model
(temperature 1, seeded), for users with no data offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from squeeze.errors import SqueezeError
from squeeze.resources import cache_root, default_calibration_text

SELF = "self"  # CalibConfig.path that means: sample calibration sequences from the model


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration sequences come from: a text file, None (the bundled corpus), or "self" (the model)."""

    path: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples <= 0:
            raise SqueezeError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seqlen < 2:
            raise SqueezeError(f"--seqlen must be at least 2, got {self.seqlen}")


@dataclass
class CalibrationSet:
    """Token id windows [nsamples, seqlen] and a hash of exactly those tokens; for a plain nn.Module (a CNN),
    its input samples stacked along dim 0 (`tensor_calibration`)."""

    input_ids: torch.Tensor
    source: str

    @property
    def sha256(self) -> str:
        ids = self.input_ids if self.input_ids.is_floating_point() else self.input_ids.to(torch.int64)
        return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()

    def batches(self, batch_size: int = 8):
        for i in range(0, len(self.input_ids), batch_size):
            yield self.input_ids[i : i + batch_size]


def tensor_calibration(samples, source: str = "tensor") -> CalibrationSet:
    """Calibration for a plain nn.Module without transformer blocks: ``samples`` are its inputs stacked along
    dim 0 (images [n, c, h, w], feature rows [n, d]); calibrated passes (GPTQ, SparseGPT, ...) run the whole
    module on them, 8 samples per call."""
    x = torch.as_tensor(samples)
    if x.ndim < 2 or len(x) == 0:
        raise SqueezeError(f"calibration samples must be stacked along dim 0 (at least [n, features]); got shape "
                           f"{tuple(x.shape)}")
    return CalibrationSet(x, source)


def jsonl_records(path: Path, raw: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-empty line of a JSONL text; bad JSON names its line."""
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise SqueezeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return records


def read_text(path: str | Path) -> str:
    """Text of a .txt file, or the "text" fields of a .jsonl file joined by blank lines."""
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"data file {str(p)!r} " + ("is not a file" if p.exists() else "does not exist"))
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SqueezeError(f"data file {str(p)!r} is not UTF-8 text") from None
    if p.suffix.lower() != ".jsonl":
        if not raw.strip():
            raise SqueezeError(f"data file {str(p)!r} is empty")
        return raw
    texts = []
    for lineno, record in jsonl_records(p, raw):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SqueezeError(f"{p}:{lineno}: each JSONL record needs a string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise SqueezeError(f"data file {str(p)!r} has no records")
    return "\n\n".join(texts)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream (BOS once at the start, as the tokenizer adds it): [n] int64."""
    ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def load_calibration(tokenizer, config: CalibConfig, model=None) -> CalibrationSet:
    """Draw ``nsamples`` seeded windows of ``seqlen`` tokens from the calibration text (or the model)."""
    if config.path == SELF:
        if model is None:
            raise SqueezeError("--calib self samples from the model, so load_calibration needs model=...")
        return sample_from_model(model, config, bos_token_id(model, tokenizer))
    if tokenizer is None:
        raise SqueezeError("calibration from text needs the model's tokenizer, and the model directory has none")
    path = config.path or default_calibration_text()
    stream = tokenize_stream(tokenizer, read_text(path))
    seqlen = config.seqlen
    if len(stream) < seqlen:  # every window would be the whole text, shorter than asked: refuse (see README)
        raise SqueezeError(f"calibration text {str(path)!r} has {len(stream)} tokens, fewer than one --seqlen "
                           f"window of {seqlen}; give at least {seqlen} tokens of text (better "
                           f"--nsamples x --seqlen = {config.nsamples * seqlen}) or a smaller --seqlen")
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (config.nsamples,), generator=gen)
    windows = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    return CalibrationSet(windows, str(path))


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over an in-memory model's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def bos_token_id(model, tokenizer) -> int:
    """The token every sampled sequence starts from: BOS of the tokenizer or model config, else 0."""
    for source in (tokenizer, getattr(model, "config", None)):
        bos = getattr(source, "bos_token_id", None)
        if isinstance(bos, int):
            return bos
    return 0


def sample_from_model(model, config: CalibConfig, bos: int, batch_size: int = 64, cache: bool = True) -> CalibrationSet:
    """``nsamples`` sequences of ``seqlen`` tokens sampled from ``model`` at temperature 1 (seeded).

    Every sequence starts at BOS; sampling uses the KV cache, and a CPU
    generator so the same seed gives the same tokens on every device. Sampling
    a large model is slow, so the tokens are kept under ``cache_root()/samples``,
    keyed by the model's weights and every setting that changes them, and
    reused by later runs (a distillation retried with other hyperparameters).
    """
    source = f"self (sampled from the model, temperature 1, seed {config.seed})"
    path = None
    if cache:
        key = hashlib.sha256(json.dumps([model_fingerprint(model), config.nsamples, config.seqlen, config.seed, bos,
                                         batch_size]).encode()).hexdigest()[:24]
        path = cache_root() / "samples" / f"{key}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError):
                cached = None  # a damaged cache file is sampled again and replaced
            if isinstance(cached, torch.Tensor) and cached.dtype == torch.int64 and cached.dim() == 2 \
                    and len(cached) == config.nsamples:
                return CalibrationSet(cached, source)
    tokens = _sample(model, config, bos, batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(tokens, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a short file under the key
    return CalibrationSet(tokens, source)


@torch.no_grad()
def _sample(model, config: CalibConfig, bos: int, batch_size: int) -> torch.Tensor:
    from tqdm.auto import tqdm

    max_ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None) or config.seqlen
    seqlen = min(config.seqlen, int(max_ctx))
    gen = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, config.nsamples, batch_size), desc="sample calibration", unit="batch", leave=False):
            n = min(batch_size, config.nsamples - start)
            tokens = torch.full((n, 1), bos, dtype=torch.int64)
            past, step_input = None, tokens
            for _ in range(seqlen - 1):
                result = model(step_input.to(device), past_key_values=past, use_cache=True)
                past = result.past_key_values
                probs = torch.softmax(result.logits[:, -1].float().cpu(), dim=-1)
                step_input = torch.multinomial(probs, 1, generator=gen)
                tokens = torch.cat([tokens, step_input], dim=1)
            out.append(tokens)
    finally:
        model.train(was_training)
    return torch.cat(out)
