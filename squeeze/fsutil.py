"""Atomic outputs: write into a temporary sibling, rename into place only when complete.

Temporary names carry their owner: ``.NAME.tmp-HOST-PID-RANDOM`` (HOST a hash of the host name).
A later run in the same directory removes the temporaries whose process is gone on this host;
a live run's (or another host's) are never touched. Temporaries are created with the modes a
normal write gets (0o777 / 0o666 less the umask), so the renamed output has them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from squeeze.errors import SqueezeError

# A directory squeeze wrote (a quantized checkpoint) holds this file; --overwrite replaces only those.
OUTPUT_MARKER = "squeeze.json"
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMP_KINDS = ("tmp", "old", "scratch")
_TEMP_NAME = re.compile(rf"^\.(?P<label>.+)\.(?P<kind>{'|'.join(TEMP_KINDS)})-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}$")


def _temp_name(label: str, kind: str = "tmp") -> str:
    return f".{label}.{kind}-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"


def _dead_owner(path: Path) -> re.Match | None:
    """The parsed name of ``path`` if it is a squeeze temporary whose run, on this host, has died."""
    m = _TEMP_NAME.match(path.name)
    if m is None or m["host"] != HOST_TAG or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
        return None
    return m


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_temporaries(directory: Path) -> list[Path]:
    """Remove squeeze temporaries in ``directory`` whose run (on this host) has died; returns them.

    An ``.old`` one whose output is missing (the run died between moving the old output aside and
    the new one in) is moved back instead.
    """
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _dead_owner(entry)
        if m is None:
            continue
        original = directory / m["label"]
        if m["kind"] == "old" and not (original.exists() or original.is_symlink()):
            entry.rename(original)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _is_squeeze_output_dir(p: Path) -> bool:
    """A directory --overwrite may replace: one squeeze wrote, an empty one, or a Core ML package (a file to its
    users, a directory on disk)."""
    package = p.suffix.lower() == ".mlpackage" and (p / "Manifest.json").is_file()
    return (p / OUTPUT_MARKER).is_file() or package or not any(p.iterdir())


def _check_not_an_input(out: Path, inputs) -> None:
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            raise SqueezeError(f"output {str(out)!r} is the input {str(given)!r}; choose another -o")
        if source.is_relative_to(target):
            raise SqueezeError(f"output {str(out)!r} contains the input {str(given)!r}; choose another -o")
        if target.is_relative_to(source):
            raise SqueezeError(f"output {str(out)!r} lies inside the input {str(given)!r}; choose another -o")


def check_output_path(out: str | Path, overwrite: bool, kind: str = "dir", inputs=(), suffixes=()) -> Path:
    """Fail early (before any work) if ``out`` may not be written.

    ``kind`` is what will be written ("dir" or "file"); ``--overwrite`` replaces only the same kind: a
    file with a file, a directory squeeze wrote (it holds squeeze.json) or an empty one with a directory.
    ``inputs``: paths the output may not be, contain or lie inside. ``suffixes``: allowed file endings.
    """
    p = Path(out)
    if suffixes and p.suffix.lower() not in suffixes:
        raise SqueezeError(f"output {str(p)!r} must end in {' or '.join(suffixes)}")
    if Path(os.path.abspath(p)).name == "":
        raise SqueezeError(f"output {str(p)!r} is a filesystem root; choose another -o")
    _check_not_an_input(p, inputs)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise SqueezeError(f"output {str(p)!r} already exists; pass --overwrite to replace it")
        if kind == "file" and p.is_dir():
            raise SqueezeError(f"output {str(p)!r} is a directory; --overwrite replaces a file only, so name a "
                               f"file (e.g. {str(p / ('model' + (suffixes[0] if suffixes else '')))!r})")
        if kind == "dir" and not p.is_dir():
            raise SqueezeError(f"output {str(p)!r} is a file; --overwrite replaces a directory only with a directory")
        if kind == "dir" and not _is_squeeze_output_dir(p):
            raise SqueezeError(f"output {str(p)!r} is a directory squeeze did not write (no {OUTPUT_MARKER}); "
                               "--overwrite will not replace it — choose another -o or remove it yourself")
    parent = Path(os.path.abspath(p)).parent
    if not parent.is_dir():
        raise SqueezeError(f"output directory {str(p.parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SqueezeError(f"output directory {str(p.parent)!r} is not writable")
    return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _new_temp_dir(parent: Path, label: str, kind: str) -> Path:
    remove_dead_temporaries(parent)
    while True:
        tmp = parent / _temp_name(label, kind)
        try:
            tmp.mkdir()  # mode 0o777 less the umask, as a plain mkdir
            return tmp
        except FileExistsError:
            continue


def _new_temp_file(parent: Path, label: str) -> Path:
    remove_dead_temporaries(parent)
    while True:
        tmp = parent / _temp_name(label)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _write_error(out: Path, e: OSError) -> SqueezeError:
    where = f" ({e.filename})" if e.filename else ""
    return SqueezeError(f"cannot write output {str(out)!r}: {e.strerror or e}{where}")


@contextlib.contextmanager
def _writing(out: Path):
    """OSErrors while creating ``out`` become one SqueezeError naming it."""
    try:
        yield
    except SqueezeError:
        raise
    except OSError as e:
        raise _write_error(out, e) from None


@contextlib.contextmanager
def _atomic_output(out: Path, overwrite: bool, make_temp):
    """Yield ``make_temp(parent, name)`` beside ``out``; on success it replaces ``out``, else it is removed."""
    out = Path(out)
    with _writing(out):
        out = Path(os.path.abspath(out))  # "." and "a/.." have names; a symlink itself is replaced
        tmp = make_temp(out.parent, out.name)
        try:
            yield tmp
            _replace(tmp, out, overwrite)
        except BaseException:
            _remove(tmp)
            raise


def atomic_output_dir(out: Path, overwrite: bool, reuse: Path | None = None):
    """Yield an empty temporary directory beside ``out`` (or ``reuse``, a dead run's temporary of the same
    output, taken over under this run's name); on success it replaces ``out``."""
    def make_temp(parent: Path, name: str) -> Path:
        if reuse is None:
            return _new_temp_dir(parent, name, "tmp")
        tmp = parent / _temp_name(name, "tmp")
        reuse.rename(tmp)  # atomic: two runs cannot both take it over
        remove_dead_temporaries(parent)
        return tmp

    return _atomic_output(out, overwrite, make_temp)


def dead_temporaries(out: Path) -> list[Path]:
    """Temporary outputs (``.NAME.tmp-...`` directories) of ``out`` left by runs that died on this host."""
    out = Path(os.path.abspath(out))
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        m = _dead_owner(entry)
        if m is not None and m["kind"] == "tmp" and m["label"] == out.name and entry.is_dir():
            found.append(entry)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def atomic_output_file(out: Path, overwrite: bool):
    """Yield a temporary file path beside ``out``; on success it replaces ``out``."""
    return _atomic_output(out, overwrite, _new_temp_file)


@contextlib.contextmanager
def scratch_dir(parent: Path, label: str):
    """A working directory in ``parent`` (owner-marked like every temporary), removed afterwards."""
    parent = Path(parent).resolve()
    with _writing(parent / label):
        tmp = _new_temp_dir(parent, label, "scratch")
    try:
        yield tmp
    finally:
        _remove(tmp)


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def give_normal_modes(path: Path) -> None:
    """Directories 0o777 and files 0o666 less the umask, as a plain write makes them: the writers used
    (safetensors writes 0o600) and temporary names must not leave an output private by accident."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    give_normal_modes(tmp)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SqueezeError(f"output {str(out)!r} appeared while writing; pass --overwrite to replace it")
        old = out.parent / _temp_name(out.name, "old")
        out.rename(old)
        tmp.rename(out)
        _remove(old)
    else:
        tmp.rename(out)
