"""Classifier accuracy for plain-module graphs: inputs and labels from a .npz file.

The file holds ``inputs`` (float array, first axis = samples) and ``labels`` (int array).
With a reference artifact, top-1 agreement with the reference's predictions is reported too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from squeeze.errors import SqueezeError

BATCH = 64


@dataclass
class ClassifyResult:
    accuracy: float
    top1_agreement: float | None
    samples: int
    size_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_labelled(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if p.suffix.lower() != ".npz":
        raise SqueezeError(f"classifier data must be a .npz file with 'inputs' and 'labels', got {str(p)!r}")
    try:
        data = np.load(p)
        inputs, labels = data["inputs"], data["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise SqueezeError(f"cannot read {str(p)!r}: {e} (expected arrays 'inputs' and 'labels')") from None
    if len(inputs) != len(labels) or len(labels) == 0:
        raise SqueezeError(f"{str(p)!r}: 'inputs' and 'labels' need the same, non-zero number of samples")
    return inputs.astype(np.float32), labels.astype(np.int64)


def predict(runtime, inputs: np.ndarray) -> np.ndarray:
    """Argmax class of every sample, through a module graph's first input and output."""
    name = runtime.input_names[0]
    out = [next(iter(runtime.run({name: inputs[i : i + BATCH]}).values())) for i in range(0, len(inputs), BATCH)]
    return np.concatenate(out).reshape(len(inputs), -1).argmax(-1)


def evaluate_classifier(runtime, reference, data: str | Path) -> ClassifyResult:
    inputs, labels = load_labelled(data)
    pred = predict(runtime, inputs)
    agree = float((pred == predict(reference, inputs)).mean()) if reference is not None else None
    return ClassifyResult(float((pred == labels).mean()), agree, len(labels), runtime.size_bytes)
