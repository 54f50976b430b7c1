"""Verification at export: onnxruntime runs the file on a few inputs; torch runs the same weights.

A float32 graph of float weights must match torch to a max relative difference (max |ort - torch|
over max |torch|) below `FP32_MAX_REL_DIFF`. A quantized or float16 graph is compared with squeeze's
torch model of the same (quantized) weights: KLD / top-1 agreement for logits, cosine for other
outputs; it fails when clearly broken (below `MIN_TOP1` / `MIN_COSINE`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from squeeze.errors import VerificationError

FP32_MAX_REL_DIFF = 1e-4
# Against its own torch reference a correct quantized graph agrees almost everywhere (measured ~1.0);
# below these it is broken (wrong packing, wrong scales), not merely quantized.
MIN_TOP1 = 0.9
MIN_COSINE = 0.9
# Verification input shapes: (batch, sequence), two shapes so the dynamic axes are exercised.
VERIFY_SHAPES = ((2, 32), (1, 7))


def max_rel_diff(test: torch.Tensor, ref: torch.Tensor) -> float:
    return float((test.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def logits_stats(test: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean KL(ref || test) per token and top-1 agreement, over [..., vocab] logits."""
    t, r = test.float().reshape(-1, test.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    ref_logp, test_logp = F.log_softmax(r, -1), F.log_softmax(t, -1)
    kld = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1).mean()
    top1 = (t.argmax(-1) == r.argmax(-1)).float().mean()
    return {"kld": float(kld), "top1_agreement": float(top1)}


ZERO_ROW = 1e-6  # a row whose norm is below this share of the largest row's is zero (an all-zero int8 input)


def mean_cosine(test: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean cosine similarity of the last-axis vectors; two zero vectors agree (cosine 1, not 0: a W8A8 row whose
    inputs all quantize to 0 is zero in both)."""
    t, r = test.float().reshape(-1, test.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    tn, rn = t.norm(dim=-1), r.norm(dim=-1)
    floor = ZERO_ROW * torch.maximum(tn.max(), rn.max()).clamp(min=1e-30)
    cosine = F.cosine_similarity(t, r, dim=-1)
    return float(torch.where((tn <= floor) & (rn <= floor), torch.ones_like(cosine), cosine).mean())


def token_inputs(vocab_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random (input_ids, attention_mask) pairs; the second has two padded positions."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for batch, seq in VERIFY_SHAPES:
        ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
        pairs.append((ids, torch.ones_like(ids)))
    return pairs


def compare(outputs: list[tuple[torch.Tensor, torch.Tensor]], exact: bool, logits: bool,
            runtime: str = "onnxruntime") -> dict:
    """Verification record for (``runtime``, torch) output pairs; raises VerificationError when broken."""
    test = torch.cat([t.reshape(-1, t.shape[-1]) for t, _ in outputs])
    ref = torch.cat([r.reshape(-1, r.shape[-1]) for _, r in outputs])
    if not torch.isfinite(test).all():
        raise VerificationError(f"{runtime} produced non-finite outputs")
    record: dict = {"runtime": runtime, "max_rel_diff": max_rel_diff(test, ref), "cosine": mean_cosine(test, ref)}
    if logits:
        record.update(logits_stats(test, ref))
    if exact:
        if record["max_rel_diff"] >= FP32_MAX_REL_DIFF:
            raise VerificationError(f"the float32 graph in {runtime} differs from torch: max relative difference "
                                    f"{record['max_rel_diff']:.3g} >= {FP32_MAX_REL_DIFF:g}")
    elif logits and record["top1_agreement"] < MIN_TOP1:
        raise VerificationError(f"top-1 agreement with torch on the same weights is {record['top1_agreement']:.3f} "
                                f"< {MIN_TOP1}; the graph is broken")
    elif record["cosine"] < MIN_COSINE:
        raise VerificationError(f"output cosine with torch on the same weights is {record['cosine']:.3f} "
                                f"< {MIN_COSINE}; the graph is broken")
    return record


class TokenCheck:
    """A causal LM / encoder graph on `token_inputs` in onnxruntime, then its torch reference on the same inputs
    (one after the other: the runtime is gone before the reference runs)."""

    def __init__(self, kind: str, vocab_size: int, exact: bool):
        self.kind, self.exact = kind, exact
        self.name = "logits" if kind == "causal-lm" else "last_hidden_state"
        self.inputs = token_inputs(vocab_size)
        self.got: list[torch.Tensor] = []

    def run_onnx(self, runtime) -> None:
        self.got = [torch.from_numpy(np.asarray(runtime.run(runtime.token_feeds(ids, mask))[self.name], dtype=np.float32))
                    for ids, mask in self.inputs]

    @torch.no_grad()
    def run_torch(self, reference: torch.nn.Module) -> dict:
        pairs = []
        for got, (ids, mask) in zip(self.got, self.inputs):
            out = reference(input_ids=ids, attention_mask=mask)
            pairs.append((got, (out.logits if self.kind == "causal-lm" else out.last_hidden_state).float()))
        return compare(pairs, self.exact, logits=self.kind == "causal-lm")


class ModuleCheck:
    """A plain module's graph on ``graph_inputs``, then the module on ``example_inputs`` (the same, in its dtype)."""

    def __init__(self, example_inputs: tuple, graph_inputs: tuple, exact: bool):
        self.example_inputs, self.graph_inputs, self.exact = example_inputs, graph_inputs, exact
        self.got: list[torch.Tensor] = []

    def run_onnx(self, runtime) -> None:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(runtime.input_names, self.graph_inputs)}
        self.got = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in runtime.run(feeds).values()]

    @torch.no_grad()
    def run_torch(self, reference: torch.nn.Module) -> dict:
        ref = reference(*self.example_inputs)
        refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        return compare([(o, r.float()) for o, r in zip(self.got, refs)], self.exact, logits=False)
