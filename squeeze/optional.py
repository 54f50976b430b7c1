"""Optional heavy dependencies, imported only where they are used, with a one-line install hint."""

from __future__ import annotations

import importlib
from types import ModuleType

from squeeze.errors import MissingExtraError


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingExtraError telling which squeeze extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(package or module.split(".")[0], extra) from None
