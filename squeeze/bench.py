"""`squeeze bench`: one model x methods x export formats, measured the same way, into one report.

Every cell is quantized (checkpoints cached per method), exported (artifacts cached per cell) and
measured in a fresh subprocess (so peak memory is the cell's own); finished cells are cached
under a key of model hash + cell config, so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from squeeze import __version__
from squeeze.errors import SqueezeError

FORMAT_SUFFIX = {"gguf": ".gguf", "onnx": ".onnx", "tensorrt": ".plan"}
FORMAT_RUNTIME = {"torch": "torch", "gguf": "llama.cpp", "onnx": "onnxruntime", "tensorrt": "tensorrt"}
DEFAULT_LATENCY = {"batch": 1, "prompt_tokens": 128, "new_tokens": 32, "warmup": 2, "runs": 5}


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark. ``methods`` items: {method, scheme, ...pass options}; ``formats``: {format, type}."""

    name: str
    model: str
    data: str
    methods: tuple = ()
    formats: tuple = ({"format": "torch"},)
    task: str | None = None
    calib: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    ctx: int | None = None

    @classmethod
    def from_dict(cls, d: dict, base: Path = Path(".")) -> "BenchConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise SqueezeError(f"unknown bench config key(s) {sorted(unknown)}; known: {sorted(known)}")
        for key in ("name", "model", "data"):
            if not d.get(key):
                raise SqueezeError(f"bench config needs {key!r}")
        resolve = lambda p: str((base / p).resolve()) if p is not None and not Path(p).is_absolute() else p
        formats = tuple(d.get("formats") or ({"format": "torch"},))
        for f in formats:
            if f.get("format") not in FORMAT_RUNTIME:
                raise SqueezeError(f"unknown bench format {f.get('format')!r}; known: {', '.join(FORMAT_RUNTIME)}")
        return cls(
            name=str(d["name"]),
            model=resolve(d["model"]),
            data=resolve(d["data"]),
            methods=tuple(d.get("methods") or ()),
            formats=formats,
            task=resolve(d.get("task")),
            calib={k: (resolve(v) if k == "path" else v) for k, v in (d.get("calib") or {}).items()},
            latency={**DEFAULT_LATENCY, **(d.get("latency") or {})},
            ctx=d.get("ctx"),
        )

    @classmethod
    def load(cls, path: str | Path) -> "BenchConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise SqueezeError(f"bench config {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise SqueezeError(f"cannot parse {str(p)!r}: {e}") from None
        if not isinstance(data, dict):
            raise SqueezeError(f"bench config {str(p)!r} must be a mapping")
        try:
            return cls.from_dict(data, base=p.parent)
        except (SqueezeError, TypeError, ValueError, AttributeError) as e:  # say which file holds the mistake
            raise SqueezeError(f"bench config {str(p)!r}: {e}") from None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def _recipe_for(method: dict):
    from squeeze.recipe import Recipe

    return Recipe.from_dict({"passes": [dict(method)]})


def quantize_cached(config: BenchConfig, method: dict, cache: Path, model_hash: str) -> Path:
    """The checkpoint for ``method`` (quantized once, then reused)."""
    from squeeze import api
    from squeeze.calib import CalibConfig

    out = cache / "checkpoints" / _digest([model_hash, method, config.calib, __version__])
    if not (out / "squeeze.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        api.quantize_dir(config.model, out, _recipe_for(method), CalibConfig(**config.calib), overwrite=True)
    return out


def export_cached(source: Path, fmt: dict, cache: Path, key: str) -> tuple[Path, str]:
    """The artifact for one cell and its type as the exporter named it ("-" for torch or a reused file)."""
    from squeeze import api

    if fmt["format"] == "torch":
        return source, "-"
    out = cache / "artifacts" / f"{key}{FORMAT_SUFFIX[fmt['format']]}"
    if out.exists():
        return out, fmt.get("type", "-")
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in fmt.items() if k != "format"}
    if "type" in options:
        options["qtype"] = options.pop("type")
    return out, api.export(source, fmt["format"], out, **options).type


def measure_cell(artifact: Path, config: BenchConfig, runtime: str) -> dict:
    """Run the measurements for one artifact in a fresh Python process; returns its JSON result."""
    job = {"artifact": str(artifact), "reference": config.model, "data": config.data, "task": config.task,
           "runtime": runtime, "ctx": config.ctx, "latency": config.latency}
    proc = subprocess.run([sys.executable, "-m", "squeeze.bench_cell"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise SqueezeError(lines[-1] if lines else f"measurement failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grid_cells(config: BenchConfig) -> list[tuple[dict, dict]]:
    """(method, format) of every cell, the float model first."""
    cells = [(m, f) for m in config.methods for f in config.formats]
    if not any(m["method"] == "float" for m in config.methods):  # the float model is always the first row
        cells.insert(0, ({"method": "float"}, {"format": "torch"}))
    return cells


def run_bench(config: BenchConfig, cache: Path, progress: bool = True, keep_going: bool = True) -> list[dict]:
    """All rows of the grid: the float model (method "float" in the config exports it to every format,
    else it is measured in torch only), then every method x format cell. A failed cell is a row with an
    "error"; without ``keep_going`` the grid stops there."""
    from squeeze.calib import read_text
    from squeeze.eval.tasks import load_multiple_choice
    from squeeze.model import directory_hash, validate_model_dir

    model_hash = directory_hash(validate_model_dir(config.model))
    read_text(config.data)  # the inputs every cell reads fail once, here, not as one error per cell
    if config.task is not None:
        load_multiple_choice(config.task)
    cells = grid_cells(config)
    inputs = [model_hash, _file_digest(config.data), _file_digest(config.task), config.ctx, config.latency, __version__]
    rows = []
    for method, fmt in tqdm(cells, desc="bench", unit="cell", disable=not progress):
        key = _digest([inputs, method, fmt, config.calib])
        cached = cache / "cells" / f"{key}.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        row = {"method": method["method"], "scheme": method.get("scheme", "-"), "format": fmt["format"],
               "type": fmt.get("type", "-"), "runtime": FORMAT_RUNTIME[fmt["format"]]}
        try:
            source = Path(config.model) if method["method"] == "float" else quantize_cached(config, method, cache, model_hash)
            artifact, row["type"] = export_cached(source, fmt, cache, key)
            row.update(measure_cell(artifact, config, row["runtime"]))
        except SqueezeError as e:
            row["error"] = str(e)
            rows.append(row)  # failed cells are reported, not cached: a later run retries them
            if not keep_going:
                break
            continue
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row))
        rows.append(row)
    return rows


def failure_summary(rows: list[dict], cells: int) -> str | None:
    """One line naming the failed cells (None if every cell ran)."""
    failed = [r for r in rows if "error" in r]
    if not failed:
        return None
    first = failed[0]
    name = f"{first['method']}:{first['scheme']} x {first['format']}:{first['type']}"
    return (f"{len(failed)} of {cells} bench cells failed (ran {len(rows)}); first: {name}: {first['error']}")


def bench_report(config: BenchConfig, rows: list[dict], device: dict) -> dict:
    return {"name": config.name, "model": config.model, "device": device, "config": asdict(config), "rows": rows,
            "squeeze_version": __version__}
