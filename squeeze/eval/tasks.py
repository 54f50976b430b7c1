"""Task accuracy: multiple choice by log-likelihood, from a JSONL of {context, choices, label}.

Each choice is scored as the summed log-probability of its tokens after the
context (``acc``), and divided by its length in characters (``acc_norm``, as
lm-evaluation-harness does), on any runtime that gives logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from squeeze.calib import jsonl_records
from squeeze.errors import SqueezeError


@dataclass(frozen=True)
class Choice:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass
class TaskResult:
    accuracy: float
    accuracy_norm: float
    items: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_multiple_choice(path: str | Path) -> list[Choice]:
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"task file {str(p)!r} " + ("is not a file" if p.exists() else "does not exist"))
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SqueezeError(f"task file {str(p)!r} is not UTF-8 text") from None
    items = []
    for lineno, rec in jsonl_records(p, raw):
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("context"), str)
            and isinstance(rec.get("choices"), list)
            and len(rec["choices"]) >= 2
            and all(isinstance(c, str) and c for c in rec["choices"])
            and isinstance(rec.get("label"), int)
            and 0 <= rec["label"] < len(rec["choices"])
        )
        if not ok:
            raise SqueezeError(
                f"{p}:{lineno}: expected {{\"context\": str, \"choices\": [2+ non-empty str], \"label\": index}}"
            )
        items.append(Choice(rec["context"], tuple(rec["choices"]), rec["label"]))
    if not items:
        raise SqueezeError(f"task file {str(p)!r} has no items")
    return items


def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context (with BOS) and of the continuation as it is tokenized after it."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def choice_logprobs(runtime, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-probability of each continuation after its context, in one right-padded batch.

    Right padding never changes a causal model's logits at earlier positions.
    """
    width = max(len(c) + len(x) for c, x in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.int64)
    for row, (ctx, cont) in enumerate(pairs):
        ids[row, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
    logp = torch.log_softmax(runtime.logits(ids).float(), dim=-1)
    out = []
    for row, (ctx, cont) in enumerate(pairs):
        positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        out.append(float(logp[row, positions, torch.tensor(cont)].sum()))
    return out


def evaluate_multiple_choice(runtime, tokenizer, items: list[Choice], progress: bool = True) -> TaskResult:
    correct = correct_norm = 0
    for item in tqdm(items, desc="task", unit="item", disable=not progress, leave=False):
        scores = choice_logprobs(runtime, [continuation_ids(tokenizer, item.context, c) for c in item.choices])
        norm = [lp / len(c) for lp, c in zip(scores, item.choices)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item.label)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.label)
    return TaskResult(correct / len(items), correct_norm / len(items), len(items))
