"""Errors squeeze raises for bad input: the CLI prints them as one line and exits 2."""


class SqueezeError(Exception):
    """A problem with what the user asked for (paths, options, models), with how to fix it."""


class MissingExtraError(SqueezeError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed; install it with: pip install 'squeeze-quant[{extra}]'")


class VerificationError(Exception):
    """An exported artifact failed its check in the real runtime (the CLI exits 1; the file is removed)."""
