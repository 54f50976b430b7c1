"""The sequential runner: captured block inputs replay exactly, it matches in-memory quantization, it is deterministic."""

from __future__ import annotations

import pytest
import torch

from squeeze import api
from squeeze.calib import CalibConfig, CalibrationSet, load_calibration
from squeeze.errors import SqueezeError
from squeeze.model import find_blocks, linear_weight, load_tokenizer, select_linears
from squeeze.modules import QuantLinear
from squeeze.passes.awq import AWQ
from squeeze.passes.gptq import GPTQ, install, quantize_linear
from squeeze.passes.gptq_core import HessianAccumulator
from squeeze.passes.smoothquant import SmoothQuant
from squeeze.runner import run_sequential
from squeeze.scheme import get_scheme

FAMILIES = ("llama", "qwen2", "gpt2")


def _calib(n: int = 4, seqlen: int = 32, seed: int = 0) -> CalibrationSet:
    ids = torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "random")


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_replays_every_block_input_exactly(tiny_models, family):
    # With a pass that changes nothing, the inputs the runner hands block i must be the model's own
    # hidden_states[i] (attention mask, positions and rotary embeddings replayed): equal to float rounding.
    model = api.load(tiny_models[family])
    calib = _calib()
    seen = []
    layers = select_linears(model)

    def record(prefix, block, block_layers, inputs):
        seen.append(torch.cat(inputs.hidden))
        return {}

    run_sequential(model, layers, calib, record)
    with torch.no_grad():
        hidden = model(calib.input_ids, output_hidden_states=True, use_cache=False).hidden_states
    n_blocks = len(find_blocks(model)[1])
    assert len(seen) == n_blocks
    for i in range(n_blocks):
        assert torch.allclose(seen[i], hidden[i], atol=1e-5), (family, i, (seen[i] - hidden[i]).abs().max())


def _llama_groups(prefix):
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    return [[attn + "q_proj", attn + "k_proj", attn + "v_proj"], [attn + "o_proj"],
            [mlp + "gate_proj", mlp + "up_proj"], [mlp + "down_proj"]]


def test_runner_gptq_equals_full_model_in_memory(tiny_models):
    # Reference: quantize in memory with full-model forwards (no captured inputs), group by group.
    src = tiny_models["llama"]
    calib = _calib(n=8, seqlen=48)
    # float32 forwards, as the reference's (bfloat16 calibration forwards are tested in test_precision.py)
    config = GPTQ(scheme=get_scheme("w4g32-asym"), act_order=True, calib_precision="float32")
    ref = api.load(src)
    for i in range(len(ref.model.layers)):
        for group in _llama_groups(f"model.layers.{i}."):
            acc = {n: HessianAccumulator(linear_weight(ref.get_submodule(n)).shape[1]) for n in group}
            hooks = [ref.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: acc[n].add(a[0])) for n in group]
            with torch.no_grad():
                for batch in calib.batches(8):
                    ref(batch, use_cache=False)
            for h in hooks:
                h.remove()
            for n in group:
                module = ref.get_submodule(n)
                result = quantize_linear(module, acc[n].hessian, config, config.scheme)
                install(ref, n, module, result, acc[n].hessian, config.scheme)
    model = api.load(src)
    api.quantize(model, config, calib)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            other = ref.get_submodule(name)
            assert torch.equal(layer.codes, other.codes), name
            assert torch.equal(layer.g_idx, other.g_idx), name
            assert torch.allclose(layer.scales, other.scales), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_every_method_runs_on_every_family(tiny_models, family, method, tmp_path):
    config = {"gptq": GPTQ(scheme=get_scheme("w4g32-asym")), "awq": AWQ(scheme=get_scheme("w4g32-asym")),
              "smoothquant": SmoothQuant(scheme=get_scheme("w8a8"))}[method]
    model = api.load(tiny_models[family])
    records = api.quantize(model, config, _calib())
    assert len(records) == len(select_linears(api.load(tiny_models[family])))
    for rec in records.values():
        assert rec["method"] == method and 0 <= rec["output_rel_mse"] < 0.5, rec
    with torch.no_grad():
        assert torch.isfinite(model(_calib().input_ids).logits).all()


def test_determinism_under_a_fixed_seed(stories_dir):
    tok = load_tokenizer(stories_dir)
    a = load_calibration(tok, CalibConfig(nsamples=4, seqlen=64, seed=1))
    b = load_calibration(tok, CalibConfig(nsamples=4, seqlen=64, seed=1))
    assert a.sha256 == b.sha256
    codes = []
    for calib in (a, b):
        model = api.load(stories_dir)
        api.quantize(model, GPTQ(scheme=get_scheme("w3g32-asym"), act_order=True), calib)
        codes.append({n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)})
    assert all(torch.equal(codes[0][n], codes[1][n]) for n in codes[0])


def test_layers_outside_blocks_are_refused(tiny_models):
    model = api.load(tiny_models["qwen2"])
    with pytest.raises(SqueezeError, match="outside the transformer blocks.*--ignore"):
        api.quantize(model, GPTQ(scheme=get_scheme("w4g32"), targets=("lm_head",)), _calib())


def test_calibrated_methods_need_calibration(tiny_models):
    model = api.load(tiny_models["llama"])
    with pytest.raises(SqueezeError, match="needs calibration data"):
        api.quantize(model, GPTQ(scheme=get_scheme("w4g32")))


def test_records_reach_the_checkpoint_and_inspect(tiny_models, tmp_path):
    from squeeze.inspect_ckpt import describe, format_description

    out = api.quantize_dir(tiny_models["gpt2"], tmp_path / "q", AWQ(scheme=get_scheme("w4g32-asym")),
                           CalibConfig(nsamples=2, seqlen=32))
    text = format_description(describe(out))
    assert "output rel. MSE" in text and "transformer.h.1.mlp.c_proj" in text


def test_track_float_carries_the_float_models_hidden_states(tiny_models):
    """With track_float, inputs.reference at block i is the float model's hidden_states[i] even while the
    blocks before it were quantized, and reference_block is a float copy of block i."""
    model = api.load(tiny_models["llama"])
    calib = _calib()
    with torch.no_grad():
        hidden = model(calib.input_ids, output_hidden_states=True, use_cache=False).hidden_states
    gptq_process = None
    seen = []

    def record(prefix, block, block_layers, inputs):
        seen.append(torch.cat(inputs.reference))
        assert not any(isinstance(m, QuantLinear) for m in inputs.reference_block.modules())
        return gptq_process(prefix, block, block_layers, inputs)

    from squeeze.passes.gptq import _process_block
    from squeeze.passes.common import select_layers

    config = GPTQ(scheme=get_scheme("w3g32-asym"), float_target=True)
    layers, schemes = select_layers(model, config)
    gptq_process = _process_block(model, config, schemes)
    run_sequential(model, layers, calib, record, track_float=True)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(layers)
    for i, ref in enumerate(seen):
        assert torch.allclose(ref, hidden[i], atol=1e-5), (i, (ref - hidden[i]).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_replaying_unchanged_modules_changes_nothing(tiny_models, family, method, monkeypatch):
    """squeeze.replay serves the outputs of modules that cannot have changed since the block's last pass.
    The quantized model must be bit-identical to one calibrated with every pass recomputed, and under
    true-sequential GPTQ replays must actually happen (q/k/v, then the whole attention, then gate/up)."""
    import contextlib

    import squeeze.replay
    import squeeze.runner

    calib = _calib(n=6, seqlen=24)
    config = {"gptq": GPTQ, "awq": AWQ}[method](scheme=get_scheme("w4g32"))
    served = []
    original = squeeze.replay.BlockReplay._changes

    def counting(self):
        served.append(self.replayed)
        return original(self)

    monkeypatch.setattr(squeeze.replay.BlockReplay, "_changes", counting)
    replayed = api.load(tiny_models[family])
    api.quantize(replayed, config, calib)

    @contextlib.contextmanager
    def recompute(block, inputs, observed):
        yield lambda i: None

    monkeypatch.setattr(squeeze.runner, "_replaying", recompute)
    plain = api.load(tiny_models[family])
    api.quantize(plain, config, calib)
    a, b = replayed.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if method == "gptq":
        assert max(served) > 0


def test_calibration_device_prefers_cuda_for_a_cpu_model(monkeypatch):
    """One block at a time on CUDA when present (the model stays where it is), unless a device is given."""
    from squeeze.runner import calibration_device

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert calibration_device(None, cpu) == torch.device("cuda")
    assert calibration_device("cpu", cpu) == cpu
    assert calibration_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibration_device(None, cpu) == cpu


def test_replay_keeps_at_most_its_bound(tiny_models, monkeypatch):
    """squeeze.replay never keeps more output bytes than its bound (0: nothing is replayed), and the result
    does not depend on the bound."""
    import squeeze.replay
    import squeeze.runner

    calib = _calib(n=6, seqlen=24)
    config = GPTQ(scheme=get_scheme("w4g32"))
    states, peaks = {}, {}
    original_exit, original_changes = squeeze.replay._Pass._exit, squeeze.replay.BlockReplay._changes
    for bound in (0, 20_000, None):
        kept, served = [0], []

        def exit_(self, name, output, cacheable, kept=kept):
            original_exit(self, name, output, cacheable)
            kept[0] = max(kept[0], self.replay.kept_bytes)

        def changes(self, served=served):
            served.append(self.replayed)
            return original_changes(self)

        monkeypatch.setattr(squeeze.replay._Pass, "_exit", exit_)
        monkeypatch.setattr(squeeze.replay.BlockReplay, "_changes", changes)
        monkeypatch.setattr(squeeze.runner, "_replay_bound", lambda inputs, b=bound: b)
        model = api.load(tiny_models["llama"])
        api.quantize(model, config, calib)
        states[bound], peaks[bound] = model.state_dict(), (kept[0], max(served))
    assert peaks[0] == (0, 0)
    assert 0 < peaks[20_000][0] <= 20_000 and peaks[20_000][1] > 0
    assert peaks[None][0] > 20_000  # unbounded keeps more
    for bound in (0, 20_000):
        assert all(torch.equal(states[bound][k], states[None][k]) for k in states[None])


def _digits_mlp():
    """A small MLP trained on scikit-learn's 8x8 digits (seconds): a plain nn.Module without blocks."""
    sklearn = pytest.importorskip("sklearn.datasets", reason="the digits come from scikit-learn")
    data = sklearn.load_digits()
    x = torch.from_numpy(data.data / 16.0).float()
    y = torch.from_numpy(data.target).long()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(40):
        for batch in torch.arange(1400).split(100):
            loss = torch.nn.functional.cross_entropy(mlp(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mlp.eval(), x[:1400], x[1400:]


@pytest.mark.parametrize("scheme", ["w2g32", "lut2g16"])
def test_a_plain_module_is_calibrated_as_one_block(scheme):
    """A module without transformer blocks (an MLP, a CNN) runs GPTQ on its calibration samples as one block:
    every linear quantized, and its outputs on held-out inputs closer to the float model's than RTN's."""
    import copy

    from squeeze.calib import tensor_calibration
    from squeeze.passes.rtn import RTN

    mlp, train, test = _digits_mlp()
    gptq, rtn = copy.deepcopy(mlp), copy.deepcopy(mlp)
    records = api.quantize(gptq, GPTQ(scheme=get_scheme(scheme)), tensor_calibration(train[:256], "digits"))
    api.quantize(rtn, RTN(scheme=get_scheme(scheme)))
    assert set(records) == {"0", "2", "4"}
    assert all(isinstance(gptq[i], QuantLinear) for i in (0, 2, 4))
    with torch.no_grad():
        ref = mlp(test)
        err = {name: float(((m(test) - ref) ** 2).mean()) for name, m in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < 0.85 * err["rtn"], err


def test_tensor_calibration_needs_stacked_samples():
    from squeeze.calib import tensor_calibration

    with pytest.raises(SqueezeError, match="stacked along dim 0"):
        tensor_calibration(torch.zeros(5))
