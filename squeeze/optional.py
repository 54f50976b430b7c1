"""Optional heavy dependencies, imported only where they are used, with a one-line install hint."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from contextlib import contextmanager
from types import ModuleType

from squeeze.errors import MissingExtraError, SqueezeError, VerificationError


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingExtraError telling which squeeze extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(package or module.split(".")[0], extra) from None


@contextmanager
def native_output_kept_back():
    """Hold back what a runtime's native code and its converter print (progress bars, C++ INFO lines, deprecation
    notices) while the block runs: file descriptors 1 and 2 go to a temporary file. If the block raises, the
    last lines are printed (unless it is squeeze's own one-line error), so a crash still shows its cause."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException as e:
            _restore(saved)
            if isinstance(e, (SqueezeError, VerificationError)):  # squeeze's own one-line message says it all
                raise
            sink.seek(0)
            tail = sink.read().decode(errors="replace").splitlines()[-20:]
            if tail:
                print("\n".join(tail), file=sys.stderr)
            raise
        else:
            _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
