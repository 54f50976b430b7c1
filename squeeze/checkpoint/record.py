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
# The key under which passes that train return their logs among the per-layer records (squeeze.json keeps them
# under "training": loss curve, evaluations, tokens and seconds; a trained model's bytes depend on the machine
# anyway).
TRAINING_RECORD = "<training>"


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


PRUNE_KEYS = ("pattern", "sparsity")


def is_pruning(config) -> bool:
    """A pruning pass config (it sets weights to zero, on no grid) rather than a quantization one."""
    return getattr(config, "scheme", None) is None and not getattr(config, "trains", False)


def keeps_float(config) -> bool:
    """A pass after which a model may hold no quantized layer and still be saved: pruning, distillation."""
    return getattr(config, "scheme", None) is None


def layer_record(previous: dict | None, method: str, config, record: dict) -> dict:
    """A layer's record after a pass: the pass's own ("scheme" for quantization, "pattern" for pruning),
    with what an earlier pruning pass recorded carried over ("pruned_by", "pattern", "sparsity")."""
    if is_pruning(config):
        return {"method": method, "pattern": config.label, **record}
    out = {"method": method, "scheme": config.scheme.name, **record}
    if hasattr(config, "pattern"):  # pruned and quantized in one sweep (SparseGPT with a scheme)
        out["pattern"] = config.label
    elif previous and "pattern" in previous:
        out["pruned_by"] = previous.get("pruned_by", previous["method"])
        out.update({k: previous[k] for k in PRUNE_KEYS if k in previous})
    return out


def _source_pruning(source_path: Path | None) -> dict[str, dict]:
    """What the source model's squeeze.json says its pruning did, per layer ({} for an unpruned source)."""
    from squeeze.checkpoint.gptq import read_metadata

    if source_path is None or not Path(source_path).is_dir():
        return {}
    layers = (read_metadata(Path(source_path)) or {}).get("layers") or {}
    return {name: {"pruned_by": r.get("pruned_by", r.get("method")), **{k: r[k] for k in PRUNE_KEYS if k in r}}
            for name, r in layers.items() if isinstance(r, dict) and "pattern" in r}


def checkpoint_metadata(scheme, layer_schemes: dict[str, QuantScheme], records: dict | None, recipe_dict: dict | None,
                        calib, source_path: Path | None, source_sha256: str | None) -> dict:
    """The content of squeeze.json; ``scheme`` None for a float model (pruned, not quantized)."""
    records = dict(records or {})
    training = records.pop(TRAINING_RECORD, None)
    layers = {name: {**records.get(name, {}), "scheme": s.name, "scheme_dict": s.to_dict()}
              for name, s in layer_schemes.items()}
    layers.update({name: dict(r) for name, r in records.items() if name not in layers and "pattern" in r})
    for name, pruning in _source_pruning(source_path).items():  # a pruned model quantized in a second run
        if name in layers and "pattern" not in layers[name]:
            layers[name].update(pruning)
    return {
        "squeeze_version": __version__,
        "method": recipe_dict["passes"][-1]["method"] if recipe_dict else None,
        "scheme": scheme.to_dict() if scheme is not None else None,
        "recipe": recipe_dict,
        "calibration": {"source": calib.source, "sha256": calib.sha256, "shape": list(calib.input_ids.shape)}
        if calib is not None else None,
        "source_model": {"path": str(source_path), "sha256": source_sha256} if source_path else None,
        "layers": layers,
        **({"training": training} if training else {}),
    }
