"""Bad input, command by command: exit 2, exactly one `error:` line naming the file or flag, no traceback,
nothing written and no temporary left (the commands run in-process through squeeze.cli.main, so an
uncaught exception fails the test as a traceback would)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from squeeze.cli import main
from squeeze.resources import DEFAULT_MODEL, default_eval_text


def run_cli(capfd, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (directories -1), hidden temporaries included."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def copy_model(root: Path, name: str) -> Path:
    out = root / name
    shutil.copytree(DEFAULT_MODEL, out)
    return out


def _with_tensor(src: Path, out: Path, key: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    state = load_file(str(src / "model.safetensors"))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class _RunsCode:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_dirs(root: Path) -> None:
    """pickled: the bundled weights as pytorch_model.bin; runs_code: a .bin that would create root/PWNED."""
    import torch
    from safetensors.torch import load_file

    for name in ("pickled", "runs_code"):
        (root / name).mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(DEFAULT_MODEL / f, root / name / f)
    torch.save(load_file(str(DEFAULT_MODEL / "model.safetensors")), root / "pickled" / "pytorch_model.bin")
    torch.save({"model.embed_tokens.weight": _RunsCode(root / "PWNED")}, root / "runs_code" / "pytorch_model.bin")


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """Broken inputs built once (every case names the ones it uses), beside a good checkpoint and exports."""
    import squeeze
    from squeeze import api
    from squeeze.scheme import get_scheme

    root = tmp_path_factory.mktemp("corpus")
    weights = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    for name, data in {"truncated": weights[: len(weights) // 2], "header_cut": weights[:6],
                       "bad_header": weights[:8] + b"{not json" + weights[17:], "empty_weights": b""}.items():
        (copy_model(root, name) / "model.safetensors").write_bytes(data)
    (copy_model(root, "config_list") / "config.json").write_text("[1, 2]")
    (copy_model(root, "config_garbled") / "config.json").write_text('{"model_type": "llama",')
    _with_tensor(DEFAULT_MODEL, root / "nan_weights", "model.layers.0.self_attn.q_proj.weight", float("nan"))
    _with_tensor(DEFAULT_MODEL, root / "inf_weights", "model.layers.2.mlp.down_proj.weight", float("inf"))
    (root / "user_dir").mkdir()
    (root / "user_dir" / "thesis.txt").write_text("years of work")
    (root / "user_file.gguf").write_text("not squeeze's")
    (root / "user_dir.gguf").mkdir()
    (root / "user_dir.gguf" / "notes.txt").write_text("mine")

    ckpt = api.quantize_dir(DEFAULT_MODEL, root / "ckpt", squeeze.RTN(scheme=get_scheme("w4g32")))
    for name, text in {"meta_garbled": "{", "meta_list": "[]", "meta_layers": '{"layers": 3}'}.items():
        shutil.copytree(ckpt, root / name)
        (root / name / "squeeze.json").write_text(text)
    shutil.copytree(ckpt, root / "qc_unknown")
    config = json.loads((ckpt / "config.json").read_text())
    (root / "qc_unknown" / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))

    squeeze.export(DEFAULT_MODEL, "gguf", root / "good.gguf", verify=False)
    gguf = (root / "good.gguf").read_bytes()
    (root / "truncated.gguf").write_bytes(gguf[: len(gguf) // 3])
    (root / "header_cut.gguf").write_bytes(gguf[:20])
    (root / "text.gguf").write_text("hello")
    (root / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (root / "empty.onnx").write_bytes(b"")

    _pickle_dirs(root)
    remote = copy_model(root, "remote_code")  # config.json asks for code shipped beside it
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"from pathlib import Path\nPath({str(root / 'PWNED')!r}).touch()\n")

    texts = {"seven.txt": "Once upon a time", "empty.txt": "", "blank.txt": "  \n\n ",
             "bad.jsonl": '{"text": "a"}\n{oops\n', "notext.jsonl": '{"content": "a"}\n', "empty.jsonl": "\n",
             "task_bad_json.jsonl": "{nope\n", "task_bad_label.jsonl": '{"context": "a", "choices": ["b", "c"], "label": 5}\n',
             "task_one_choice.jsonl": '{"context": "a", "choices": ["b"], "label": 0}\n', "task_empty.jsonl": "",
             "recipe_bad.yaml": "passes: [\n", "recipe_list.yaml": "- a\n- b\n",
             "recipe_method.yaml": "passes:\n  - method: magic\n",
             "recipe_option.yaml": "passes:\n  - method: rtn\n    scheme: w4g32\n    colour: red\n",
             "recipe_python.yaml": "passes: !!python/object/apply:os.system ['echo pwned']\n",
             "recipe_passes_str.yaml": "passes: rtn\n",
             "bench_bad.yaml": "name: [\n", "bench_key.yaml": "name: x\nmodel: m\ndata: d\ncolour: 1\n",
             "bench_missing.yaml": "name: x\n", "bench_format.yaml": "name: x\nmodel: m\ndata: d\nformats: [{format: tflite9}]\n",
             "bench_list.yaml": "- 1\n"}
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 400)
    (root / "task_latin1.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
    (root / "recipe_latin1.yaml").write_bytes(b"passes: caf\xe9\n")
    return root


Q = ("quantize", "{model}")
E = ("eval", "{model}", "--data", "{text}")
X = ("export", "{model}", "--to", "gguf")
# name -> (argv: {root} the corpus, {model} the bundled model, {text} its eval text; the cwd is an empty
#          directory; then the text the error line must contain: the file or the flag)
CASES: dict[str, tuple[tuple[str, ...], str]] = {
    # corrupt model files
    "quantize truncated safetensors": (("quantize", "{root}/truncated", "-o", "q"), "truncated/model.safetensors"),
    "quantize safetensors cut in header": (("quantize", "{root}/header_cut", "-o", "q"), "header_cut/model.safetensors"),
    "quantize corrupt safetensors header": (("quantize", "{root}/bad_header", "-o", "q"), "bad_header/model.safetensors"),
    "quantize empty safetensors": (("quantize", "{root}/empty_weights", "-o", "q"), "empty_weights/model.safetensors"),
    "quantize config not an object": (("quantize", "{root}/config_list", "-o", "q"), "config_list/config.json"),
    "quantize config garbled": (("quantize", "{root}/config_garbled", "-o", "q"), "config_garbled/config.json"),
    "eval truncated safetensors": (("eval", "{root}/truncated", "--data", "{text}"), "truncated/model.safetensors"),
    "eval corrupt safetensors header": (("eval", "{root}/bad_header", "--data", "{text}"), "bad_header/model.safetensors"),
    "eval reference truncated": (E + ("--reference", "{root}/truncated"), "truncated/model.safetensors"),
    "export truncated safetensors": (("export", "{root}/truncated", "--to", "gguf", "-o", "m.gguf"), "truncated/model.safetensors"),
    "export onnx truncated safetensors": (("export", "{root}/truncated", "--to", "onnx", "-o", "m.onnx"), "truncated/model.safetensors"),
    "inspect truncated safetensors": (("inspect", "{root}/truncated"), "truncated/model.safetensors"),
    "inspect config garbled": (("inspect", "{root}/config_garbled"), "config_garbled/config.json"),
    # pickle weights (the runs_code case would create {root}/PWNED, which the tree check would see)
    "quantize pickle weights": (("quantize", "{root}/pickled", "-o", "q"), "--allow-pickle"),
    "eval pickle weights": (("eval", "{root}/pickled", "--data", "{text}"), "--allow-pickle"),
    "eval pickle reference": (E + ("--reference", "{root}/pickled"), "--allow-pickle"),
    "export pickle weights": (("export", "{root}/pickled", "--to", "gguf", "-o", "m.gguf"), "--allow-pickle"),
    "quantize code-running pickle with --allow-pickle": (("quantize", "{root}/runs_code", "-o", "q", "--allow-pickle"), "runs_code"),
    "eval code-running pickle with --allow-pickle": (("eval", "{root}/runs_code", "--data", "{text}", "--allow-pickle"), "runs_code"),
    "export code-running pickle with --allow-pickle": (("export", "{root}/runs_code", "--to", "gguf", "-o", "m.gguf", "--allow-pickle"), "runs_code"),
    "quantize remote code": (("quantize", "{root}/remote_code", "-o", "q"), "remote_code"),
    "eval remote code": (("eval", "{root}/remote_code", "--data", "{text}"), "remote_code"),
    "export onnx remote code": (("export", "{root}/remote_code", "--to", "onnx", "-o", "m.onnx"), "remote_code"),
    # corrupt checkpoint records
    "eval squeeze.json garbled": (("eval", "{root}/meta_garbled", "--data", "{text}"), "meta_garbled/squeeze.json"),
    "eval squeeze.json a list": (("eval", "{root}/meta_list", "--data", "{text}"), "meta_list/squeeze.json"),
    "inspect squeeze.json garbled": (("inspect", "{root}/meta_garbled"), "meta_garbled/squeeze.json"),
    "inspect squeeze.json layers not a map": (("inspect", "{root}/meta_layers"), "meta_layers/squeeze.json"),
    "export squeeze.json garbled": (("export", "{root}/meta_garbled", "--to", "gguf", "-o", "m.gguf"), "meta_garbled/squeeze.json"),
    "eval unknown quant_method": (("eval", "{root}/qc_unknown", "--data", "{text}"), "qc_unknown/config.json"),
    # NaN / Inf weights
    "quantize NaN weights": (("quantize", "{root}/nan_weights", "-o", "q"), "model.layers.0.self_attn.q_proj.weight"),
    "quantize Inf weights": (("quantize", "{root}/inf_weights", "-o", "q"), "model.layers.2.mlp.down_proj.weight"),
    "eval NaN weights": (("eval", "{root}/nan_weights", "--data", "{text}"), "model.layers.0.self_attn.q_proj.weight"),
    "export NaN weights": (("export", "{root}/nan_weights", "--to", "gguf", "-o", "m.gguf"), "model.layers.0.self_attn.q_proj.weight"),
    "export onnx Inf weights": (("export", "{root}/inf_weights", "--to", "onnx", "-o", "m.onnx"), "model.layers.2.mlp.down_proj.weight"),
    # corrupt GGUF / ONNX
    "quantize truncated gguf": (("quantize", "{root}/truncated.gguf", "-o", "q"), "truncated.gguf"),
    "quantize gguf cut in header": (("quantize", "{root}/header_cut.gguf", "-o", "q"), "header_cut.gguf"),
    "quantize text named .gguf": (("quantize", "{root}/text.gguf", "-o", "q"), "text.gguf"),
    "eval truncated gguf": (("eval", "{root}/truncated.gguf", "--data", "{text}"), "truncated.gguf"),
    "eval text named .gguf": (("eval", "{root}/text.gguf", "--data", "{text}"), "text.gguf"),
    "export truncated gguf": (("export", "{root}/truncated.gguf", "--to", "gguf", "-o", "m.gguf"), "truncated.gguf"),
    "eval garbage onnx": (("eval", "{root}/garbage.onnx", "--data", "{text}"), "garbage.onnx"),
    "eval empty onnx": (("eval", "{root}/empty.onnx", "--data", "{text}"), "empty.onnx"),
    # calibration and data files
    "quantize 7-token calibration": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/seven.txt"), "seven.txt"),
    "quantize empty calibration": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/empty.txt"), "empty.txt"),
    "quantize blank calibration": (Q + ("-o", "q", "--method", "awq", "--calib", "{root}/blank.txt"), "blank.txt"),
    "quantize latin-1 calibration": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/latin1.txt"), "latin1.txt"),
    "quantize calibration bad jsonl": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/bad.jsonl"), "bad.jsonl:2"),
    "quantize calibration jsonl no text": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/notext.jsonl"), "notext.jsonl:1"),
    "quantize calibration jsonl empty": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/empty.jsonl"), "empty.jsonl"),
    "quantize calibration is a directory": (Q + ("-o", "q", "--method", "gptq", "--calib", "{root}/user_dir"), "user_dir"),
    "quantize nsamples zero": (Q + ("-o", "q", "--method", "gptq", "--nsamples", "0"), "--nsamples"),
    "quantize seqlen one": (Q + ("-o", "q", "--method", "gptq", "--seqlen", "1"), "--seqlen"),
    "eval empty data": (("eval", "{model}", "--data", "{root}/empty.txt"), "empty.txt"),
    "eval latin-1 data": (("eval", "{model}", "--data", "{root}/latin1.txt"), "latin1.txt"),
    "eval data bad jsonl": (("eval", "{model}", "--data", "{root}/bad.jsonl"), "bad.jsonl:2"),
    "eval data is a directory": (("eval", "{model}", "--data", "{root}/user_dir"), "user_dir"),
    "eval task bad json": (E + ("--task", "{root}/task_bad_json.jsonl"), "task_bad_json.jsonl:1"),
    "eval task label out of range": (E + ("--task", "{root}/task_bad_label.jsonl"), "task_bad_label.jsonl:1"),
    "eval task one choice": (E + ("--task", "{root}/task_one_choice.jsonl"), "task_one_choice.jsonl:1"),
    "eval task empty": (E + ("--task", "{root}/task_empty.jsonl"), "task_empty.jsonl"),
    "eval task latin-1": (E + ("--task", "{root}/task_latin1.jsonl"), "task_latin1.jsonl"),
    "eval task missing": (E + ("--task", "{root}/nope.jsonl"), "nope.jsonl"),
    # flags
    "eval ctx beyond positions": (E + ("--ctx", "100000"), "--ctx"),
    "eval ctx one": (E + ("--ctx", "1"), "--ctx"),
    "eval unknown runtime": (E + ("--runtime", "tpu9"), "tpu9"),
    "eval unknown suffix": (("eval", "{root}/seven.txt", "--data", "{text}"), "seven.txt"),
    "eval reference missing": (E + ("--reference", "{root}/nope"), "nope"),
    "eval tokenizer missing": (E + ("--tokenizer", "{root}/nope"), "nope"),
    "quantize bits nine": (Q + ("-o", "q", "--bits", "9"), "--bits"),
    "quantize group size zero": (Q + ("-o", "q", "--group-size", "0"), "--group-size"),
    "quantize group size with channel": (Q + ("-o", "q", "--group-size", "32", "--granularity", "channel"), "--group-size"),
    "quantize damp with rtn": (Q + ("-o", "q", "--damp", "0.1"), "--damp"),
    "quantize alpha with gptq": (Q + ("-o", "q", "--method", "gptq", "--alpha", "0.5"), "--alpha"),
    "quantize act-asym without act": (Q + ("-o", "q", "--act-asym"), "--act-asym"),
    "quantize unknown method": (Q + ("-o", "q", "--method", "magic"), "--method"),
    "quantize unknown calibration precision": (Q + ("-o", "q", "--method", "gptq", "--calib-precision", "fp8"),
                                               "--calib-precision"),
    "quantize calibration precision with rtn": (Q + ("-o", "q", "--calib-precision", "bfloat16"), "--calib-precision"),
    "quantize unknown scheme": (Q + ("-o", "q", "--scheme", "w4g100"), "w4g100"),
    "quantize shard size not a size": (Q + ("-o", "q", "--max-shard-size", "lots"), "--max-shard-size"),
    "quantize shard size zero": (Q + ("-o", "q", "--max-shard-size", "0GB"), "--max-shard-size"),
    "quantize offload into a file": (Q + ("-o", "q", "--offload-activations", "{root}/seven.txt"),
                                     "--offload-activations"),
    "quantize workers zero": (Q + ("-o", "q", "--workers", "0"), "--workers"),
    "quantize resume with nothing to resume": (Q + ("-o", "q", "--resume"), "--resume"),
    "quantize bits not a number": (Q + ("-o", "q", "--bits", "four"), "--bits"),
    "quantize no targets match": (Q + ("-o", "q", "--targets", "nothing_here"), "--targets"),
    "export unknown format": (("export", "{model}", "--to", "tflite9", "-o", "m.tflite"), "tflite9"),
    "export unknown gguf type": (X + ("-o", "m.gguf", "--type", "q9_9"), "q9_9"),
    "export kv-cache to gguf": (X + ("-o", "m.gguf", "--kv-cache"), "--kv-cache"),
    # recipes and bench configs
    "quantize recipe bad yaml": (Q + ("-o", "q", "--recipe", "{root}/recipe_bad.yaml"), "recipe_bad.yaml"),
    "quantize recipe a list": (Q + ("-o", "q", "--recipe", "{root}/recipe_list.yaml"), "recipe_list.yaml"),
    "quantize recipe unknown method": (Q + ("-o", "q", "--recipe", "{root}/recipe_method.yaml"), "recipe_method.yaml"),
    "quantize recipe unknown option": (Q + ("-o", "q", "--recipe", "{root}/recipe_option.yaml"), "recipe_option.yaml"),
    "quantize recipe python tag": (Q + ("-o", "q", "--recipe", "{root}/recipe_python.yaml"), "recipe_python.yaml"),
    "quantize recipe passes a string": (Q + ("-o", "q", "--recipe", "{root}/recipe_passes_str.yaml"), "recipe_passes_str.yaml"),
    "quantize recipe latin-1": (Q + ("-o", "q", "--recipe", "{root}/recipe_latin1.yaml"), "recipe_latin1.yaml"),
    "quantize recipe missing": (Q + ("-o", "q", "--recipe", "{root}/nope.yaml"), "nope.yaml"),
    "bench config bad yaml": (("bench", "{root}/bench_bad.yaml"), "bench_bad.yaml"),
    "bench config unknown key": (("bench", "{root}/bench_key.yaml"), "bench_key.yaml"),
    "bench config missing keys": (("bench", "{root}/bench_missing.yaml"), "bench_missing.yaml"),
    "bench config unknown format": (("bench", "{root}/bench_format.yaml"), "bench_format.yaml"),
    "bench config a list": (("bench", "{root}/bench_list.yaml"), "bench_list.yaml"),
    "bench config missing": (("bench", "{root}/nope.yaml"), "nope.yaml"),
    "bench no config no model": (("bench",), "--model"),
    "bench data missing": (("bench", "--model", "{model}", "--data", "{root}/nope.txt"), "nope.txt"),
    "bench data latin-1": (("bench", "--model", "{model}", "--data", "{root}/latin1.txt"), "latin1.txt"),
    "bench task bad": (("bench", "--model", "{model}", "--data", "{text}", "--task", "{root}/task_bad_json.jsonl"),
                       "task_bad_json.jsonl:1"),
    "bench model truncated": (("bench", "--model", "{root}/truncated", "--data", "{text}"), "truncated/model.safetensors"),
    # outputs that would destroy something
    "quantize onto its input": (("quantize", "{root}/ckpt", "-o", "{root}/ckpt", "--overwrite"), "ckpt"),
    "quantize into its input": (("quantize", "{root}/ckpt", "-o", "{root}/ckpt/sub"), "ckpt/sub"),
    "quantize onto the directory holding its input": (("quantize", "{root}/ckpt", "-o", "{root}", "--overwrite"), "ckpt"),
    "quantize onto its calibration file": (Q + ("-o", "{root}/seven.txt", "--method", "gptq", "--calib", "{root}/seven.txt", "--overwrite"), "seven.txt"),
    "quantize over a user directory": (Q + ("-o", "{root}/user_dir", "--overwrite"), "user_dir"),
    "quantize over a file": (Q + ("-o", "{root}/user_file.gguf", "--overwrite"), "user_file.gguf"),
    "quantize output exists": (Q + ("-o", "{root}/ckpt"), "ckpt"),
    "quantize output parent missing": (Q + ("-o", "{root}/no/such/q"), "no/such"),
    "export onto cwd": (X + ("-o", ".", "--overwrite"), "'.'"),
    "export over a user directory": (X + ("-o", "{root}/user_dir", "--overwrite"), "user_dir"),
    "export over a directory named .gguf": (X + ("-o", "{root}/user_dir.gguf", "--overwrite"), "user_dir.gguf"),
    "export wrong suffix": (X + ("-o", "m.bin"), "m.bin"),
    "export onnx wrong suffix": (("export", "{model}", "--to", "onnx", "-o", "m.gguf"), "m.gguf"),
    "export onto its gguf input": (("export", "{root}/good.gguf", "--to", "gguf", "-o", "{root}/good.gguf", "--overwrite"), "good.gguf"),
    "export output exists": (X + ("-o", "{root}/user_file.gguf"), "user_file.gguf"),
    "inspect a file": (("inspect", "{root}/seven.txt"), "seven.txt"),
    "inspect missing": (("inspect", "{root}/nope"), "nope"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_corpus(case, corpus_root, tmp_path, capfd, monkeypatch):
    argv, must_name = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    fill = {"root": corpus_root, "model": DEFAULT_MODEL, "text": default_eval_text()}
    before_out, before_root = tree(out), tree(corpus_root)
    rc, stdout, err = run_cli(capfd, *(a.format(**fill) for a in argv))
    assert rc == 2, (stdout, err)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert must_name in lines[0], lines[0]
    assert "Traceback" not in err
    assert tree(out) == before_out and tree(corpus_root) == before_root  # nothing written, no temporary left


def test_bad_calibration_is_reported_before_the_model_loads(corpus_root, tmp_path, capfd, monkeypatch):
    from squeeze import api

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration file was checked")

    monkeypatch.setattr(api, "load", no_loading)
    rc, _, err = run_cli(capfd, "quantize", DEFAULT_MODEL, "-o", tmp_path / "q", "--method", "gptq",
                         "--calib", corpus_root / "seven.txt")
    assert rc == 2 and "fewer than one --seqlen window of 512" in err, err


def test_bad_task_and_text_are_reported_before_the_model_opens(corpus_root, capfd, monkeypatch):
    from squeeze import api

    def no_opening(*args, **kwargs):
        raise AssertionError("the model was opened before the --task / --data files were checked")

    monkeypatch.setattr(api, "_open", no_opening)
    rc, _, err = run_cli(capfd, "eval", DEFAULT_MODEL, "--data", default_eval_text(),
                         "--task", corpus_root / "task_bad_label.jsonl")
    assert rc == 2 and "task_bad_label.jsonl:1" in err, err
    rc, _, err = run_cli(capfd, "eval", DEFAULT_MODEL, "--data", corpus_root / "latin1.txt")
    assert rc == 2 and "not UTF-8" in err, err


def test_calibration_floor_is_one_window(tmp_path):
    """Exactly --seqlen tokens calibrate (every window is the whole text); one fewer is refused."""
    from squeeze.calib import CalibConfig, load_calibration
    from squeeze.errors import SqueezeError
    from squeeze.model import load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    text = tmp_path / "c.txt"
    text.write_text(default_eval_text().read_text()[:400])
    n = len(tok(text.read_text())["input_ids"])
    assert load_calibration(tok, CalibConfig(str(text), nsamples=2, seqlen=n)).input_ids.shape == (2, n)
    with pytest.raises(SqueezeError, match=f"has {n} tokens, fewer than one --seqlen window of {n + 1}"):
        load_calibration(tok, CalibConfig(str(text), nsamples=2, seqlen=n + 1))


def test_nonfinite_logits_are_refused(tmp_path, capfd):
    """A runtime whose weights escaped the load-time check (here: a module) still cannot report ppl nan."""
    import torch

    import squeeze
    from squeeze.errors import SqueezeError

    model = squeeze.load(DEFAULT_MODEL)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    from squeeze.model import load_tokenizer

    with pytest.raises(SqueezeError, match=r"non-finite logits \(ppl nan\)"):
        squeeze.evaluate(model, default_eval_text(), ctx=64, tokenizer=load_tokenizer(DEFAULT_MODEL), progress=False)


def test_bench_exits_1_on_a_failed_cell_unless_keep_going(tmp_path, capfd, monkeypatch):
    from squeeze import bench

    monkeypatch.setattr(bench, "measure_cell", lambda artifact, config, runtime: {"ppl": 1.0})  # no subprocess
    monkeypatch.chdir(tmp_path)
    args = ("bench", "--model", DEFAULT_MODEL, "--data", default_eval_text(), "--method", "nosuch:w4g32",
            "--method", "rtn:w8", "--reports", tmp_path / "reports", "--cache-dir", tmp_path / "cache")
    rc, out, err = run_cli(capfd, *args)
    assert rc == 1
    assert error_lines(err) == ["error: 1 of 3 bench cells failed (ran 2); first: nosuch:w4g32 x torch:-: unknown "
                                "method 'nosuch'; known methods: awq, distill, gptq, magnitude, qat, rtn, smoothquant, sparsegpt, "
                                "structured, "
                                "wanda; "
                                "fix it and rerun "
                                "(finished cells are cached), or pass --keep-going"]
    rows = lambda: json.loads((tmp_path / "reports" / "stories260K" / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows()] == ["float", "nosuch"]  # it stopped at the failed cell
    rc, out, err = run_cli(capfd, *args, "--keep-going")
    assert rc == 0 and "warning: 1 of 3 bench cells failed (ran 3)" in err
    assert [r["method"] for r in rows()] == ["float", "nosuch", "rtn"] and "error" not in rows()[2]


def test_allow_pickle_loads_plain_weights_as_safetensors_would(corpus_root, tmp_path, capfd):
    from safetensors.torch import load_file

    assert run_cli(capfd, "quantize", corpus_root / "pickled", "-o", tmp_path / "p", "--allow-pickle")[0] == 0
    assert run_cli(capfd, "quantize", DEFAULT_MODEL, "-o", tmp_path / "s")[0] == 0
    a, b = load_file(str(tmp_path / "p" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert not (corpus_root / "PWNED").exists()


def test_export_allow_pickle_writes_what_safetensors_would(corpus_root, tmp_path, capfd):
    """`export --allow-pickle` of the bundled weights saved as pytorch_model.bin writes the same GGUF tensors
    as the safetensors original (the pickle is read into a temporary safetensors copy, which is removed)."""
    import numpy as np
    from gguf import GGUFReader

    out = tmp_path / "out"
    out.mkdir()
    args = ("--to", "gguf", "--type", "q8_0", "--no-verify")
    assert run_cli(capfd, "export", corpus_root / "pickled", "-o", out / "p.gguf", *args, "--allow-pickle")[0] == 0
    assert run_cli(capfd, "export", DEFAULT_MODEL, "-o", out / "s.gguf", *args)[0] == 0
    assert sorted(tree(out)) == ["p.gguf", "s.gguf"]  # no temporary left
    read = lambda f: {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(str(f)).tensors}  # noqa: E731
    a, b = read(out / "p.gguf"), read(out / "s.gguf")
    assert len(a) == 47 and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert not (corpus_root / "PWNED").exists()


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_read_only_output_directory(tmp_path, capfd, monkeypatch, command):
    """Root writes through mode bits, so the read-only filesystem is simulated twice: the up-front check
    (os.access says no) and the write itself failing with EROFS; both are one line naming the output."""
    import errno
    import os

    from squeeze import fsutil

    target = tmp_path / ("q" if command == "quantize" else "m.gguf")
    argv = (("quantize", DEFAULT_MODEL, "-o", target) if command == "quantize"
            else ("export", DEFAULT_MODEL, "--to", "gguf", "-o", target, "--no-verify"))
    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
        rc, _, err = run_cli(capfd, *argv)
    assert rc == 2 and error_lines(err) == [f"error: output directory {str(tmp_path)!r} is not writable"], err

    def read_only(parent, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(parent))

    monkeypatch.setattr(fsutil, "_new_temp_dir", read_only)
    monkeypatch.setattr(fsutil, "_new_temp_file", read_only)
    rc, _, err = run_cli(capfd, *argv)
    assert rc == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert error_lines(err)[0].startswith(f"error: cannot write output {str(target)!r}: Read-only file system")
    assert list(tmp_path.iterdir()) == []
