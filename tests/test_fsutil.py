"""Atomic outputs: what --overwrite may replace, inputs never destroyed, temporaries of dead runs, modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from squeeze.errors import SqueezeError
from squeeze.fsutil import (
    _temp_name,
    atomic_output_dir,
    atomic_output_file,
    check_output_path,
    remove_dead_temporaries,
    scratch_dir,
)


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overwrite_replaces_only_the_same_kind(tmp_path):
    user_dir = tmp_path / "photos"
    user_dir.mkdir()
    (user_dir / "me.jpg").write_text("x")
    with pytest.raises(SqueezeError, match="is a directory; --overwrite replaces a file only"):
        check_output_path(user_dir, True, kind="file")
    with pytest.raises(SqueezeError, match="squeeze did not write"):
        check_output_path(user_dir, True, kind="dir")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(SqueezeError, match="is a file; --overwrite replaces a directory only"):
        check_output_path(a_file, True, kind="dir")
    (user_dir / "squeeze.json").write_text("{}")  # squeeze's own output directory
    assert check_output_path(user_dir, True, kind="dir") == user_dir
    assert check_output_path(a_file, True, kind="file") == a_file
    assert (user_dir / "me.jpg").is_file() and a_file.is_file()


def test_output_may_not_be_contain_or_lie_inside_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(SqueezeError, match="is the input"):
        check_output_path(model, True, inputs=(model,))
    with pytest.raises(SqueezeError, match="is the input"):  # the same directory by another spelling
        check_output_path(tmp_path / "model" / ".." / "model", True, inputs=(model,))
    with pytest.raises(SqueezeError, match="contains the input"):
        check_output_path(tmp_path, True, inputs=(model,))
    with pytest.raises(SqueezeError, match="lies inside the input"):
        check_output_path(model / "out", False, inputs=(model,))
    assert check_output_path(tmp_path / "out", False, inputs=(model, None)) == tmp_path / "out"


def test_suffix_and_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SqueezeError, match=r"output '\.' must end in \.gguf"):
        check_output_path(".", True, kind="file", suffixes=(".gguf",))
    with pytest.raises(SqueezeError, match=r"must end in \.plan or \.engine"):
        check_output_path("m.onnx", False, kind="file", suffixes=(".plan", ".engine"))
    with pytest.raises(SqueezeError, match="is a directory"):  # "." named as a file, without a suffix rule
        check_output_path(".", True, kind="file")


def test_unwritable_output_directory_is_one_error(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(SqueezeError, match="is not writable"):
        check_output_path(tmp_path / "out", False)


def test_write_errors_name_the_output_and_leave_nothing(tmp_path):
    with pytest.raises(SqueezeError, match=r"cannot write output '.*out\.gguf': Read-only file system"):
        with atomic_output_file(tmp_path / "out.gguf", False):
            raise OSError(30, "Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    pid = dead_pid()
    dead_dir = tmp_path / _temp_name("model-w4").replace(f"-{os.getpid()}-", f"-{pid}-")
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x" * 100)
    dead_file = tmp_path / _temp_name("model.gguf").replace(f"-{os.getpid()}-", f"-{pid}-")
    dead_file.write_bytes(b"x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_file = tmp_path / _temp_name("model.gguf").replace(f"-{os.getpid()}-", f"-{live.pid}-")
        live_file.write_bytes(b"x")
        other_host = tmp_path / f".model.gguf.tmp-00000000-{pid}-0123abcd"
        other_host.write_bytes(b"x")
        user_file = tmp_path / ".model.gguf.tmp-notes"
        user_file.write_bytes(b"x")
        mine = tmp_path / _temp_name("x.gguf")  # this process's own
        mine.write_bytes(b"x")
        with atomic_output_file(tmp_path / "model.gguf", False) as tmp:  # a new run cleans as it starts
            tmp.write_bytes(b"new")
        names = {p.name for p in tmp_path.iterdir()}
        assert dead_dir.name not in names and dead_file.name not in names
        assert {live_file.name, other_host.name, user_file.name, mine.name, "model.gguf"} == names
    finally:
        live.kill()
        live.wait()


def test_old_output_of_a_run_killed_mid_rename_is_restored(tmp_path):
    old = tmp_path / _temp_name("model-w4", "old").replace(f"-{os.getpid()}-", f"-{dead_pid()}-")
    old.mkdir()
    (old / "squeeze.json").write_text("{}")
    assert remove_dead_temporaries(tmp_path) == []
    assert (tmp_path / "model-w4" / "squeeze.json").is_file() and not old.exists()


def test_killed_run_leaves_a_temporary_the_next_run_removes(tmp_path):
    code = ("import sys, os, signal; from pathlib import Path; from squeeze.fsutil import atomic_output_dir\n"
            "with atomic_output_dir(Path(sys.argv[1]), False) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")])
    assert r.returncode == -9
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".ckpt.tmp-")  # what kill -9 leaves
    with atomic_output_dir(tmp_path / "ckpt", False) as tmp:
        (tmp / "squeeze.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_modes_of_a_normal_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "ckpt", False) as tmp:
            fd = os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors writes it
            os.close(fd)
        with atomic_output_file(tmp_path / "model.gguf", False) as tmp:
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "ckpt") == 0o777 & ~umask
    assert mode(tmp_path / "ckpt" / "model.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "model.gguf") == 0o666 & ~umask


def test_scratch_dir_is_removed(tmp_path):
    with scratch_dir(tmp_path, "m.dequantized") as tmp:
        (tmp / "x").write_text("x")
        assert tmp.name.startswith(".m.dequantized.scratch-")
    assert list(tmp_path.iterdir()) == []


def test_a_real_checkpoint_gets_umask_modes(stories_dir, tmp_path):
    """safetensors writes its file 0o600 and mkdtemp made directories 0o700: the checkpoint has neither."""
    from squeeze import RTN, api, get_scheme

    old = os.umask(0o022)
    try:
        out = api.quantize_dir(stories_dir, tmp_path / "ckpt", RTN(scheme=get_scheme("w8")))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(
        ["config.json", "model.safetensors", "squeeze-run.json", "squeeze.json", "tokenizer.json", "tokenizer.model",
         "tokenizer_config.json"], 0o644)
