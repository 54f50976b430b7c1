"""Passes that train: knowledge distillation (`Distill`) and quantization-aware training (`QAT`).

    squeeze.quantize(model, QAT(scheme=get_scheme("w3g32"), steps=300), calib)   # GPTQ, then QAT with KD
    squeeze.quantize(model, Recipe((Structured(ffn=0.75), Distill(steps=300))), calib)

The student is the model being compressed; the teacher is the model the recipe started from (or
``teacher=PATH``). The teacher's targets (top-k logits, hidden states) are computed once before the recipe
runs and streamed from disk (`distill_core`), so the two are never trained side by side. Quantized layers
train on their own grid (`fakequant`: prepare, train, convert back to the same QuantLinear); float weights in
the transformer blocks train as they are; embeddings and the output head stay frozen. Pruned layers keep their
zeros. The loop is `squeeze.train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from squeeze.checkpoint.record import TRAINING_RECORD
from squeeze.errors import SqueezeError
from squeeze.model import find_blocks
from squeeze.passes.distill_core import (TeacherTargets, check_hidden_layers, hidden_mse, kd_loss, model_fingerprint,
                                         next_token_ce)
from squeeze.passes.fakequant import convert, prepare
from squeeze.registry import register_pass
from squeeze.scheme import GGUFMix, QuantScheme, get_scheme
from squeeze.train import TrainConfig, run_key, train

QAT_INITS = ("gptq", "rtn", "awq")


@dataclass(frozen=True)
class TrainingOptions(TrainConfig):
    """Distillation settings shared by `Distill` and `QAT`, beside the optimisation ones of `TrainConfig`.

    ``teacher``: a model path; None = the model as the recipe found it. ``temperature``: the KD temperature;
    ``top_k``: teacher logits kept per token; ``ce_weight``: weight of the data's next-token cross-entropy
    added to the KD loss; ``hidden_layers`` / ``hidden_weight``: hidden states (0 = embeddings, i = block i's
    output) matched by normalised MSE. ``lr`` is the learning rate of float parameters (norms, float weights);
    ``grid_lr`` that of quantized weights, in steps of their grid (`grid_lr_scales`; None: ``lr`` for all).
    ``holdout``: data windows kept out of training (at most an eighth of them); the distillation loss on them is
    measured before training, every ``eval_every`` steps (None: a tenth of the steps) and at the end, and the
    parameters of the best measurement are the result, so training never hands back a model worse on held-out
    data than the one it was given. ``work_dir``: where the teacher's targets and the resumable training state
    go (default: ``$SQUEEZE_CACHE`` or ``~/.cache/squeeze``, under ``train/``).
    """

    teacher: str | None = None
    temperature: float = 1.0
    top_k: int = 128
    ce_weight: float = 0.0
    hidden_layers: tuple[int, ...] = ()
    hidden_weight: float = 1.0
    grid_lr: float | None = 0.02
    eval_every: int | None = None
    holdout: int = 8
    work_dir: str | None = None
    device: str | None = None

    trains: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise SqueezeError(f"--temperature must be a positive number, got {self.temperature}")
        if self.top_k < 1:
            raise SqueezeError(f"--top-k must be at least 1, got {self.top_k}")
        if self.ce_weight < 0 or self.hidden_weight < 0:
            raise SqueezeError("--ce-weight and --hidden-weight must be 0 or more")
        if self.grid_lr is not None and not self.grid_lr > 0:
            raise SqueezeError(f"--grid-lr must be a positive number of grid steps, got {self.grid_lr}")
        if self.device is not None:
            check_device(self.device)
        if self.holdout < 0:
            raise SqueezeError(f"--holdout must be 0 or more windows, got {self.holdout}")

    def train_config(self) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)} - {"eval_every"}
        every = max(1, self.steps // 10) if self.eval_every is None else self.eval_every
        return TrainConfig(**{k: getattr(self, k) for k in names}, eval_every=every)

    def target_spec(self) -> tuple[int, tuple[int, ...], float]:
        """What the teacher must provide: (top-k, hidden-state layers, the temperature of the tail bin)."""
        return self.top_k, tuple(self.hidden_layers) if self.hidden_weight > 0 else (), self.temperature


@dataclass(frozen=True)
class Distill(TrainingOptions):
    """Train the model (quantized, pruned or both) to match its teacher's next-token distribution."""


@dataclass(frozen=True)
class QAT(TrainingOptions):
    """Quantization-aware training on ``scheme``'s exact grid: layers not yet quantized are first rounded by
    ``init`` (GPTQ by default, on the same grid), then trained with the distillation loss against the model the
    recipe started from. ``learn_scales``: LSQ-style scales (and zero points on asymmetric grids, block mins
    on GGUF grids), trained on the grid the checkpoint stores them on (`fakequant`)."""

    scheme: QuantScheme | GGUFMix = field(default_factory=lambda: get_scheme("w4g128"))
    init: str = "gptq"
    learn_scales: bool = False
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in QAT_INITS:
            raise SqueezeError(f"unknown QAT init {self.init!r}; choose from {', '.join(QAT_INITS)}")

    def init_config(self):
        """The pass that puts the layers on the grid before training."""
        from squeeze.registry import get_pass

        return get_pass(self.init).config_cls(scheme=self.scheme, targets=self.targets, ignore=self.ignore)


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SqueezeError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SqueezeError(f"device {name!r}: this machine has no CUDA device (or torch is a CPU build)")


def trainable_parameters(model: nn.Module, sparse: set[str]) -> tuple[dict[str, nn.Parameter], list]:
    """Float parameters inside the transformer blocks (embeddings and the head stay frozen), and the handles of
    the gradient masks through which the weights of ``sparse`` float Linears (pruned) keep their zeros."""
    found = find_blocks(model)
    if found is None:
        raise SqueezeError("training needs a transformer (a decoder-block list); this model has none")
    prefix, blocks = found
    for p in model.parameters():
        p.requires_grad_(False)
    out = {f"{prefix}.{name}": p for name, p in blocks.named_parameters() if p.is_floating_point()}
    # a FakeQuantLinear's scales, zero points and block mins train only when learned
    out = {n: p for n, p in out.items()
           if not (n.endswith((".scales", ".zeros", ".offsets")) and not _learned(model, n))}
    hooks = []
    for name in sparse:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            keep = module.weight.detach() != 0
            hooks.append(module.weight.register_hook(lambda g, keep=keep: g * keep))
    for p in out.values():
        p.requires_grad_(True)
    return out, hooks


def _learned(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return (getattr(module, "learn_scales", False) and name.endswith((".scales", ".offsets"))) or \
        (getattr(module, "learn_zeros", False) and name.endswith(".zeros"))


def distill_model(model: nn.Module, config: TrainingOptions, calib, teacher: TeacherTargets,
                  sparse: set[str] = frozenset(), learn_scales: bool = False, desc: str = "distill") -> dict:
    """Train ``model`` in place against ``teacher`` on ``calib``'s windows; returns the training record."""
    if calib is None:
        raise SqueezeError("distillation needs training data: pass --calib FILE (or --calib self)")
    ids = calib.input_ids
    if teacher.n != len(ids):
        raise SqueezeError("the teacher's targets were computed on other data than this run's")
    if teacher.temperature != config.temperature:
        raise SqueezeError(f"the teacher's targets were computed at temperature {teacher.temperature}, "
                           f"this run distils at {config.temperature}")
    holdout = min(config.holdout, len(ids) // 8)  # at most an eighth of the windows is kept out
    train_rows, eval_rows = list(range(holdout, len(ids))), list(range(holdout))
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    model.to(device)
    blocks = find_blocks(model)
    if config.hidden_layers:
        check_hidden_layers(tuple(config.hidden_layers), len(blocks[1]) if blocks else 0)
    fake = prepare(model, learn_scales, sparse)
    params, hooks = trainable_parameters(model, sparse)
    lr_scale = grid_lr_scales(fake, config) if config.grid_lr is not None else None
    was_training = model.training
    model.train()
    spec_layers = config.target_spec()[1]

    def loss_on(rows: list[int]) -> tuple[torch.Tensor, int]:
        batch = ids[rows].to(device)
        out = model(batch, output_hidden_states=bool(spec_layers), use_cache=False)
        values, indices, tail = teacher.top(rows)
        loss = kd_loss(out.logits, values.to(device), indices.to(device), tail.to(device), config.temperature)
        if config.ce_weight:
            loss = loss + config.ce_weight * next_token_ce(out.logits, batch)
        for layer in spec_layers:
            loss = loss + config.hidden_weight * hidden_mse(out.hidden_states[layer], teacher.hidden(layer, rows).to(device))
        return loss, batch.numel()

    def evaluate() -> float:
        """The distillation loss on the held-out windows (what training lowers, on data it never sees)."""
        with torch.no_grad():
            model.eval()
            total = [loss_on([r])[0] for r in eval_rows]
            model.train()
        return float(torch.stack(total).mean())

    key = {"teacher": teacher.path.name, "config": repr(config), "tokens": list(ids.shape), "desc": desc,
           "student": model_fingerprint(model)}
    state_dir = work_dir(config) / "runs" / run_key(config.train_config(), key)[:24]
    try:
        log = train(params, lambda rows: loss_on([train_rows[i] for i in rows]), len(train_rows),
                    config.train_config(), state_dir=state_dir, key=key,
                    eval_fn=evaluate if eval_rows else None, desc=desc, keep_best=bool(eval_rows), lr_scale=lr_scale)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    convert(model)
    model.eval()
    (state_dir / "train-state.pt").unlink(missing_ok=True)  # the run finished: nothing to resume
    return {**log.to_dict(), "quantized_layers_trained": len(fake), "parameters_trained": sum(
        p.numel() for p in params.values()), "train_windows": len(train_rows), "holdout_windows": len(eval_rows)}


def grid_lr_scales(fake: dict, config: TrainingOptions) -> dict[str, float]:
    """Learning-rate factors that make ``grid_lr`` a step size in units of each layer's grid: a quantized
    layer's latent weights move by about ``grid_lr`` of its mean quantization step per optimizer step (Adam's
    updates are about the learning rate in size), whatever the model's weight scale or the bit width; learned
    scales a tenth of that relative to their size; zero points (in code units) ``grid_lr`` codes."""
    out = {}
    for name, layer in fake.items():
        step = float(layer.scales.detach().abs().mean())
        out[f"{name}.latent"] = config.grid_lr * step / config.lr
        out[f"{name}.scales"] = 0.1 * config.grid_lr * step / config.lr
        out[f"{name}.offsets"] = 0.1 * config.grid_lr * step / config.lr
        out[f"{name}.zeros"] = config.grid_lr / config.lr
    return out


def work_dir(config: TrainingOptions) -> Path:
    from squeeze.resources import cache_root

    return Path(config.work_dir) if config.work_dir else cache_root() / "train"


def sparse_layers(records: dict) -> set[str]:
    """Layers a pruning pass left sparse (their records carry a pattern)."""
    return {n for n, r in records.items() if isinstance(r, dict) and "pattern" in r}


def apply_distill(model: nn.Module, config: Distill, calib=None, io=None, *, teacher: TeacherTargets | None = None,
                  records: dict | None = None) -> dict:
    if teacher is None:
        raise SqueezeError("distillation needs the teacher's targets (squeeze.quantize computes them)")
    log = distill_model(model, config, calib, teacher, sparse_layers(records or {}), desc="distill")
    return {TRAINING_RECORD: log}


def apply_qat(model: nn.Module, config: QAT, calib=None, io=None, *, teacher: TeacherTargets | None = None,
              records: dict | None = None) -> dict:
    from squeeze.modules import QuantLinear
    from squeeze.registry import pass_for_config

    if teacher is None:
        raise SqueezeError("QAT needs the teacher's targets (squeeze.quantize computes them)")
    out: dict = {}
    if not any(isinstance(m, QuantLinear) for m in model.modules()):  # not on a grid yet: the init pass first
        init = config.init_config()
        with torch.no_grad():
            for name, rec in pass_for_config(init).apply(model, init, calib).items():
                out[name] = {**rec, "init": config.init}
    log = distill_model(model, config, calib, teacher, sparse_layers(records or {}), config.learn_scales, desc="qat")
    out[TRAINING_RECORD] = log
    return out


register_pass("distill", Distill, apply_distill, lambda config: True)
register_pass("qat", QAT, apply_qat, lambda config: True)
