"""Quantizing block by block (squeeze.stream): the same bytes as the whole-model path, sharded inputs and
outputs, resume after kill -9, determinism."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeeze import api
from squeeze.calib import CalibConfig, load_calibration
from squeeze.checkpoint.shards import INDEX_NAME, SafetensorsFile, ShardWriter
from squeeze.cli import main
from squeeze.passes.awq import AWQ
from squeeze.passes.gptq import GPTQ
from squeeze.passes.rtn import RTN
from squeeze.passes.smoothquant import SmoothQuant
from squeeze.recipe import Recipe
from squeeze.registry import pass_for_config
from squeeze.scheme import get_scheme
from squeeze.sources import source_tokenizer
from squeeze.stream import JOURNAL_DIR

RUN_LOG = "squeeze-run.json"  # when and how long: the one file allowed to differ between runs


def digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())
            if f.is_file() and f.name != RUN_LOG}


def in_memory(src: Path, out: Path, config, calib: CalibConfig) -> Path:
    """The whole-model path: squeeze.load, squeeze.quantize, squeeze.save."""
    model = api.load(src)
    needs = any(pass_for_config(p).needs_calibration(p) for p in api._as_recipe(config).passes)
    calib_set = load_calibration(source_tokenizer(src), calib) if needs else None
    records = api.quantize(model, config, calib_set)
    return api.save(model, out, config, source=src, calib=calib_set, records=records)


@pytest.fixture(scope="module")
def small_calib(calib_text) -> CalibConfig:
    return CalibConfig(calib_text, nsamples=16, seqlen=128)


CONFIGS = {
    "rtn-w4g32": RTN(scheme=get_scheme("w4g32")),
    "rtn-w8a8-static": RTN(scheme=get_scheme("w8a8")),
    "gptq-w4g32": GPTQ(scheme=get_scheme("w4g32")),
    "gptq-q4_k_m": GPTQ(scheme=get_scheme("q4_k_m")),
    "awq-w4g32-asym": AWQ(scheme=get_scheme("w4g32-asym")),
    "smoothquant-w8a8": SmoothQuant(scheme=get_scheme("w8a8")),
    "gptq-mlp-then-rtn": Recipe((GPTQ(scheme=get_scheme("w4g32"), targets=("mlp.*",)), RTN(scheme=get_scheme("w4g32")))),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_equals_in_memory(name, stories_dir, small_calib, tmp_path):
    """Block by block gives the same weight bytes (codes, scales, every float tensor) and config as loading the
    whole model; the non-error records of squeeze.json match too."""
    config = CONFIGS[name]
    notes = []
    streamed = api.quantize_dir(stories_dir, tmp_path / "streamed", config, small_calib, notify=notes.append)
    assert notes == []  # streamed, not loaded whole
    whole = in_memory(stories_dir, tmp_path / "whole", config, small_calib)
    a, b = digests(streamed), digests(whole)
    assert a["model.safetensors"] == b["model.safetensors"]
    assert a["config.json"] == b["config.json"]
    meta_s = json.loads((streamed / "squeeze.json").read_text())
    meta_w = json.loads((whole / "squeeze.json").read_text())
    assert meta_s.keys() == meta_w.keys()
    assert {k: v["scheme_dict"] for k, v in meta_s["layers"].items()} == \
        {k: v["scheme_dict"] for k, v in meta_w["layers"].items()}
    run_log = json.loads((streamed / RUN_LOG).read_text())
    assert len(run_log["blocks"]) == 5 * len(api._as_recipe(config).passes)
    assert not (streamed / JOURNAL_DIR).exists()


def write_sharded(src: Path, out: Path, max_bytes: int) -> None:
    """``src``'s float model as shards of at most ``max_bytes`` with an index, beside its config/tokenizer."""
    out.mkdir()
    model = api.load(src)
    writer = ShardWriter(out, max_bytes)
    for key, t in model.state_dict().items():
        if key != "lm_head.weight":  # tied to the embedding
            writer.add(key, t)
    writer.close()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())


def test_sharded_input_and_output(stories_dir, small_calib, tmp_path):
    """Shards in (model-0000i-of-0000n + index) and out (--max-shard-size) give the same tensors; transformers'
    own loader reads our float shards, squeeze.load reads the quantized ones."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    write_sharded(stories_dir, sharded, 100_000)
    assert (sharded / INDEX_NAME).is_file() and len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    reference = AutoModelForCausalLM.from_pretrained(stories_dir)
    loaded = AutoModelForCausalLM.from_pretrained(sharded)
    for key, t in reference.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[key]), key

    config = GPTQ(scheme=get_scheme("w4g32"))
    one = api.quantize_dir(stories_dir, tmp_path / "one", config, small_calib)
    many = api.quantize_dir(sharded, tmp_path / "many", config, small_calib, max_shard_size="60KB")
    shards = sorted(many.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (many / INDEX_NAME).is_file()
    index = json.loads((many / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    per_shard = {f.name: [k for k, v in index["weight_map"].items() if v == f.name] for f in shards}
    for f in shards:  # tensor bytes within the limit, or one tensor larger than the limit alone
        data = sum(end - begin for _, _, begin, end in SafetensorsFile(f).entries.values())
        assert data <= 60_000 or len(per_shard[f.name]) == 1, (f.name, per_shard[f.name])
    ids = torch.tensor([[1, 45, 79, 300, 12, 7]])
    with torch.no_grad():
        assert torch.equal(api.load(one)(ids).logits, api.load(many)(ids).logits)


KILL_AFTER = """
import os, sys
import squeeze.stream as stream
block_to_die_after = int(sys.argv[1])
write_block = stream.Journal.write_block
def write_then_die(self, pass_index, block, tensors, info):
    write_block(self, pass_index, block, tensors, info)
    if block == block_to_die_after:
        os.kill(os.getpid(), 9)
stream.Journal.write_block = write_then_die
from squeeze.cli import main
sys.exit(main(sys.argv[2:]))
"""


def quantize_args(src: Path, out: Path, calib: Path) -> list[str]:
    return ["quantize", "--method", "gptq", "--scheme", "w4g32", str(src), "-o", str(out),
            "--calib", str(calib), "--nsamples", "16", "--seqlen", "128"]


@pytest.mark.parametrize("killed_after, extra", [(0, []), (2, []), (4, []), (1, ["--float-target"])],
                         ids=["block0", "block2", "block4", "block1-float-target"])
def test_resume_after_kill_is_byte_identical(killed_after, extra, stories_dir, calib_text, tmp_path, capfd):
    """kill -9 right after block k is journaled, then the same command: it says it resumes, and every file
    equals an uninterrupted run's (the run log aside). --float-target also rebuilds the float stream."""
    out = tmp_path / "out"
    args = quantize_args(stories_dir, out, calib_text) + extra
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, str(killed_after), *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(temps) == 1 and (temps[0] / JOURNAL_DIR / "journal.json").is_file()

    assert main(args) == 0
    err = capfd.readouterr().err
    assert f"resuming an interrupted run: {killed_after + 1} of 5 blocks were done" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the dead run's temporary was taken over
    assert json.loads((out / RUN_LOG).read_text())["resumed"] is True

    assert main(quantize_args(stories_dir, tmp_path / "straight", calib_text) + extra) == 0
    assert digests(out) == digests(tmp_path / "straight")


def test_changed_input_starts_over(stories_dir, calib_text, tmp_path, capfd):
    out = tmp_path / "out"
    args = quantize_args(stories_dir, out, calib_text)
    subprocess.run([sys.executable, "-c", KILL_AFTER, "1", *args], capture_output=True)
    changed = [a if a != "16" else "8" for a in args]  # --nsamples 8: other calibration tokens
    assert main(changed) == 0
    err = capfd.readouterr().err
    assert "starting over: an interrupted run of" in err and "calibration" in err and "resuming" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_resume_flags(stories_dir, calib_text, tmp_path, capfd):
    args = quantize_args(stories_dir, tmp_path / "out", calib_text)
    assert main([*args, "--resume"]) == 2
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: --resume: no interrupted run of {str(tmp_path / 'out')!r} with these inputs to continue "
        "(run without --resume to start)"]
    subprocess.run([sys.executable, "-c", KILL_AFTER, "1", *args], capture_output=True)
    assert main([*args, "--no-resume"]) == 0
    assert "resuming" not in capfd.readouterr().err


def test_same_inputs_same_bytes(stories_dir, calib_text, tmp_path):
    """Two runs of the same commands: the same checkpoint bytes, and the same GGUF and ONNX files from it (both
    runs write to the same paths: the ONNX file records its source's path)."""
    pytest.importorskip("onnx")
    pytest.importorskip("gguf")
    work = tmp_path / "work"
    for run in ("a", "b"):
        work.mkdir()
        model = work / "model"
        assert main(quantize_args(stories_dir, model, calib_text)) == 0
        assert main(["export", "--to", "gguf", "--no-verify", str(model), "-o", str(work / "m.gguf")]) == 0
        assert main(["export", "--to", "onnx", "--no-verify", str(model), "-o", str(work / "m.onnx")]) == 0
        work.rename(tmp_path / run)
    assert digests(tmp_path / "a" / "model") == digests(tmp_path / "b" / "model")
    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # m.gguf, m.onnx (and ONNX external data if any)


def test_layers_outside_blocks_load_whole(stories_dir, tmp_path):
    """RTN on lm_head cannot go block by block: the model loads whole and the note says why."""
    notes = []
    out = api.quantize_dir(stories_dir, tmp_path / "out", RTN(scheme=get_scheme("w8g64"), targets=("lm_head",)),
                           notify=notes.append)
    assert notes == [f"loading {str(stories_dir)!r} whole: the recipe targets layers outside its transformer blocks"]
    assert "lm_head" in json.loads((out / "squeeze.json").read_text())["layers"]


def test_nonfinite_weights_refused_before_work(stories_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from squeeze.errors import SqueezeError

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in stories_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(stories_dir / "model.safetensors"))
    state["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(SqueezeError, match=r"NaN or Inf weights in 1 tensor\(s\): model.layers.3.mlp.up_proj.weight"):
        api.quantize_dir(bad, tmp_path / "out", RTN())
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


@pytest.mark.parametrize("config", [GPTQ(scheme=get_scheme("w4g32"), float_target=True), RTN(scheme=get_scheme("w8a8"))],
                         ids=["gptq-float-target", "rtn-static"])
def test_offloaded_activations_give_the_same_checkpoint(config, stories_dir, small_calib, tmp_path):
    """Activations on disk (--offload-activations): the same bytes as in memory, nothing left in the directory."""
    offload = tmp_path / "scratch"
    offload.mkdir()
    on_disk = api.quantize_dir(stories_dir, tmp_path / "disk", config, small_calib, offload_activations=offload)
    in_memory_ = api.quantize_dir(stories_dir, tmp_path / "memory", config, small_calib)
    assert digests(on_disk)["model.safetensors"] == digests(in_memory_)["model.safetensors"]
    assert list(offload.iterdir()) == []


def test_offloaded_batches_behave_as_a_list(tmp_path):
    from squeeze.offload import OffloadedBatches

    store = OffloadedBatches(tmp_path)
    tensors = [torch.randn(2, 3) for _ in range(4)]
    for t in tensors:
        store.append(t)
    assert len(store) == 4 and torch.equal(store[-1], tensors[3]) and len(store[1:3]) == 2
    store[2] = torch.zeros(2, 3)
    assert torch.equal(store[2], torch.zeros(2, 3)) and torch.equal(store.copy("other")[0], tensors[0])
    with pytest.raises(IndexError):
        store[4]


def test_scan_reads_in_chunks_and_finds_nan_anywhere(tmp_path, monkeypatch):
    # The NaN check reads large tensors a chunk at a time (a 400 MB embedding would otherwise cost ~1 GB of
    # isfinite temporaries): a NaN in any chunk is found, and the hash is the file's sha256 all the same.
    from squeeze.checkpoint import shards

    monkeypatch.setattr(shards, "SCAN_CHUNK_BYTES", 4096 + 2)  # not a multiple of the item size
    big = torch.randn(10_000)
    big[9_999] = float("nan")  # in the last chunk
    path = tmp_path / "m.safetensors"
    shards.save_tensors(path, [("a", torch.arange(5000, dtype=torch.int64)), ("b", big), ("c", torch.ones(7))])
    h = hashlib.sha256()
    assert SafetensorsFile(path).scan(h) == ["b"]
    assert h.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
