"""squeeze bench: config validation, report files and schema, resuming from cached cells."""

from __future__ import annotations

import json

import pytest

import squeeze
from squeeze import bench
from squeeze.bench import BenchConfig, bench_report, run_bench
from squeeze.errors import SqueezeError
from squeeze.eval.bench_report import write_report

ROW_KEYS = {"method", "scheme", "format", "runtime", "ppl", "kld", "top1_agreement", "size_bytes", "p50_ms", "p95_ms",
            "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"}


def test_config_validation(tmp_path):
    with pytest.raises(SqueezeError, match="needs 'data'"):
        BenchConfig.from_dict({"name": "x", "model": "m"})
    with pytest.raises(SqueezeError, match="unknown bench config key"):
        BenchConfig.from_dict({"name": "x", "model": "m", "data": "d", "colour": 1})
    with pytest.raises(SqueezeError, match="unknown bench format 'tflite2'"):
        BenchConfig.from_dict({"name": "x", "model": "m", "data": "d", "formats": [{"format": "tflite2"}]})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nmodel: m\ndata: d.txt\n")
    assert BenchConfig.load(cfg).data == str(tmp_path / "d.txt")  # paths are relative to the config file


def test_bench_writes_reports_and_resumes(stories_dir, short_text, tmp_path, monkeypatch):
    config = BenchConfig.from_dict({
        "name": "t", "model": str(stories_dir), "data": str(short_text),
        "methods": [{"method": "rtn", "scheme": "w4g32-asym"}],
        "latency": {"prompt_tokens": 16, "new_tokens": 2, "warmup": 1, "runs": 2},
    })
    rows = run_bench(config, tmp_path / "cache", progress=False)
    assert [(r["method"], r["format"]) for r in rows] == [("float", "torch"), ("rtn", "torch")]
    for r in rows:
        assert ROW_KEYS <= set(r), r
    # the bench's numbers are squeeze eval's numbers for the same artifact
    ckpt = next((tmp_path / "cache" / "checkpoints").iterdir())
    direct = squeeze.evaluate(ckpt, short_text, reference=stories_dir, progress=False)
    assert rows[1]["ppl"] == direct.ppl and rows[1]["kld"] == direct.kld

    files = write_report(bench_report(config, rows, {"cpu": "c", "cores": 2, "torch_threads": 2, "gpu": None,
                                                     "os": "o", "python": "3"}), tmp_path / "rep")
    names = sorted(f.name for f in files)
    assert names == ["ppl_vs_decode_latency.png", "ppl_vs_size.png", "report.html", "report.json", "report.md"]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {"model", "device", "config", "rows"} <= set(report) and len(report["rows"]) == 2
    for png in ("ppl_vs_size.png", "ppl_vs_decode_latency.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached cell was measured again")

    monkeypatch.setattr(bench, "measure_cell", no_measuring)
    assert run_bench(config, tmp_path / "cache", progress=False) == rows


def test_failed_cell_is_reported_not_fatal(stories_dir, short_text, tmp_path):
    config = BenchConfig.from_dict({"name": "t", "model": str(stories_dir), "data": str(short_text),
                                    "methods": [{"method": "nosuch", "scheme": "w4g32"}],
                                    "latency": {"prompt_tokens": 8, "new_tokens": 1, "warmup": 0, "runs": 1}})
    rows = run_bench(config, tmp_path / "cache", progress=False)
    assert "unknown method 'nosuch'" in rows[1]["error"]
