"""squeeze.json: what made a checkpoint (recipe, calibration, source, each layer's grid and error record).

It holds no clock time, so the same inputs give the same bytes; when and how long a run took goes in
``squeeze-run.json`` beside it (`RUN_LOG_NAME`).
"""

from __future__ import annotations

from pathlib import Path

from squeeze import __version__
from squeeze.errors import SqueezeError
from squeeze.scheme import GGUFMix, QuantScheme

RUN_LOG_NAME = "squeeze-run.json"


def checkpoint_scheme(layer_schemes: dict[str, QuantScheme], passes: tuple):
    """The checkpoint's scheme: the layers' one grid, or the GGUF mix that gave them several GGUF types."""
    schemes = {s.with_(activations=None) for s in layer_schemes.values()}
    if len(schemes) == 1:
        return next(iter(layer_schemes.values()))
    mixes = [p.scheme for p in passes if isinstance(p.scheme, GGUFMix)]
    if mixes and all(s.gguf is not None for s in schemes):
        return mixes[-1]
    raise SqueezeError(f"one checkpoint holds one weight grid or one GGUF mix (--scheme q4_k_m, with the recipe "
                       f"passed to save); the model mixes {sorted(s.name for s in schemes)}")


def checkpoint_metadata(scheme, layer_schemes: dict[str, QuantScheme], records: dict | None, recipe_dict: dict | None,
                        calib, source_path: Path | None, source_sha256: str | None) -> dict:
    """The content of squeeze.json."""
    layers = {name: {**(records or {}).get(name, {}), "scheme": s.name, "scheme_dict": s.to_dict()}
              for name, s in layer_schemes.items()}
    return {
        "squeeze_version": __version__,
        "method": recipe_dict["passes"][-1]["method"] if recipe_dict else None,
        "scheme": scheme.to_dict(),
        "recipe": recipe_dict,
        "calibration": {"source": calib.source, "sha256": calib.sha256, "shape": list(calib.input_ids.shape)}
        if calib is not None else None,
        "source_model": {"path": str(source_path), "sha256": source_sha256} if source_path else None,
        "layers": layers,
    }
