"""One training loop for the passes that train (distillation, QAT): AdamW, warmup + cosine, accumulation,
clipping, bf16 autocast, progress, periodic evaluation, checkpoints and resume, seeded.

    log = train(parameters, loss_fn, n_examples, TrainConfig(steps=200), state_dir=work / "train")

``loss_fn(indices)`` computes the loss of the training examples ``indices`` (a micro-batch) and returns
``(loss, tokens)``; the loop owns the order (a seeded permutation per epoch, so a resumed run sees the same
batches), the optimizer and the schedule. A checkpoint holds the parameters, the optimizer state and the log;
a killed run started again with the same ``state_dir`` continues from the last one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from squeeze.errors import SqueezeError

TRAIN_PRECISIONS = ("float32", "bfloat16")
STATE_FILE = "train-state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` sequences per micro-batch, ``grad_accum`` micro-batches per step;
    ``warmup`` steps of linear warmup, then cosine decay to ``min_lr_ratio`` x ``lr``; ``clip``: the gradient
    norm limit (0: none); ``precision``: "bfloat16" runs the forwards under autocast (parameters, gradients and
    optimizer state stay float32); ``eval_every`` / ``checkpoint_every`` in steps (0: only at the end)."""

    steps: int = 200
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: int = 10
    min_lr_ratio: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    clip: float = 1.0
    precision: str = "float32"
    eval_every: int = 0
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SqueezeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "checkpoint_every"):
            if (getattr(self, name) or 0) < 0:
                raise SqueezeError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SqueezeError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise SqueezeError("weight decay and clip must be >= 0 and min_lr_ratio in [0, 1]")
        if self.precision not in TRAIN_PRECISIONS:
            raise SqueezeError(f"training precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}")


@dataclass
class TrainLog:
    """What the run did: loss per step, evaluations (step, value), tokens seen, seconds, resumed-from step."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    best_step: int | None = None  # with keep_best: the evaluated step whose parameters were kept

    def to_dict(self) -> dict:
        return {"steps": len(self.losses), "loss": [round(x, 6) for x in self.losses],
                "eval": [[s, round(v, 6)] for s, v in self.evals], "tokens": self.tokens,
                "seconds": round(self.seconds, 2), "resumed_from": self.resumed_from, "best_step": self.best_step}


def learning_rate(config: TrainConfig, step: int) -> float:
    """The rate of step ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_order(n_examples: int, config: TrainConfig, step: int, micro: int) -> list[int]:
    """The examples of micro-batch ``micro`` of step ``step``: consecutive slices of a seeded permutation per
    epoch, so the order depends only on the seed and the position (a resumed run sees the same batches)."""
    first = (step * config.grad_accum + micro) * config.batch_size
    out = []
    for i in range(first, first + config.batch_size):
        epoch, pos = divmod(i, n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def run_key(config: TrainConfig, extra: dict) -> str:
    """What a checkpoint must match to be resumed: the settings and the caller's description of the run."""
    return hashlib.sha256(json.dumps({"train": asdict(config), **extra}, sort_keys=True, default=str).encode()).hexdigest()


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train(
    parameters: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[list[int]], tuple[torch.Tensor, int]],
    n_examples: int,
    config: TrainConfig,
    *,
    state_dir: Path | None = None,
    key: dict | None = None,
    eval_fn: Callable[[], float] | None = None,
    progress: bool = True,
    desc: str = "train",
    keep_best: bool = False,
    lr_scale: dict[str, float] | None = None,
) -> TrainLog:
    """Optimise ``parameters`` (name -> Parameter) on ``loss_fn`` for ``config.steps`` steps; returns the log.

    With ``state_dir``, a checkpoint is written every ``checkpoint_every`` steps (atomically) and a run whose
    ``key`` and settings match is resumed from it. ``eval_fn`` (lower is better) runs every ``eval_every``
    steps and at the end; with ``keep_best`` also before the first step, and the parameters of the best
    evaluation are the ones left at the end (training never hands back something worse than it was given).
    ``lr_scale``: a factor on the learning rate per parameter name (1 for those not named).
    """
    from tqdm.auto import tqdm

    if n_examples < 1:
        raise SqueezeError("training needs at least one example")
    if not parameters:
        raise SqueezeError("nothing to train: no parameters were selected")
    torch.manual_seed(config.seed)
    params = list(parameters.values())
    device = params[0].device
    scale = lr_scale or {}
    groups = [{"params": [p], "lr_scale": float(scale.get(n, 1.0))} for n, p in parameters.items()]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    log, start = TrainLog(), 0
    fingerprint = run_key(config, key or {})
    if state_dir is not None:
        start = _resume(state_dir, fingerprint, parameters, optimizer, log)
    t0 = time.perf_counter() - log.seconds
    best: tuple[float, int, dict] | None = None
    if keep_best and eval_fn is not None:
        if start == 0:
            log.evals.append((0, float(eval_fn())))
        step0, value0 = min(((s, v) for s, v in log.evals), key=lambda e: e[1])
        if step0 == start:  # otherwise the best evaluated state is not at hand: only later ones compete
            best = (value0, step0, _snapshot(parameters))
    bar = tqdm(total=config.steps, initial=start, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step) * group["lr_scale"]
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for micro in range(config.grad_accum):
                with _autocast(config, device):
                    loss, tokens = loss_fn(batch_order(n_examples, config, step, micro))
                if not torch.isfinite(loss):
                    raise SqueezeError(f"the training loss became {float(loss.detach())} at step {step + 1}; "
                                       "lower --lr or use --train-precision float32")
                (loss / config.grad_accum).backward()
                step_loss += float(loss.detach()) / config.grad_accum
                step_tokens += tokens
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            log.losses.append(step_loss)
            log.tokens += step_tokens
            log.seconds = time.perf_counter() - t0
            done = step + 1
            if eval_fn is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
                log.evals.append((done, float(eval_fn())))
                if keep_best and (best is None or log.evals[-1][1] < best[0]):
                    best = (log.evals[-1][1], done, _snapshot(parameters))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{log.tokens / max(log.seconds, 1e-9):.0f}",
                            **({"eval": f"{log.evals[-1][1]:.3f}"} if log.evals else {}))
            if state_dir is not None and done < config.steps and config.checkpoint_every and \
                    done % config.checkpoint_every == 0:
                _save_state(state_dir, fingerprint, done, parameters, optimizer, log)
    finally:
        bar.close()
    for p in params:
        p.grad = None
    if best is not None:
        log.best_step = best[1]
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(best[2][name])
    return log


def _snapshot(parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in parameters.items()}


def _save_state(state_dir: Path, fingerprint: str, step: int, parameters, optimizer, log: TrainLog) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    torch.save({"key": fingerprint, "step": step, "parameters": {n: p.detach() for n, p in parameters.items()},
                "optimizer": optimizer.state_dict(), "log": json.dumps({**log.to_dict(), "loss": log.losses,
                                                                          "eval": log.evals})}, tmp)
    tmp.replace(state_dir / STATE_FILE)


def _resume(state_dir: Path, fingerprint: str, parameters, optimizer, log: TrainLog) -> int:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than fail
        return 0
    if state.get("key") != fingerprint or set(state["parameters"]) != set(parameters):
        return 0
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(state["parameters"][name].to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    saved = json.loads(state["log"])
    log.losses, log.evals = list(saved["loss"]), [tuple(e) for e in saved["eval"]]
    log.tokens, log.seconds, log.resumed_from = saved["tokens"], saved["seconds"], state["step"]
    return int(state["step"])
