"""A missing optional dependency gives a one-line install hint, not an ImportError traceback."""

import pytest

from squeeze.errors import MissingExtraError, SqueezeError
from squeeze.optional import require


def test_missing_extra_names_the_pip_command():
    with pytest.raises(MissingExtraError) as e:
        require("squeeze_no_such_runtime", "gguf")
    assert str(e.value) == "squeeze_no_such_runtime is not installed; install it with: pip install 'squeeze-quant[gguf]'"
    assert isinstance(e.value, SqueezeError)  # the CLI prints it as one line with exit code 2


def test_present_module_is_returned():
    assert require("json", "dev").dumps([1]) == "[1]"
