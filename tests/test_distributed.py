"""Data-parallel calibration (squeeze.distributed): two gloo ranks on this machine against one process."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from squeeze import api
from squeeze.checkpoint.shards import SafetensorsFile
from squeeze.cli import main


def tensors(directory):
    f = SafetensorsFile(directory / "model.safetensors")
    return {k: f.get(k) for k in f.keys()}


def differing_codes(a: dict, b: dict) -> tuple[int, int]:
    """(codes that differ, codes) over the packed qweight tensors, unpacked to 4-bit codes."""
    from squeeze.primitives import unpack_rows

    diff = total = 0
    for key in a:
        if key.endswith(".qweight"):
            ca, cb = unpack_rows(a[key], 4, a[key].shape[0] * 8), unpack_rows(b[key], 4, b[key].shape[0] * 8)
            diff += int((ca != cb).sum())
            total += ca.numel()
    return diff, total


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed")
@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow),
                                    pytest.param("smoothquant", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process(method, stories_dir, calib_text, tmp_path, capfd):
    """--workers 2 (torchrun, gloo): the statistics are combined across ranks, so the checkpoint matches one
    process's up to summation order. Float tensors and scales must match closely; the number of 4-bit codes
    that differ is printed and must stay a small fraction."""
    scheme = "w8a8" if method == "smoothquant" else "w4g32"
    args = ["quantize", "--method", method, "--scheme", scheme, str(stories_dir), "--calib", str(calib_text),
            "--nsamples", "32", "--seqlen", "128"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert main([*args, "-o", str(tmp_path / "two"), "--workers", "2"]) == 0
    err = capfd.readouterr().err
    assert err.count("wrote ") == 2  # one line per command: the second rank says nothing
    run = json.loads((tmp_path / "two" / "squeeze-run.json").read_text())
    assert run["ranks"] == 2
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        if one[key].is_floating_point():
            torch.testing.assert_close(one[key], two[key], rtol=2e-3, atol=1e-3, msg=key)
    if method != "smoothquant":
        diff, total = differing_codes(one, two)
        print(f"{method}: {diff} of {total} codes differ between 1 and 2 ranks", file=sys.__stderr__)
        assert diff <= 0.001 * total
    with torch.no_grad():
        ids = torch.tensor([[1, 45, 79, 300, 12, 7, 99, 4]])
        a, b = api.load(tmp_path / "one")(ids).logits, api.load(tmp_path / "two")(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_workers_must_be_positive(stories_dir, tmp_path, capfd):
    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert capfd.readouterr().err.strip() == "error: --workers must be at least 1, got 0"
