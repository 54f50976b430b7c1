"""Shared fixtures: the bundled real model, and tiny random models of other families built from configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from squeeze.resources import DEFAULT_MODEL, default_calibration_text, default_eval_text

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def pytest_addoption(parser):
    parser.addoption("--llama-cpp-backend", default=None,
                     help="run llama.cpp through this binding (llama-cpp-python or llama-cpp-py-sync) when both are "
                          "installed (default: squeeze's preference, llama-cpp-python)")


def pytest_configure(config):
    """--llama-cpp-backend NAME: that binding first in squeeze's order of preference for this session."""
    name = config.getoption("--llama-cpp-backend")
    if name is None:
        return
    from squeeze.eval import llamacpp_backends as lb

    if name not in lb.BACKENDS:
        raise pytest.UsageError(f"--llama-cpp-backend must be one of {', '.join(lb.BACKENDS)}, got {name!r}")
    preferred = {name: lb.BACKENDS[name], **{k: v for k, v in lb.BACKENDS.items() if k != name}}
    lb.BACKENDS.clear()
    lb.BACKENDS.update(preferred)


def pytest_collection_modifyitems(items):
    """Tests that run llama.cpp carry the llama_cpp mark: .ci/run runs them again on the other backend."""
    for item in items:
        if {"llama_cpp", "ggml_quantize"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.llama_cpp)


@pytest.fixture(scope="session")
def llama_cpp():
    """The llama.cpp backend squeeze runs GGUF files with here (llama-cpp-python, else llama-cpp-py-sync),
    its library loaded; the test is skipped, saying why, when there is none."""
    from squeeze.errors import SqueezeError
    from squeeze.eval.llamacpp_backends import llama_cpp_backend

    try:
        backend = llama_cpp_backend()
        backend.load()
    except SqueezeError as e:
        pytest.skip(f"no llama.cpp: {e}")
    return backend


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return default_eval_text()


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return default_calibration_text()


@pytest.fixture(scope="session")
def short_text(tmp_path_factory) -> Path:
    """The first ~4000 characters of the bundled eval text: quick to score."""
    p = tmp_path_factory.mktemp("text") / "short.txt"
    p.write_text(default_eval_text().read_text()[:4000])
    return p


def tiny_config(family: str):
    """A small random-initialised config of ``family`` with the bundled 512-token vocabulary."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen2":
        return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def build_tiny_model(family: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random model of ``family`` (with the bundled tokenizer) to ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def tiny256(tmp_path_factory) -> Path:
    """A random Llama whose rows are multiples of 256 (K-quants apply), untied, GQA 2, 2 layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("tiny256")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL / name, out / name)
    return out


@pytest.fixture(scope="session")
def stories_copy_as(tmp_path_factory):
    """The bundled model re-saved in another dtype (float16 / bfloat16)."""
    cache: dict[str, Path] = {}

    def make(dtype_name: str) -> Path:
        if dtype_name not in cache:
            import squeeze

            out = tmp_path_factory.mktemp(f"stories-{dtype_name}")
            model = squeeze.load(DEFAULT_MODEL).to(getattr(torch, dtype_name))
            model.save_pretrained(out)
            for name in TOKENIZER_FILES:
                shutil.copy(DEFAULT_MODEL / name, out / name)
            cache[dtype_name] = out
        return cache[dtype_name]

    return make
