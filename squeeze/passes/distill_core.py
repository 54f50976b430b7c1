"""Knowledge-distillation math and the teacher's targets on disk.

The teacher runs once over the training sequences; its top-k next-token logits (values and indices) and,
optionally, its hidden states at chosen layers are written as memory-mapped arrays under a directory keyed
by the teacher's hash, the tokens and k. Training then streams them, so teacher and student are never in
memory together.

Loss (per token, averaged): T^2 * KL(p_T || q_T) on k + 1 bins: the teacher's top-k tokens, each with its
own probability, and one bin for all other tokens together, holding the rest of the mass (Hinton et al. 2015
for the temperature). p_T is the teacher's softmax at temperature T, q_T the student's, both over the whole
vocabulary and then binned the same way; the teacher's share outside its top k is stored beside the top-k
logits (one number per token). Keeping that bin matters: the truncated form (teacher's top-k renormalised,
student read at those k tokens) is minimised by a student that moves all its mass into the top k, i.e.
becomes over-confident and scores real text, whose tokens are often outside any top k, worse. The binned KL
is zero for the teacher itself, never exceeds the full KL, and with k = vocabulary size it is the full KL.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from squeeze.calib import model_fingerprint  # noqa: F401  (the teacher's identity in a targets key)
from squeeze.errors import SqueezeError

TARGETS_VERSION = 2  # 2: the mass outside the top k is stored (tail.npy) at the key's temperature


def tail_logit(logits: torch.Tensor, top_indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log sum exp(z / T) over the tokens outside ``top_indices`` ([..., V] -> [...]; -inf when there are none):
    the (k+1)-th logit that gives the mass outside the top k its own bin."""
    rest = (logits.float() / temperature).scatter(-1, top_indices.long(), float("-inf"))
    return torch.logsumexp(rest, dim=-1)


def binned_log_probs(top_logits: torch.Tensor, tail: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the k + 1 bins from the top-k logits (at T = 1) and the tail logit (already at T)."""
    return torch.log_softmax(torch.cat([top_logits.float() / temperature, tail.float().unsqueeze(-1)], -1), -1)


def kd_loss(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, tail: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(teacher || student) on the teacher's top-k tokens plus one bin for the rest
    (module docstring). ``student_logits`` [..., V]; the teacher's ``top_values`` / ``top_indices`` [..., k] and
    ``tail`` [...] (`tail_logit` of its logits at ``temperature``)."""
    t = temperature
    log_p = binned_log_probs(top_values, tail, t)
    student_top = student_logits.gather(-1, top_indices.long())
    log_q = binned_log_probs(student_top, tail_logit(student_logits, top_indices, t), t)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)  # an empty tail bin adds nothing
    return kl.mean() * (t * t)


def next_token_ce(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token of the data (the last position has none)."""
    logits = student_logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of hidden states, normalised by the teacher's mean square (scale-free)."""
    t = teacher.float()
    return (student.float() - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12)


@dataclass(frozen=True)
class TeacherTargets:
    """A teacher's cached targets for ``n`` training sequences: top-k logits and hidden states per layer."""

    path: Path
    n: int
    top_k: int
    hidden_layers: tuple[int, ...]
    temperature: float = 1.0

    def top(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k logits, their token ids and the tail logit (at ``temperature``) of the given sequences."""
        values = np.load(self.path / "top_values.npy", mmap_mode="r")
        idx = np.load(self.path / "top_indices.npy", mmap_mode="r")
        tail = np.load(self.path / "tail.npy", mmap_mode="r")
        return (torch.from_numpy(np.ascontiguousarray(values[indices])),
                torch.from_numpy(np.ascontiguousarray(idx[indices]).astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(tail[indices])))

    def hidden(self, layer: int, indices: list[int]) -> torch.Tensor:
        states = np.load(self.path / f"hidden_{layer}.npy", mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(states[indices]).astype(np.float32))


def targets_key(teacher_id: str, input_ids: torch.Tensor, top_k: int, hidden_layers: tuple[int, ...],
                temperature: float = 1.0) -> str:
    tokens = hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()
    spec = {"teacher": teacher_id, "tokens": tokens, "shape": list(input_ids.shape), "top_k": top_k,
            "hidden_layers": list(hidden_layers), "temperature": temperature, "version": TARGETS_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def open_targets(root: Path, key: str) -> TeacherTargets | None:
    """The complete cached targets under ``root/key``, or None."""
    meta = root / key / "targets.json"
    if not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    return TeacherTargets(root / key, m["n"], m["top_k"], tuple(m["hidden_layers"]), m["temperature"])


@torch.no_grad()
def compute_targets(teacher: torch.nn.Module, input_ids: torch.Tensor, root: Path, key: str, top_k: int,
                    hidden_layers: tuple[int, ...] = (), temperature: float = 1.0, batch_size: int = 4,
                    progress: bool = True) -> TeacherTargets:
    """Run ``teacher`` over ``input_ids`` [n, seqlen] and write its targets under ``root/key`` (atomically)."""
    from tqdm.auto import tqdm

    n, seqlen = input_ids.shape
    vocab = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None else None
    k = min(top_k, vocab) if vocab else top_k
    tmp = root / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    values = np.lib.format.open_memmap(tmp / "top_values.npy", "w+", np.float32, (n, seqlen, k))
    indices = np.lib.format.open_memmap(tmp / "top_indices.npy", "w+", np.int32, (n, seqlen, k))
    tails = np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float32, (n, seqlen))
    hidden = {}
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        for start in tqdm(range(0, n, batch_size), desc="teacher targets", unit="batch", disable=not progress,
                          leave=False):
            batch = input_ids[start:start + batch_size].to(device)
            out = teacher(batch, output_hidden_states=bool(hidden_layers), use_cache=False)
            if hidden_layers and start == 0:
                check_hidden_layers(hidden_layers, len(out.hidden_states) - 1)
            logits = out.logits.float()
            top = logits.topk(k, dim=-1)
            values[start:start + len(batch)] = top.values.cpu().numpy()
            indices[start:start + len(batch)] = top.indices.to(torch.int32).cpu().numpy()
            tails[start:start + len(batch)] = tail_logit(logits, top.indices, temperature).cpu().numpy()
            del logits
            for layer in hidden_layers:
                if layer not in hidden:
                    width = out.hidden_states[layer].shape[-1]
                    hidden[layer] = np.lib.format.open_memmap(tmp / f"hidden_{layer}.npy", "w+", np.float16,
                                                              (n, seqlen, width))
                hidden[layer][start:start + len(batch)] = out.hidden_states[layer].half().cpu().numpy()
    except BaseException:
        del values, indices, tails, hidden
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        teacher.train(was_training)
    for array in (values, indices, tails, *hidden.values()):
        array.flush()
    del values, indices, tails, hidden
    (tmp / "targets.json").write_text(json.dumps({"n": n, "seqlen": seqlen, "top_k": k, "temperature": temperature,
                                                  "hidden_layers": list(hidden_layers)}))
    final = root / key
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return TeacherTargets(final, n, k, tuple(hidden_layers), temperature)


def check_hidden_layers(layers: tuple[int, ...], num_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise SqueezeError(f"hidden-state layers {bad} do not exist: the model has hidden states 0..{num_layers} "
                           "(0: the embeddings, i: the output of block i)")
