"""Pruning passes on the bundled stories260K model (issue 13): masks land, and data-aware methods win."""

from __future__ import annotations

import pytest
import torch

import squeeze
from squeeze import api
from squeeze.calib import CalibConfig, load_calibration
from squeeze.errors import SqueezeError
from squeeze.model import select_linears
from squeeze.passes.prune import Magnitude, SparseGPT, Wanda
from squeeze.recipe import Recipe
from squeeze.sources import source_tokenizer

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


@pytest.fixture(scope="module")
def calib(stories_dir):
    return load_calibration(source_tokenizer(stories_dir), CalibConfig(nsamples=32, seqlen=128))


@pytest.fixture(scope="module")
def pruned(stories_dir, calib, short_text):
    """(perplexity, model) per method and pattern, and the dense perplexity."""
    tokenizer = source_tokenizer(stories_dir)

    def perplexity(model):
        return api.evaluate(model, short_text, ctx=128, tokenizer=tokenizer, progress=False).ppl

    out = {"dense": perplexity(squeeze.load(stories_dir))}
    for pattern in ({"sparsity": 0.5}, {"mask": "2:4"}):
        for name, cls in METHODS.items():
            model = squeeze.load(stories_dir)
            records = api.prune(model, cls(**pattern), calib)
            ppl = perplexity(model)
            out[(name, cls(**pattern).label)] = (ppl, model, records)
    return out


@pytest.mark.parametrize("label", ["0.5", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude(pruned, label):
    ppl = {name: pruned[(name, label)][0] for name in METHODS}
    print(f"stories260K {label}: dense {pruned['dense']:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    assert ppl["wanda"] < ppl["magnitude"] and ppl["sparsegpt"] < ppl["magnitude"]
    assert pruned["dense"] < min(ppl.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_targeted_layer_has_the_pattern(pruned, name):
    for label in ("0.5", "2:4"):
        _, model, records = pruned[(name, label)]
        layers = select_linears(model)
        assert set(records) == set(layers) and len(layers) == 35
        for layer_name, layer in layers.items():
            w = layer.weight.detach()
            assert records[layer_name]["sparsity"] == pytest.approx(0.5, abs=1e-3)
            assert records[layer_name]["method"] == name and records[layer_name]["pattern"] == label
            if label == "2:4":
                assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all()
        # outside the blocks nothing changed
        assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()


def test_configs_and_recipes():
    assert Wanda().pattern.sparsity == 0.5  # the default
    assert SparseGPT(mask="4:8").label == "4:8"
    with pytest.raises(SqueezeError, match="not both"):
        Wanda(sparsity=0.5, mask="2:4")
    with pytest.raises(SqueezeError, match="from 0 to 0.9"):
        Magnitude(sparsity=0.99)
    recipe = Recipe((SparseGPT(mask="2:4"), squeeze.GPTQ()))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.to_dict()["passes"][0] == {"method": "sparsegpt", "sparsity": None, "mask": "2:4", "targets": None,
                                             "ignore": [], "block_size": 128, "damp": 0.01, "calib_precision": "auto",
                                             "scheme": None, "owl": None, "owl_threshold": 5.0}


def test_calibrated_pruning_needs_data(stories_dir):
    with pytest.raises(SqueezeError, match="needs calibration data"):
        api.prune(squeeze.load(stories_dir), Wanda())


@pytest.mark.parametrize("then", ["gptq", "rtn", "awq"])
def test_masks_survive_quantization(stories_dir, calib, then):
    # Prune 50% with Wanda, then quantize to 4 bits: every pruned weight dequantizes to exactly 0 (GPTQ's
    # updates would otherwise revive them), in memory and through a saved checkpoint.
    from squeeze.modules import QuantLinear

    model = squeeze.load(stories_dir)
    api.prune(model, Wanda(sparsity=0.5), calib)
    masks = {n: m.weight.detach() == 0 for n, m in select_linears(model).items()}
    quant = {"gptq": squeeze.GPTQ, "rtn": squeeze.RTN, "awq": squeeze.AWQ}[then](scheme=squeeze.get_scheme("w4g32-asym"))
    api.quantize(model, quant, calib)
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        w = layer.dequantized_weight()
        assert mask.float().mean() == pytest.approx(0.5, abs=1e-3) and (w[mask] == 0).all(), name


@pytest.mark.parametrize("method, pattern", [("magnitude", {"sparsity": 0.5}), ("wanda", {"mask": "2:4"}),
                                             ("sparsegpt", {"sparsity": 0.6}), ("wanda", {"sparsity": 0.6, "owl": 0.08}),
                                             ("sparsegpt", {"mask": "2:4", "scheme": squeeze.get_scheme("w4g32")})])
def test_block_by_block_equals_in_memory(method, pattern, stories_dir, tmp_path):
    # squeeze prune / quantize_dir read the model one block at a time; the weights are those of pruning the
    # whole model in memory, and the output is a plain float model directory.
    calib_config = CalibConfig(nsamples=16, seqlen=128)
    config = METHODS[method](**pattern)
    streamed = api.quantize_dir(stories_dir, tmp_path / "streamed", config, calib_config)
    model = squeeze.load(stories_dir)
    calib = load_calibration(source_tokenizer(stories_dir), calib_config) if method != "magnitude" else None
    records = api.prune(model, config, calib)
    whole = api.save(model, tmp_path / "whole", config, source=stories_dir, calib=calib, records=records)
    assert (streamed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    import json

    if "scheme" not in pattern:
        assert json.loads((streamed / "config.json").read_text()) == json.loads((stories_dir / "config.json").read_text())


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_owl_block_sparsities_beat_uniform(stories_dir, calib, short_text, name):
    # OWL gives blocks with more outlier scores a lower sparsity (here blocks 0-1 ~0.53, block 4 ~0.69 at a
    # 0.6 target, the mean kept). Measured on stories260K at 60%: Wanda 68.1 -> 45.7, SparseGPT 48.0 -> 38.6;
    # at 50%: 17.95 -> 16.15 and 15.41 -> 14.62.
    tokenizer = source_tokenizer(stories_dir)
    ppl, per_block = {}, {}
    for owl in (None, 0.08):
        model = squeeze.load(stories_dir)
        records = api.prune(model, METHODS[name](sparsity=0.6, owl=owl), calib)
        ppl[owl] = api.evaluate(model, short_text, ctx=128, tokenizer=tokenizer, progress=False).ppl
        per_block[owl] = [sum(r["sparsity"] for n, r in records.items() if n.startswith(f"model.layers.{b}."))
                          / 7 for b in range(5)]
    print(f"stories260K {name} 60%: uniform {ppl[None]:.2f}, OWL {ppl[0.08]:.2f}; OWL block sparsities "
          + ", ".join(f"{s:.3f}" for s in per_block[0.08]))
    # the mean is the target up to rounding (a row of 64 inputs prunes a whole number of them)
    assert sum(per_block[0.08]) / 5 == pytest.approx(0.6, abs=0.01) and max(per_block[0.08]) - min(per_block[0.08]) > 0.1
    assert ppl[0.08] < ppl[None]


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32-asym"])
def test_sparsegpt_prunes_and_quantizes_in_one_sweep(stories_dir, calib, short_text, scheme):
    # SparseGPT with a scheme: the 2:4 masks are chosen inside GPTQ's sweep, every 4 columns on the
    # error-updated weights, and the kept weights rounded onto the grid. Measured on stories260K (32 x 128
    # calibration tokens): 2:4 + w4g32 joint 32.8, SparseGPT then GPTQ 34.2 (asym 31.5 / 33.8); 50% + w4g32
    # 16.8 / 17.2 (asym 16.9 / 16.2). One sweep must be no worse than 10% above the two.
    from squeeze.modules import QuantLinear

    tokenizer = source_tokenizer(stories_dir)
    ppl = {}
    for how in ("joint", "two passes"):
        model = squeeze.load(stories_dir)
        grid = squeeze.get_scheme(scheme)
        if how == "joint":
            records = api.prune(model, SparseGPT(mask="2:4", scheme=grid), calib)
        else:
            api.prune(model, SparseGPT(mask="2:4"), calib)
            records = api.quantize(model, squeeze.GPTQ(scheme=grid), calib)
        ppl[how] = api.evaluate(model, short_text, ctx=128, tokenizer=tokenizer, progress=False).ppl
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert len(layers) == 35
        for name, layer in layers.items():
            w = layer.dequantized_weight()
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
            assert records[name]["scheme"] == scheme and records[name].get("pattern", "2:4") == "2:4"
    print(f"stories260K 2:4 + {scheme}: joint {ppl['joint']:.2f}, SparseGPT then GPTQ {ppl['two passes']:.2f}")
    assert ppl["joint"] <= 1.1 * ppl["two passes"]


def test_prune_command_then_quantize_keeps_the_masks(stories_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from squeeze.cli import main

    pruned, quantized = tmp_path / "pruned", tmp_path / "pruned-w4"
    assert main(["prune", str(stories_dir), "-o", str(pruned), "--method", "sparsegpt", "--mask", "2:4",
                 "--nsamples", "16", "--seqlen", "128"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(pruned)  # no squeeze code needed to load it
    masks = {n: m.weight.detach() == 0 for n, m in select_linears(plain).items()}
    assert all(float(mask.float().mean()) == 0.5 for mask in masks.values())
    assert main(["quantize", str(pruned), "-o", str(quantized), "--method", "gptq", "--scheme", "w4g32",
                 "--nsamples", "16", "--seqlen", "128"]) == 0
    model = squeeze.load(quantized)
    for name, mask in masks.items():
        assert (model.get_submodule(name).dequantized_weight()[mask] == 0).all(), name
    capsys.readouterr()
    assert main(["inspect", str(quantized)]) == 0
    out = capsys.readouterr().out
    assert "pruned:     35 layers by sparsegpt (2:4), mean sparsity 0.500" in out and "method:     gptq" in out


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0.5", "--mask", "2:4"], "not both"),
    (["--mask", "4:8"], "do not split into groups of 8"),  # stories260K's down_proj has 172 inputs
    (["--mask", "two"], "N:M"),
    (["--sparsity", "0.95"], "from 0 to 0.9"),
    (["--method", "wanda", "--damp", "0.1"], "--damp does not apply to --method wanda"),
    (["--method", "magnitude", "--scheme", "w4g32"], "--scheme does not apply to --method magnitude"),
    (["--method", "wanda", "--mask", "2:4", "--owl", "0.08"], "does not apply to N:M masks"),
    (["--method", "wanda", "--owl", "0.7"], "in (0, 0.5)"),
    (["--method", "sparsegpt", "--scheme", "w9"], "w9"),
    (["--calib", "missing.txt"], "does not exist"),
])
def test_prune_bad_input_is_one_line(args, message, stories_dir, tmp_path, capsys):
    from squeeze.cli import main

    out = tmp_path / "out"
    assert main(["prune", str(stories_dir), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()
