"""Distillation and QAT on the bundled stories260K model (issue 14): they recover quality, their results are
ordinary checkpoints that reload and export exactly, and their bad input is one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import squeeze
from squeeze import api
from squeeze.calib import CalibConfig, load_calibration
from squeeze.passes.distill import QAT, Distill
from squeeze.passes.fakequant import FakeQuantLinear, convert, prepare
from squeeze.passes.gptq import GPTQ
from squeeze.passes.structured import Structured
from squeeze.recipe import Recipe
from squeeze.scheme import get_scheme
from squeeze.sources import source_tokenizer

CALIB = CalibConfig(nsamples=48, seqlen=128)


@pytest.fixture(scope="module")
def calib(stories_dir):
    return load_calibration(source_tokenizer(stories_dir), CALIB)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("train"))


def _ppl(model, text, stories_dir):
    return api.evaluate(model, text, ctx=128, tokenizer=source_tokenizer(stories_dir), progress=False).ppl


def _train(work, **kw):
    return {"steps": 100, "lr": 1e-4, "batch_size": 4, "holdout": 6, "work_dir": work, **kw}


@pytest.fixture(scope="module")
def qat_model(stories_dir, calib, work):
    model = squeeze.load(stories_dir)
    records = api.quantize(model, QAT(scheme=get_scheme("w3g32"), **_train(work)), calib)
    return model, records


def test_qat_improves_on_its_gptq_start(qat_model, stories_dir, calib, short_text):
    gptq = squeeze.load(stories_dir)
    api.quantize(gptq, GPTQ(scheme=get_scheme("w3g32")), calib)
    fp32, start, trained = (_ppl(m, short_text, stories_dir) for m in (squeeze.load(stories_dir), gptq, qat_model[0]))
    print(f"stories260K w3g32: fp32 {fp32:.3f}, gptq {start:.3f}, qat {trained:.3f} "
          f"({(start - trained) / (start - fp32):.0%} of the gap)")
    # 100 steps of 4 x 128 tokens; the benchmark (bench/qat.py) trains longer and reports the share recovered
    assert trained < start - 0.2 * (start - fp32)


def test_qat_records_its_training_and_every_layer(qat_model):
    model, records = qat_model
    log = records["<training>"][0]
    assert log["method"] == "qat" and log["steps"] == 100 and len(log["loss"]) == 100
    assert log["tokens"] == 100 * 4 * 128 and log["quantized_layers_trained"] == 35
    assert log["eval"][0][0] == 0 and log["best_step"] is not None  # held-out loss before training, then every 10
    layers = {n: r for n, r in records.items() if n != "<training>"}
    assert len(layers) == 35 and all(r["method"] == "qat" and r["init"] == "gptq" for r in layers.values())


def test_qat_checkpoint_reloads_exactly(qat_model, stories_dir, calib, tmp_path):
    model, records = qat_model
    recipe = QAT(scheme=get_scheme("w3g32"), **_train("unused"))
    out = api.save(model, tmp_path / "qat", recipe, source=stories_dir, calib=calib, records=records)
    meta = json.loads((out / "squeeze.json").read_text())
    assert meta["training"][0]["steps"] == 100 and meta["method"] == "qat"
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(squeeze.load(out)(ids).logits, model(ids).logits)


def test_qat_exports_to_onnx_with_the_trained_logits(stories_dir, calib, tmp_path, work):
    """MatMulNBits (4-bit) in onnxruntime against the trained model in torch."""
    from squeeze.eval.runtimes import open_runtime

    config = CalibConfig(nsamples=16, seqlen=64)
    out = api.quantize_dir(stories_dir, tmp_path / "qat4", QAT(scheme=get_scheme("w4g32"), **_train(work, steps=5)),
                           config)
    art = api.export(out, "onnx", tmp_path / "qat.onnx")  # verified against torch by the exporter
    ids = calib.input_ids[:2]
    with torch.no_grad():
        expected = squeeze.load(out)(ids).logits
    got = open_runtime(art.path).logits(ids)
    assert torch.allclose(got.float(), expected, atol=1e-3), float((got - expected).abs().max())


def test_whole_model_fake_quant_equals_the_converted_model(stories_dir, calib):
    """Every grid kind is checked layer by layer in test_fakequant; here a whole model, trained for a few
    steps, gives the same logits before and after convert (torch.equal)."""
    model = squeeze.load(stories_dir)
    api.quantize(model, squeeze.RTN(scheme=get_scheme("w2g32-asym")))
    ids = calib.input_ids[:2]
    fakes = prepare(model, learn_scales=True)
    params = [p for m in fakes.values() for p in (m.latent, m.scales, m.zeros)]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = model(ids).logits
        convert(model)
        assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
        assert torch.equal(model(ids).logits, trained)


def test_distillation_recovers_structured_pruning(stories_dir, calib, short_text, work):
    pruned = squeeze.load(stories_dir)
    api.prune(pruned, Structured(ffn=0.5, round_to=4), calib)
    before = _ppl(pruned, short_text, stories_dir)
    model = squeeze.load(stories_dir)
    records = api.quantize(model, Recipe((Structured(ffn=0.5, round_to=4), Distill(**_train(work)))), calib)
    after, dense = _ppl(model, short_text, stories_dir), _ppl(squeeze.load(stories_dir), short_text, stories_dir)
    print(f"stories260K FFN 50%: dense {dense:.3f}, pruned {before:.3f}, distilled {after:.3f}")
    assert after < before - 0.3 * (before - dense)
    assert model.config.intermediate_size == 88 and records["<training>"][0]["method"] == "distill"


def test_prune_gptq_qat_keeps_the_pruned_zeros(stories_dir, calib, work):
    from squeeze.passes.prune import Wanda

    model = squeeze.load(stories_dir)
    recipe = Recipe((Wanda(sparsity=0.5), GPTQ(scheme=get_scheme("w4g32")), QAT(scheme=get_scheme("w4g32"),
                                                                                  **_train(work, steps=10))))
    pruned = squeeze.load(stories_dir)
    api.prune(pruned, Wanda(sparsity=0.5), calib)
    records = api.quantize(model, recipe, calib)
    for name, layer in model.named_modules():
        if hasattr(layer, "dequantized_weight"):
            zero = pruned.get_submodule(name).weight == 0
            assert bool((layer.dequantized_weight()[zero] == 0).all()), name
            assert records[name]["pattern"] == "0.5"


def test_teacher_targets_are_computed_once_per_teacher_and_data(stories_dir, calib, tmp_path):
    from squeeze.api import teacher_targets

    recipe = Distill(work_dir=str(tmp_path))
    first = teacher_targets(recipe, calib, squeeze.load(stories_dir))[0]
    stamp = (first.path / "top_values.npy").stat().st_mtime_ns
    again = teacher_targets(recipe, calib, squeeze.load(stories_dir))[0]
    assert again.path == first.path and (again.path / "top_values.npy").stat().st_mtime_ns == stamp
    by_path = teacher_targets(Distill(teacher=str(stories_dir), work_dir=str(tmp_path)), calib)[0]
    assert by_path.path != first.path and by_path.n == len(calib.input_ids) and by_path.top_k == 128


def test_cli_qat_and_distill(stories_dir, tmp_path, work, capsys):
    from squeeze.cli import main

    common = ["--nsamples", "16", "--seqlen", "64", "--steps", "4", "--lr", "1e-3", "--work-dir", work]
    qat = tmp_path / "qat"
    assert main(["quantize", str(stories_dir), "-o", str(qat), "--method", "qat", "--scheme", "w4g32", *common]) == 0
    meta = json.loads((qat / "squeeze.json").read_text())
    assert meta["method"] == "qat" and meta["training"][0]["steps"] == 4
    assert meta["recipe"]["passes"][0]["init"] == "gptq"
    capsys.readouterr()
    assert main(["inspect", str(qat)]) == 0
    assert "trained:    qat: 4 steps, 1,024 tokens" in capsys.readouterr().out
    pruned = tmp_path / "pruned"
    assert main(["prune", str(stories_dir), "-o", str(pruned), "--structured", "--ffn", "0.5", "--round-to", "4",
                 "--nsamples", "16", "--seqlen", "64"]) == 0
    out = tmp_path / "distilled"
    assert main(["distill", str(pruned), "--teacher", str(stories_dir), "-o", str(out), *common]) == 0
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 88
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None  # plain transformers loads it
    self_data = tmp_path / "self"
    assert main(["distill", str(pruned), "--teacher", str(stories_dir), "-o", str(self_data), "--calib", "self",
                 *common]) == 0
    assert "sampled from the model" in json.loads((self_data / "squeeze.json").read_text())["calibration"]["source"]


@pytest.mark.parametrize("args, message", [
    (["distill", "{m}", "-o", "{o}"], "needs --teacher"),
    (["distill", "{m}", "-o", "{o}", "--teacher", "missing-dir"], "missing-dir"),
    (["distill", "{m}", "-o", "{o}", "--teacher", "{m}", "--steps", "0"], "--steps must be at least 1"),
    (["distill", "{m}", "-o", "{o}", "--teacher", "{m}", "--hidden-layers", "a,b"], "comma-separated"),
    (["distill", "{m}", "-o", "{o}", "--teacher", "{m}", "--hidden-layers", "9", "--steps", "1",
      "--nsamples", "8", "--seqlen", "32"], "do not exist"),
    (["distill", "{m}", "-o", "{o}", "--teacher", "{m}", "--temperature", "0"], "--temperature"),
    (["quantize", "{m}", "-o", "{o}", "--method", "gptq", "--steps", "5"], "--steps applies only to --method qat"),
    (["quantize", "{m}", "-o", "{o}", "--method", "qat", "--grid-lr", "0"], "--grid-lr"),
    (["quantize", "{m}", "-o", "{o}", "--method", "qat", "--train-device", "tpu9"], "device"),
])
def test_bad_input_is_one_line(args, message, stories_dir, tmp_path, work, capsys):
    from squeeze.cli import main

    out = tmp_path / "out"
    argv = [a.format(m=stories_dir, o=out) for a in args] + ["--work-dir", work]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


@pytest.mark.parametrize("learn", [False, True], ids=["fixed-scales", "learned-scales"])
def test_qat_on_a_k_quant_grid_exports_its_blocks_exactly(learn, tiny256, tmp_path, work):
    """Q4_K (6-bit sub-block scales and mins under fp16 super-block scales): QAT trains the codes (and with
    --learn-scales the integer sub-block scales and mins); the GGUF exporter writes the checkpoint's blocks as
    they are and llama.cpp agrees with torch."""
    from squeeze.checkpoint.gptq import read_metadata

    out = api.quantize_dir(tiny256, tmp_path / "q4k", QAT(scheme=get_scheme("q4_k"), learn_scales=learn,
                                                          **_train(work, steps=6)),
                           CalibConfig(nsamples=16, seqlen=64))
    assert read_metadata(out)["training"][0]["steps"] == 6
    art = api.export(out, "gguf", tmp_path / "q4k.gguf")
    assert any(n.startswith("14 calibrated layer(s) written exactly") for n in art.notes), art.notes
    assert art.verification["top1_agreement"] >= 0.95


def test_training_is_seeded_and_runs_in_bfloat16(stories_dir, tmp_path):
    config = CalibConfig(nsamples=16, seqlen=64)
    calib = load_calibration(source_tokenizer(stories_dir), config)

    def run(**kw):
        model = squeeze.load(stories_dir)
        records = api.quantize(model, QAT(scheme=get_scheme("w4g32"), steps=4, batch_size=2, holdout=0,
                                          work_dir=str(tmp_path), **kw), calib)
        return model, records["<training>"][0]

    (a, _), (b, _) = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c, log = run(precision="bfloat16")
    assert len(log["loss"]) == 4 and all(math.isfinite(x) for x in log["loss"])
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_training_passes_round_trip_through_a_yaml_recipe(tmp_path):
    recipe = Recipe((Structured(ffn=0.5), Distill(teacher="base/", steps=7, hidden_layers=(1, 3))),)
    recipe.dump_yaml(tmp_path / "r.yaml")
    assert Recipe.load_yaml(tmp_path / "r.yaml") == recipe
    qat = Recipe((QAT(scheme=get_scheme("q4_0"), init="rtn", learn_scales=True, grid_lr=0.01),))
    qat.dump_yaml(tmp_path / "q.yaml")
    assert Recipe.load_yaml(tmp_path / "q.yaml") == qat
