"""int8 weights (and static int8 activations) as ONNX QuantizeLinear/DequantizeLinear pairs.

The weight is stored transposed, [K, N] int8 (uint8 for an asymmetric grid), with per-output-channel
scales on axis 1, so ``DequantizeLinear -> MatMul`` is the pattern ONNX Runtime fuses into an integer
matmul. squeeze's 8-bit symmetric codes c in 0..255 with zero point 128 are written as c - 128 with
zero point 0: the same numbers.

Activations use squeeze's calibrated per-tensor ``input_scale`` (never recomputed). squeeze's
symmetric int8 activation round(x/s) clamped to [-128, 127] is written for onnxruntime as uint8 with
zero point 128: clamp(round(x/s) + 128, 0, 255) is the same value shifted by 128, so the graph computes
exactly squeeze's numbers while onnxruntime uses its fast u8 x s8 kernels. For TensorRT (int8 Q/DQ
with zero point 0 only) it is written as int8 with zero point 0. Asymmetric ("azp") activations are
uint8 with the calibrated ``input_zero_point`` written as it is (onnxruntime's own QDQ form); TensorRT
cannot take them.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.exporters.onnx.matmulnbits import traced_output
from squeeze.modules import QuantLinear

# activation encoding -> (zero point dtype, zero point): both give exactly squeeze's symmetric int8.
# onnxruntime's fast CPU kernels want u8 activations; TensorRT takes only int8 with zero point 0.
# Asymmetric activations keep their own uint8 zero point and have only the "uint8" encoding.
ACT_ENCODINGS: dict[str, tuple[torch.dtype, int]] = {"uint8": (torch.uint8, 128), "int8": (torch.int8, 0)}


def check_qdq(layer: QuantLinear, name: str, act_encoding: str = "uint8") -> None:
    """Raise (with how to fix it) if ``layer`` cannot be written as per-channel int8 QDQ exactly."""
    s = layer.scheme
    if s.bits != 8 or s.granularity == "group":
        raise SqueezeError(f"{name}: QDQ export takes 8-bit per-channel weights, the layer is {s.name}; "
                           "quantize with --scheme w8a8")
    acts = s.activations
    if acts is not None and acts.mode != "static":
        raise SqueezeError(f"{name}: dynamic per-token activations have no QDQ form; quantize with --act static")
    if acts is not None and layer.input_scale is None:
        raise SqueezeError(f"{name}: static activations but no calibrated input_scale in the checkpoint")
    if acts is not None and not acts.symmetric:
        if layer.input_zero_point is None:
            raise SqueezeError(f"{name}: asymmetric activations but no calibrated input_zero_point in the checkpoint")
        if ACT_ENCODINGS[act_encoding][0] != torch.uint8:
            raise SqueezeError(f"{name}: asymmetric activations ({s.name}, uint8 with a zero point) cannot be "
                               f"written as {act_encoding} with zero point 0, the only form TensorRT takes; "
                               "re-quantize with symmetric activations (--scheme w8a8) for TensorRT")


def weight_tensors(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [K, N] int8/uint8, scale [N] float32, zero point [N] of the weight's dtype)."""
    codes = layer.codes.cpu().to(torch.int16)
    zeros = layer.zeros[:, 0].cpu().round().to(torch.int16)
    scale = layer.scales[:, 0].detach().cpu().float()
    if bool((zeros == 128).all()):
        return (codes - 128).to(torch.int8).t().contiguous(), scale, torch.zeros_like(zeros, dtype=torch.int8)
    return codes.to(torch.uint8).t().contiguous(), scale, zeros.to(torch.uint8)


class _QDQMatMulFn(torch.autograd.Function):
    """Forward: the QDQ graph's numbers in torch; symbolic: the Q/DQ/MatMul nodes."""

    @staticmethod
    def forward(ctx, x, act_scale, act_zero, weight, w_scale, w_zero):
        if torch.jit.is_tracing():
            return traced_output(x, weight.shape[1])
        if act_scale is not None:
            lo, hi = (0, 255) if act_zero.dtype == torch.uint8 else (-128, 127)
            q = torch.clamp(torch.round(x / act_scale) + act_zero.float(), lo, hi)
            x = (q - act_zero.float()) * act_scale
        w = (weight.float() - w_zero.float()) * w_scale
        return torch.matmul(x, w)

    @staticmethod
    def symbolic(g, x, act_scale, act_zero, weight, w_scale, w_zero):
        if not _is_none(act_scale):
            x = g.op("QuantizeLinear", x, act_scale, act_zero)
            x = g.op("DequantizeLinear", x, act_scale, act_zero)
        w = g.op("DequantizeLinear", weight, w_scale, w_zero, axis_i=1)
        return g.op("MatMul", x, w)


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


class QDQLinear(nn.Module):
    """Stands in for an 8-bit QuantLinear during export; its buffers become the graph's initializers."""

    def __init__(self, layer: QuantLinear, dtype: torch.dtype, act_encoding: str = "uint8"):
        super().__init__()
        if dtype != torch.float32:
            raise SqueezeError("int8 QDQ graphs run in float32 activations; export them with --type fp32")
        weight, w_scale, w_zero = weight_tensors(layer)
        self.register_buffer("weight_q", weight)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_zero_point", w_zero)
        static = layer.scheme.activations is not None
        self.register_buffer("input_scale", layer.input_scale.detach().cpu().float().reshape(()) if static else None)
        zp_dtype, zp = ACT_ENCODINGS[act_encoding]
        if layer.input_zero_point is not None:  # asymmetric: the calibrated zero point, exactly
            zp_dtype, zp = torch.uint8, int(layer.input_zero_point)
        self.register_buffer("input_zero_point", torch.tensor(zp, dtype=zp_dtype) if static else None)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QDQMatMulFn.apply(x, self.input_scale, self.input_zero_point,
                               self.weight_q, self.weight_scale, self.weight_zero_point)
        return y if self.bias is None else y + self.bias

