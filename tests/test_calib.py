"""Calibration data: text and JSONL files, seeded windows, the bundled default, and data-free `self` sampling."""

from __future__ import annotations

import json

import pytest
import torch

from squeeze import api
from squeeze.calib import SELF, CalibConfig, load_calibration, read_text, sample_from_model
from squeeze.errors import SqueezeError
from squeeze.model import load_tokenizer
from squeeze.passes.gptq import GPTQ
from squeeze.resources import DEFAULT_CALIB_FILE
from squeeze.scheme import get_scheme


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):  # sampled sequences are cached: keep this module's out of the user's cache
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir)


def test_windows_have_the_requested_shape_and_follow_the_seed(tok):
    a = load_calibration(tok, CalibConfig(nsamples=5, seqlen=40, seed=3))
    b = load_calibration(tok, CalibConfig(nsamples=5, seqlen=40, seed=3))
    c = load_calibration(tok, CalibConfig(nsamples=5, seqlen=40, seed=4))
    assert a.input_ids.shape == (5, 40)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert not torch.equal(a.input_ids, c.input_ids)


def test_default_is_the_bundled_calibration_text_never_the_eval_text(tok):
    calib = load_calibration(tok, CalibConfig(nsamples=2, seqlen=16))
    assert calib.source.endswith(DEFAULT_CALIB_FILE) and "eval" not in calib.source


def test_jsonl_uses_the_text_field(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"Once upon a time there was a cat number {i}."}) for i in range(20)))
    assert read_text(p).startswith("Once upon a time")
    assert load_calibration(tok, CalibConfig(str(p), nsamples=3, seqlen=16)).input_ids.shape == (3, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(SqueezeError, match="bad.jsonl:1: .*'text'"):
        load_calibration(tok, CalibConfig(str(bad)))


def test_self_sampling_is_seeded_and_starts_at_bos(stories_dir, tok):
    model = api.load(stories_dir)
    a = sample_from_model(model, CalibConfig(SELF, nsamples=3, seqlen=24, seed=7), tok.bos_token_id, cache=False)
    b = sample_from_model(model, CalibConfig(SELF, nsamples=3, seqlen=24, seed=7), tok.bos_token_id, cache=False)
    c = sample_from_model(model, CalibConfig(SELF, nsamples=3, seqlen=24, seed=8), tok.bos_token_id, cache=False)
    assert a.input_ids.shape == (3, 24)
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    assert int(a.input_ids.max()) < 512 and int(a.input_ids.min()) >= 0
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert "self" in a.source and "seed 7" in a.source


def test_self_samples_are_cached_by_model_and_settings(stories_dir, tok, tmp_path):
    model = api.load(stories_dir)
    config = CalibConfig(SELF, nsamples=3, seqlen=24, seed=7)
    fresh = sample_from_model(model, config, tok.bos_token_id, cache=False).input_ids
    a = load_calibration(tok, config, model=model)
    files = list((tmp_path / "cache" / "samples").glob("*.pt"))
    assert torch.equal(a.input_ids, fresh) and len(files) == 1
    files[0].write_bytes(b"damaged")  # a damaged file is sampled again and replaced
    assert torch.equal(load_calibration(tok, config, model=model).input_ids, fresh)
    assert torch.equal(torch.load(files[0], weights_only=True), fresh)
    torch.save(fresh + 1, files[0])  # the cached tokens are what a second run gets back
    assert torch.equal(load_calibration(tok, config, model=model).input_ids, fresh + 1)
    load_calibration(tok, CalibConfig(SELF, nsamples=3, seqlen=24, seed=8), model=model)  # other settings
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    load_calibration(tok, config, model=model)  # other weights
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 3


def test_self_needs_the_model(tok):
    with pytest.raises(SqueezeError, match="needs model"):
        load_calibration(tok, CalibConfig(SELF, nsamples=2, seqlen=8))


def test_quantize_dir_with_self_calibration_records_it(stories_dir, tmp_path):
    out = api.quantize_dir(stories_dir, tmp_path / "q", GPTQ(scheme=get_scheme("w4g32-asym")),
                           CalibConfig(SELF, nsamples=2, seqlen=32))
    meta = json.loads((out / "squeeze.json").read_text())
    assert meta["calibration"]["source"].startswith("self") and meta["calibration"]["shape"] == [2, 32]


def test_cli_quantize_gptq_with_self_calibration(stories_dir, tmp_path):
    from squeeze.cli import main

    out = tmp_path / "cli"
    rc = main(["quantize", str(stories_dir), "-o", str(out), "--method", "gptq", "--bits", "3", "--group-size", "32",
               "--asym", "--act-order", "--no-static-groups", "--calib", "self", "--nsamples", "2", "--seqlen", "32"])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True


@pytest.mark.parametrize("flags, message", [
    (["--method", "rtn", "--damp", "0.1"], "--damp applies only to --method gptq"),
    (["--method", "gptq", "--alpha", "0.5"], "--alpha applies only to --method smoothquant"),
    (["--method", "gptq", "--damp", "2"], "--damp must be in"),
    (["--method", "awq", "--calib", "nope.txt"], "does not exist"),
    (["--method", "smoothquant", "--act", "none"], "int8 activations"),
])
def test_cli_bad_method_flags_are_one_line_errors(stories_dir, tmp_path, capsys, flags, message):
    from squeeze.cli import main

    rc = main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x").exists()
