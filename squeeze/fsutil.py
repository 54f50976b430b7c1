"""Atomic outputs: write into a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from squeeze.errors import SqueezeError


def check_output_path(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and may not be replaced."""
    p = Path(out)
    if p.exists() and not overwrite:
        raise SqueezeError(f"output {str(p)!r} already exists; pass --overwrite to replace it")
    if not p.parent.exists():
        raise SqueezeError(f"output directory {str(p.parent)!r} does not exist")
    return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool):
    """Yield an empty temporary directory beside ``out``; on success it replaces ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_output_file(out: Path, overwrite: bool):
    """Yield a temporary file path beside ``out``; on success it replaces ``out``."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    tmp = Path(name)

    os.close(fd)
    try:
        yield tmp
        _replace(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SqueezeError(f"output {str(out)!r} appeared while writing; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
        tmp.rename(out)
        _remove(old)
    else:
        tmp.rename(out)
