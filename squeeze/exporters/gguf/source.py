"""Lazy tensor access to a model directory: float HF weights or a squeeze (GPTQ-layout) checkpoint.

Shapes come from the safetensors headers; a tensor's data is read (plain reads) only when asked for, one at a time,
so the exporter never holds the whole model. A quantized layer is exposed as its integer codes and
scales (`QuantLayer`), from which `exact_blocks` builds GGUF blocks without re-rounding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.exporters.gguf.codecs import QuantizedBlocks, get_codec, get_format
from squeeze.scheme import QuantScheme

# A checkpoint grid -> the GGUF type whose blocks hold it exactly: (bits, symmetric) at group size 32.
EXACT_TYPES: dict[tuple[int, bool], str] = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0",
                                            (4, False): "Q4_1", (5, False): "Q5_1"}


@dataclass(frozen=True)
class BlockLayer:
    """A checkpoint layer stored as GGUF blocks (``raw`` uint8 [out, bytes per row] of type ``qtype``)."""

    raw: np.ndarray
    qtype: str
    scheme: QuantScheme

    def dequantize(self) -> np.ndarray:
        return get_codec(self.qtype).dequantize(self.raw)


@dataclass(frozen=True)
class QuantLayer:
    """A checkpoint layer as integers: weight[r, c] = scales[r, g_idx[c]] * (codes[r, c] - zeros[r, g_idx[c]])."""

    codes: np.ndarray  # uint8 [out, in]
    scales: np.ndarray  # float32 [out, n_groups] (fp16-representable)
    zeros: np.ndarray  # float32 [out, n_groups]
    g_idx: np.ndarray  # int32 [in]
    scheme: QuantScheme
    lut: np.ndarray | None = None  # float32 [out, 2^bits] on a lookup-table grid: weight[r, c] = lut[r, codes[r, c]]

    def dequantize(self) -> np.ndarray:
        if self.lut is not None:
            return np.take_along_axis(self.lut, self.codes.astype(np.int64), axis=1)
        s, z = self.scales[:, self.g_idx], self.zeros[:, self.g_idx]
        return (self.codes.astype(np.float32) - z) * s


def exact_type(scheme) -> str | None:
    """The GGUF type that stores ``scheme``'s grid exactly (codes and scales as they are), if any."""
    if not isinstance(scheme, QuantScheme):  # a GGUF mix: several types
        return None
    if scheme.gguf is not None:
        return scheme.gguf.upper()
    if scheme.granularity != "group" or scheme.group_size != 32:
        return None
    return EXACT_TYPES.get((scheme.bits, scheme.symmetric))


def contiguous_groups(g_idx: np.ndarray, group_size: int) -> bool:
    return bool(np.array_equal(g_idx, np.arange(len(g_idx)) // group_size))


def exact_blocks(layer: QuantLayer, qtype: str) -> QuantizedBlocks:
    """GGUF blocks holding ``layer``'s codes and scales unchanged (Q4_1/Q5_1: min = -scale*zero in fp16)."""
    fmt = get_format(qtype)
    out, cols = layer.codes.shape
    nb = cols // fmt.block_size
    d = layer.scales.astype(np.float16)
    if not np.array_equal(d.astype(np.float32), layer.scales):
        raise SqueezeError("checkpoint scales are not float16 values; they cannot be stored in GGUF blocks exactly")
    codes = layer.codes.reshape(out, nb, fmt.block_size)
    if fmt.has_min:
        m = (-layer.scales * layer.zeros).astype(np.float16)
        return QuantizedBlocks(qtype, codes, d, dmin=m)
    if not np.all(layer.zeros == fmt.zero):
        raise SqueezeError(f"checkpoint zero points are not {fmt.zero}; the grid is not {qtype}'s")
    return QuantizedBlocks(qtype, codes, d)


class ModelSource:
    """Tensors of a model directory by HF name, read lazily from its safetensors files."""

    def __init__(self, model_dir: Path):
        from squeeze.checkpoint.shards import ShardedReader, model_weight_files

        self.dir = model_dir
        files = sorted(f for f in model_weight_files(model_dir) if f.suffix == ".safetensors")
        if not files:
            raise SqueezeError(f"{str(model_dir)!r} has no .safetensors weights; GGUF export reads safetensors "
                               "(re-save the model with save_pretrained(safe_serialization=True))")
        # plain reads, not a memory map: a mapped checkpoint's pages stay resident after each tensor is converted
        self.reader = ShardedReader(files)
        self._where = [k for f in self.reader.files for k in sorted(f.keys())]  # file by file, by name
        config = json.loads((model_dir / "config.json").read_text())
        self.quantization_config = config.get("quantization_config")
        self.scheme: QuantScheme | None = None
        self.layer_schemes: dict[str, QuantScheme] = {}
        if self.quantization_config is not None:
            from squeeze.checkpoint import gptq as ckpt

            self.scheme = ckpt.scheme_from_quantization_config(self.quantization_config)
            self.layer_schemes = ckpt.read_layer_schemes(model_dir)
        self.quantized = {k[: -len(".qweight")] for k in self._where if k.endswith(".qweight")}
        self.block_layers = {k[: -len(".gguf_blocks")] for k in self._where if k.endswith(".gguf_blocks")}

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.reader.shape(key))

    def weights(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, [rows, cols] or [n]) of every weight, quantized layers under ``<layer>.weight``."""
        out = []
        for key in self._where:
            prefix = key.rsplit(".", 1)[0]
            if prefix in self.block_layers:
                if key.endswith(".gguf_blocks"):
                    fmt = get_format(self._block_scheme(prefix).gguf.upper())
                    rows, nbytes = self._shape(key)
                    out.append((prefix + ".weight", (rows, nbytes // fmt.type_size * fmt.block_size)))
                elif key.endswith(".bias"):
                    out.append((key, self._shape(key)))
                continue
            if prefix in self.quantized:
                if key.endswith(".qweight"):
                    rows, cols = self._shape(prefix + ".qweight")[1], self._shape(prefix + ".g_idx")[0]
                    out.append((prefix + ".weight", (rows, cols)))
                elif key.endswith(".bias"):
                    out.append((key, self._shape(key)))
                continue
            out.append((key, self._shape(key)))
        return out

    def _get(self, key: str) -> torch.Tensor:
        return self.reader.get(key)

    def _block_scheme(self, prefix: str) -> QuantScheme:
        scheme = self.layer_schemes.get(prefix, self.scheme)
        if not isinstance(scheme, QuantScheme) or not scheme.gguf_blocks:
            raise SqueezeError(f"checkpoint layer {prefix!r} is stored as GGUF blocks but squeeze.json gives it no "
                               "GGUF block type")
        return scheme

    def quant_layer(self, hf_name: str) -> QuantLayer | BlockLayer | None:
        """The integers of a quantized layer (by its ``.weight`` name); None for a float tensor."""
        prefix = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
        if prefix in self.block_layers:
            scheme = self._block_scheme(prefix)
            return BlockLayer(self._get(prefix + ".gguf_blocks").numpy(), scheme.gguf.upper(), scheme)
        if prefix not in self.quantized:
            return None
        from squeeze.primitives import unpack_rows

        scheme = self.layer_schemes.get(prefix, self.scheme)
        bits = scheme.bits
        g_idx = self._get(prefix + ".g_idx").to(torch.int32)
        if prefix + ".lut" in self._where:  # a lookup-table layer: no GGUF type holds it; --requantize re-rounds
            return self._lut_layer(prefix, scheme, g_idx)
        scales = self._get(prefix + ".scales").float().t().contiguous()
        codes = unpack_rows(self._get(prefix + ".qweight"), bits, g_idx.numel()).t().contiguous()
        stored = unpack_rows(self._get(prefix + ".qzeros").t(), bits, scales.shape[0]).to(torch.int64)
        zeros = ((stored + 1) & ((1 << bits) - 1)).float()
        return QuantLayer(codes.to(torch.uint8).numpy(), scales.numpy(), zeros.numpy(), g_idx.numpy(), scheme)

    def _lut_layer(self, prefix: str, scheme: QuantScheme, g_idx: torch.Tensor) -> QuantLayer:
        from squeeze.palette import row_tables
        from squeeze.primitives import unpack_rows

        qweight = self._get(prefix + ".qweight")
        codes = unpack_rows(qweight, scheme.bits, g_idx.numel()).t().contiguous()
        tables = row_tables(self._get(prefix + ".lut").float(), scheme.lut_channels, qweight.shape[1])
        ones = np.ones((qweight.shape[1], 1), dtype=np.float32)
        return QuantLayer(codes.to(torch.uint8).numpy(), ones, np.zeros_like(ones), g_idx.numpy(), scheme,
                          tables.numpy())

    def float_tensor(self, hf_name: str) -> np.ndarray:
        """float32 values of a tensor; a quantized layer is dequantized."""
        layer = self.quant_layer(hf_name)
        if layer is not None:
            return layer.dequantize()
        return self._get(hf_name).float().numpy()
