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


def test_llama_cpp_backends_in_order_of_preference(monkeypatch):
    """llama-cpp-python when installed, else llama-cpp-py-sync; neither: the gguf extra's one-line hint;
    an unknown backend name lists the known ones."""
    import importlib.util

    from squeeze.eval import llamacpp_backends as lb

    real_find_spec = importlib.util.find_spec

    def installed(*modules):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: real_find_spec("json") if name in modules else None)

    installed("llama_cpp", "llama_cpp_py_sync")
    assert lb.llama_cpp_backend().name == "llama-cpp-python"
    assert lb.llama_cpp_backend("llama-cpp-py-sync").name == "llama-cpp-py-sync"
    installed("llama_cpp_py_sync")
    assert lb.llama_cpp_backend().name == "llama-cpp-py-sync"
    with pytest.raises(MissingExtraError, match=r"^llama-cpp-python is not installed"):
        lb.llama_cpp_backend("llama-cpp-python")
    installed()
    with pytest.raises(MissingExtraError) as e:
        lb.llama_cpp_backend()
    assert str(e.value) == ("llama-cpp-py-sync or llama-cpp-python is not installed; "
                            "install it with: pip install 'squeeze-quant[gguf]'")
    with pytest.raises(SqueezeError, match="known backends: llama-cpp-python, llama-cpp-py-sync"):
        lb.llama_cpp_backend("llama.cpp")


@pytest.mark.parametrize("command", ["eval", "export"])
def test_gguf_without_llama_cpp_is_one_line(command, tmp_path, monkeypatch, capfd):
    """`squeeze eval FILE.gguf` and a verified `squeeze export --to gguf` with no llama.cpp binding: exit 2 and
    the install hint, before any work (the export writes nothing)."""
    import importlib.util

    pytest.importorskip("gguf")
    import squeeze
    from squeeze.cli import main
    from squeeze.resources import DEFAULT_MODEL, default_eval_text

    path = squeeze.export(DEFAULT_MODEL, "gguf", tmp_path / "m.gguf", qtype="f32", verify=False).path
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llama_cpp", "llama_cpp_py_sync") else real_find_spec(name, *a))
    argv = (["eval", str(path), "--data", str(default_eval_text())] if command == "eval"
            else ["export", str(DEFAULT_MODEL), "--to", "gguf", "-o", str(tmp_path / "e.gguf")])
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines() == ["error: llama-cpp-py-sync or llama-cpp-python is not installed; "
                                        "install it with: pip install 'squeeze-quant[gguf]'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
