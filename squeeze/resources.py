"""Where the bundled default model and corpora live (no network, no ../shared needed)."""

from __future__ import annotations

import os
from pathlib import Path

from squeeze.errors import SqueezeError

_PACKAGE = Path(__file__).resolve().parent
DEFAULT_MODEL = _PACKAGE / "assets" / "models" / "stories260K"
# calibration/ sits at the repository root; wheels carry it as squeeze/assets/calibration.
_CORPUS_DIRS = (_PACKAGE.parent / "calibration", _PACKAGE / "assets" / "calibration")
DEFAULT_CALIB_FILE = "stories260K-samples-calib.txt"
DEFAULT_EVAL_FILE = "stories260K-samples-eval.txt"


def corpus(name: str) -> Path:
    for d in _CORPUS_DIRS:
        if (d / name).is_file():
            return d / name
    raise SqueezeError(f"bundled corpus {name!r} not found in {', '.join(map(str, _CORPUS_DIRS))}")


def default_calibration_text() -> Path:
    return corpus(DEFAULT_CALIB_FILE)


def default_eval_text() -> Path:
    return corpus(DEFAULT_EVAL_FILE)


def cache_root() -> Path:
    """squeeze's cache (teacher targets, training state; benchmarks' models): $SQUEEZE_CACHE, else
    ~/.cache/squeeze."""
    return Path(os.environ.get("SQUEEZE_CACHE") or Path.home() / ".cache" / "squeeze")
