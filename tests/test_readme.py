"""The README's two commands are the ones CI and users run, and its examples are a program that runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
GPU_MARK = "NVIDIA GPU"  # lines that need one are left out where there is none


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def readme_program() -> str:
    """Every shell and Python block after the install block, in order, as one bash script (install lines and
    GPU-only lines left out; Python blocks run through a here-document)."""
    lines = ["set -euo pipefail"]
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", README, re.S)[1:]:
        if lang == "python":
            lines += ["python - <<'PY'", body.rstrip(), "PY"]
            continue
        lines += [line for line in body.splitlines() if not line.startswith("pip install") and GPU_MARK not in line]
    return "\n".join(lines) + "\n"


def test_readme_starts_with_the_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.startswith("pip install") and main_job.endswith("squeeze quickstart")
    assert "pytest" in tests and '".[dev]"' in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and 'eval "$test_command"' in ci
    assert '"$rc" -eq 5' in ci  # "no tests collected" is a failure


def test_readme_program_leaves_out_only_installs_and_gpu_lines():
    program = readme_program()
    assert "pip install" not in program and "tensorrt" not in program
    assert program.count("python - <<'PY'") == 1 and "squeeze bench" in program
    blocks = "".join(body for _, body in re.findall(r"```(bash|python)\n(.*?)```", README, re.S))
    assert blocks.count(GPU_MARK) == 3  # the three TensorRT exports


def test_readme_commands_parse_and_connect():
    """Every `squeeze` line of the program parses with the real click commands, and every file or directory
    it reads is in the checkout or was written by an earlier line (fast; the test below runs them)."""
    from squeeze.cli import cli

    variables, made, outputs = {}, set(), []
    for line in readme_program().splitlines():
        if m := re.match(r"(\w+)=(\S+)", line):
            variables[m[1]] = m[2]
            continue
        if not line.startswith("squeeze "):
            continue
        args = [variables.get(a[1:], a) if a.startswith("$") else a for a in shlex.split(line, comments=True)[1:]]
        with cli.commands[args[0]].make_context(args[0], args[1:]) as ctx:
            params = ctx.params
        for key in ("model", "path", "config", "reference", "data", "task", "tokenizer", "recipe", "calib"):
            value = params.get(key)
            if value is not None and value != "self":
                assert str(value) in made or (ROOT / str(value)).exists(), f"{line!r}: {value} is made by no earlier line"
        for key in ("output", "reports"):
            if params.get(key) is not None:
                made.add(str(params[key]))
                outputs.append(str(params[key]))
    assert {"model-w4", "model-w8a8", "model-w8a8-azp", "model-w4g128", "model-q4km"} <= made
    assert len(outputs) == len(made), "two lines write the same output"


# About 5 minutes on 2 CPU cores (~25 commands, each importing torch and transformers): in the default suite,
# so that CI proves every README command runs as written.
def test_readme_examples_run_in_order_in_a_fresh_directory(tmp_path, llama_cpp):
    """From a directory holding only the checkout's inputs (squeeze/, calibration/, bench/ linked), every
    block runs, each file a later block uses was made by an earlier one, and the API block runs twice. Its GGUF
    exports are verified, and evaluated, in llama.cpp: without a backend that loads, it is skipped, saying why."""
    for name in ("squeeze", "calibration", "bench"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = tmp_path / "readme.sh"
    script.write_text(readme_program())
    published = lambda: {str(p): p.stat().st_mtime_ns for p in (ROOT / "reports").rglob("*")}
    reports_before = published()
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for made in ("model-w4", "stories-q8_0.gguf", "from-gguf-w4", "my-reports/stories260K/report.json",
                 "model-q4_k_m.gguf", "model-q4km", "model-q4km.gguf", "model-w8a8", "model-w8a8-azp", "model-w4g128",
                 "model.onnx", "model-w4.onnx", "model-w8a8.onnx", "model-azp.onnx", "model-kv.onnx", "api-w4"):
        assert (tmp_path / made).exists(), made
    assert published() == reports_before  # the published reports are untouched
    api_block = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    again = subprocess.run([sys.executable, "-c", api_block], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
