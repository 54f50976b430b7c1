"""The main job on the bundled default: quantize stories260K, evaluate against the original."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from squeeze import api
from squeeze.calib import CalibConfig
from squeeze.passes.rtn import RTN
from squeeze.resources import DEFAULT_MODEL, default_eval_text
from squeeze.scheme import get_scheme

QUICKSTART_SCHEMES = ("w8", "w4g32-asym")
TABLE_COLUMNS = ("method", "scheme", "ppl", "ppl_delta_pct", "kld", "top1_agreement", "size_bytes")


def compare_schemes(
    model_dir: Path,
    data: Path,
    scheme_names: tuple[str, ...],
    work_dir: Path,
    calib: CalibConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Baseline row plus one RTN row per scheme: ppl, its change, KLD, top-1 agreement, size."""
    base = api.evaluate(model_dir, data, progress=progress)
    rows = [{"method": "float", "scheme": "-", **base.to_dict(), "ppl_delta_pct": 0.0}]
    for name in scheme_names:
        out = work_dir / f"rtn-{name}"
        start = time.perf_counter()
        api.quantize_dir(model_dir, out, RTN(scheme=get_scheme(name)), calib, overwrite=True)
        quant_seconds = time.perf_counter() - start
        res = api.evaluate(out, data, reference=model_dir, progress=progress)
        row = {"method": "rtn", "scheme": name, **res.to_dict(), "quant_seconds": quant_seconds}
        row["ppl_delta_pct"] = 100.0 * (res.ppl / base.ppl - 1.0)
        rows.append(row)
    return rows


def run_quickstart(out_dir: Path | None = None, progress: bool = True) -> list[dict]:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        return compare_schemes(DEFAULT_MODEL, default_eval_text(), QUICKSTART_SCHEMES, out_dir, progress=progress)
    with tempfile.TemporaryDirectory(prefix="squeeze-quickstart-") as tmp:
        return compare_schemes(DEFAULT_MODEL, default_eval_text(), QUICKSTART_SCHEMES, Path(tmp), progress=progress)
