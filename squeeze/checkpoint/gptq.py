"""Quantized checkpoints in the GPTQ on-disk layout (as AutoGPTQ/GPTQModel write it).

Per quantized layer ``L``:
  L.qweight  int32 [ceil(in*bits/32), out]   codes packed down the input dim
  L.qzeros   int32 [n_groups, ceil(out*bits/32)]  zero points minus one ("gptq" v1
             checkpoint format), packed along the output dim
  L.scales   float16 [n_groups, out]
  L.g_idx    int32 [in]   group of each input column
  L.bias     the original bias, in the model dtype
  L.input_scale  float32 scalar, only for static int8 activations
  L.input_zero_point  uint8 scalar beside it, only for asymmetric (uint8) static activations
config.json gets ``quantization_config`` (quant_method "gptq", bits, group_size,
sym, desc_act); squeeze's own metadata goes in ``squeeze.json`` beside it.

Layers on a GGUF grid with block mins or quantized sub-block scales (schemes q4_1, q5_1, q2_k ... q6_k,
or a mix such as q4_k_m) have no GPTQ form; they are stored as the GGUF bytes themselves:
  L.gguf_blocks  uint8 [out, bytes per row]   llama.cpp's block layout, type from squeeze.json
(plus L.bias / L.input_scale / L.input_zero_point as above), and quantization_config says quant_method
"squeeze_gguf": such a checkpoint is read by squeeze (load, eval, export --to gguf), not by GPTQ loaders.

Layers on a lookup-table grid (lut4g16, `squeeze.palette`) keep qweight and g_idx as above (a code is an
index into its rows' table) and their tables instead of scales and zeros:
  L.lut  float16 [ceil(out / channels), 2^bits]   one ascending table per group of output rows
with quant_method "squeeze_lut" (read by squeeze; exported to Core ML as constexpr_lut_to_dense).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from squeeze.checkpoint.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, ShardedReader, model_weight_files
from squeeze.errors import SqueezeError
from squeeze.model import TOKENIZER_FILES, is_linear, linear_weight, set_submodule
from squeeze.modules import QuantLinear
from squeeze.palette import LUT_DTYPE, group_tables, row_tables
from squeeze.primitives import pack_rows, unpack_rows
from squeeze.scheme import QuantScheme, get_scheme

METADATA_NAME = "squeeze.json"


def _layer_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    bits = layer.scheme.bits
    if layer.gguf_blocks is not None:
        out = {"gguf_blocks": layer.gguf_blocks}
    elif layer.lut is not None:
        out = {
            "qweight": pack_rows(layer.codes.t(), bits),
            "lut": group_tables(layer.lut, layer.scheme.lut_channels).to(LUT_DTYPE),
            "g_idx": layer.g_idx.to(torch.int32),
        }
    else:
        stored_zeros = (layer.zeros.to(torch.int64) - 1) & ((1 << bits) - 1)
        out = {
            "qweight": pack_rows(layer.codes.t(), bits),
            "qzeros": pack_rows(stored_zeros, bits).t(),
            "scales": layer.scales.t().to(torch.float16),
            "g_idx": layer.g_idx.to(torch.int32),
        }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    if layer.input_scale is not None:
        out["input_scale"] = layer.input_scale.detach().float().reshape(())
    if layer.input_zero_point is not None:
        out["input_zero_point"] = layer.input_zero_point.detach().to(torch.uint8).reshape(())
    return out


GGUF_QUANT_METHOD = "squeeze_gguf"
LUT_QUANT_METHOD = "squeeze_lut"


def quantization_config(scheme, desc_act: bool = False, gguf_blocks: bool = False) -> dict:
    if gguf_blocks:  # the scheme is a GGUF type or mix; per-layer types are in squeeze.json
        return {"quant_method": GGUF_QUANT_METHOD, "scheme": scheme.name}
    if getattr(scheme, "lut_channels", None) is not None:
        return {"quant_method": LUT_QUANT_METHOD, "scheme": scheme.name}
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size if scheme.granularity == "group" else -1,
        "sym": scheme.symmetric,
        "desc_act": desc_act,
    }


def checkpoint_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor to save, in the model's own order: each quantized layer's packed tensors where its
    buffers are, the remaining float state as it is (tied copies once). ``prefix`` goes before every name
    (a block's tensors under their names in the whole model)."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    packed_layers: set[str] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in quant:
            if owner not in packed_layers:
                packed_layers.add(owner)
                for local, packed in _layer_tensors(quant[owner]).items():
                    state[f"{prefix}{owner}.{local}"] = packed
            continue
        identity = t.data_ptr() if t.device.type != "meta" else id(t)
        if identity in seen:  # a tied weight (lm_head sharing the embedding): stored once
            continue
        seen.add(identity)
        state[prefix + key] = t
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def checkpoint_config(model: nn.Module | None, source_dir: Path | None, scheme, layer_schemes: dict,
                      desc_act: bool) -> dict:
    """config.json of the checkpoint: the source's (or the model's) with its quantization_config."""
    if source_dir is not None and (source_dir / "config.json").is_file():
        config = json.loads((source_dir / "config.json").read_text())
    elif model is not None and getattr(model, "config", None) is not None:
        config = model.config.to_dict()
    else:
        config = {}
    if scheme is None:  # a float model (pruned): the source's config as it is
        config.pop("quantization_config", None)
        return config
    schemes = set(s.with_(activations=None) for s in layer_schemes.values())
    gguf_form = any(s.gguf_blocks for s in schemes) or len(schemes) > 1
    config["quantization_config"] = quantization_config(scheme, desc_act, gguf_form)
    return config


def write_checkpoint(
    out: Path,
    tensors,
    config: dict,
    metadata: dict,
    source_dir: Path | None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the checkpoint files into the (empty, temporary) directory ``out``; ``tensors`` yields
    (name, tensor) in file order and is consumed one tensor at a time."""
    writer = ShardWriter(out, max_shard_bytes)
    try:
        for name, t in tensors:
            writer.add(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, out / name)


def read_metadata(path: Path) -> dict | None:
    """squeeze.json of a checkpoint directory (None if it has none); a corrupt one is an error naming it."""
    f = path / METADATA_NAME
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SqueezeError(f"{str(f)!r} is not valid JSON ({e}); re-create the checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers", {}), dict):
        raise SqueezeError(f"{str(f)!r} is not a squeeze checkpoint record (expected an object with 'layers')")
    return meta


def read_layer_schemes(path: Path) -> dict[str, QuantScheme]:
    """Each quantized layer's grid as squeeze.json records it (empty for checkpoints of other tools)."""
    meta = read_metadata(path) or {}
    try:
        return {name: QuantScheme.from_dict(rec["scheme_dict"])
                for name, rec in meta.get("layers", {}).items() if "scheme_dict" in rec}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SqueezeError(f"{str(path / METADATA_NAME)!r} records a layer grid squeeze cannot read ({e!r})") from None


def scheme_from_quantization_config(qc: dict):
    if qc.get("quant_method") in (GGUF_QUANT_METHOD, LUT_QUANT_METHOD):
        return get_scheme(str(qc.get("scheme")))
    if qc.get("quant_method") != "gptq":
        raise SqueezeError(f"unsupported quant_method {qc.get('quant_method')!r}; squeeze reads 'gptq', "
                           f"'{GGUF_QUANT_METHOD}' and '{LUT_QUANT_METHOD}' checkpoints")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise SqueezeError(f"unsupported GPTQ checkpoint_format {qc['checkpoint_format']!r}; squeeze reads 'gptq' (v1)")
    gs = int(qc.get("group_size", -1))
    if gs > 0:
        return QuantScheme(int(qc["bits"]), bool(qc.get("sym", True)), "group", gs)
    return QuantScheme(int(qc["bits"]), bool(qc.get("sym", True)), "channel", None)


def gguf_block_layer(raw: torch.Tensor, scheme: QuantScheme):
    """codes [out, in], LayerQParams of a layer stored as GGUF blocks (``scheme.gguf`` names the type)."""
    from squeeze.exporters.gguf.codecs import get_format, group_params, unpack
    from squeeze.grid import LayerQParams

    if not scheme.gguf_blocks:
        raise SqueezeError(f"a layer stored as GGUF blocks needs a GGUF block scheme, not {scheme.name!r}")
    qtype = scheme.gguf.upper()
    fmt = get_format(qtype)
    try:
        qb = unpack(raw.numpy(), qtype)
    except ValueError as e:
        raise SqueezeError(f"corrupt {qtype} blocks in the checkpoint: {e}") from None
    rows = raw.shape[0]
    codes = torch.from_numpy(qb.codes.reshape(rows, -1).astype("uint8"))
    step, bias = group_params(qb)
    scales = torch.from_numpy(step.reshape(rows, -1).copy())
    offsets = None if bias is None else torch.from_numpy(bias.reshape(rows, -1).copy())
    g_idx = (torch.arange(codes.shape[1]) // fmt.group_size).to(torch.int32)
    return codes, LayerQParams(scales, torch.full_like(scales, float(fmt.zero)), g_idx, offsets, raw)


def _quant_layer_from_state(state: dict, prefix: str, scheme: QuantScheme, in_f: int, out_f: int, dtype) -> QuantLinear:
    if prefix + "gguf_blocks" in state:
        codes, qp = gguf_block_layer(state[prefix + "gguf_blocks"], scheme)
        layer = QuantLinear.from_codes(codes, qp.scales, qp.zeros, qp.g_idx, scheme, state.get(prefix + "bias"), dtype,
                                       offsets=qp.offsets, gguf_blocks=qp.blocks)
        if prefix + "input_scale" in state:
            layer.input_scale = state[prefix + "input_scale"].float()
        if prefix + "input_zero_point" in state:
            layer.input_zero_point = state[prefix + "input_zero_point"].to(torch.uint8)
        return layer
    bits = scheme.bits
    codes = unpack_rows(state[prefix + "qweight"], bits, in_f).t().contiguous()
    if prefix + "lut" in state:
        return _lut_layer(state, prefix, scheme, codes, dtype)
    stored = unpack_rows(state[prefix + "qzeros"].t(), bits, out_f).to(torch.int64)
    zeros = ((stored + 1) & ((1 << bits) - 1)).float()
    scales = state[prefix + "scales"].float().t().contiguous()
    layer = QuantLinear.from_codes(
        codes, scales, zeros, state[prefix + "g_idx"].to(torch.int32), scheme, state.get(prefix + "bias"), dtype
    )
    if prefix + "input_scale" in state:
        layer.input_scale = state[prefix + "input_scale"].float()
    if prefix + "input_zero_point" in state:
        layer.input_zero_point = state[prefix + "input_zero_point"].to(torch.uint8)
    return layer


def _lut_layer(state: dict, prefix: str, scheme: QuantScheme, codes: torch.Tensor, dtype) -> QuantLinear:
    """A lookup-table layer from its packed codes and per-group tables."""
    tables = state[prefix + "lut"].float()
    rows = codes.shape[0]
    if scheme.lut_channels is None or tuple(tables.shape) != (-(-rows // scheme.lut_channels), 1 << scheme.bits):
        raise SqueezeError(f"checkpoint layer {prefix[:-1]!r} holds lookup tables of shape {tuple(tables.shape)}, "
                           f"which its grid {scheme.name!r} does not have; re-create the checkpoint")
    ones = torch.ones(rows, 1)
    return QuantLinear.from_codes(codes, ones, torch.zeros_like(ones), state[prefix + "g_idx"].to(torch.int32), scheme,
                                  state.get(prefix + "bias"), dtype,
                                  lut=row_tables(tables, scheme.lut_channels, rows))


def load_into(model: nn.Module, path: Path, scheme: QuantScheme, layer_schemes: dict[str, QuantScheme]) -> nn.Module:
    """Replace ``model``'s quantized layers with QuantLinears and load all weights from ``path``."""
    try:
        return _load_into(model, path, scheme, layer_schemes)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:  # tensors missing, misnamed or misshapen
        raise SqueezeError(f"checkpoint {str(path)!r} is inconsistent ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); re-create it") from None


def install_checkpoint_tensors(model: nn.Module, state: dict[str, torch.Tensor], scheme,
                               layer_schemes: dict[str, QuantScheme]) -> list[str]:
    """Put checkpoint tensors (full names) into ``model``: QuantLinears built from each quantized layer's packed
    tensors, every other tensor set in place (a meta tensor is replaced). Returns the quantized layers' prefixes."""
    prefixes = sorted(k[: -len(suffix)] for k in state for suffix in ("qweight", "gguf_blocks")
                      if k.endswith("." + suffix))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for prefix in prefixes:
        name = prefix[:-1]
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SqueezeError(f"checkpoint layer {name!r} does not exist in the model built from config.json") from None
        layer_scheme = layer_schemes.get(name, scheme)
        if not isinstance(layer_scheme, QuantScheme):
            raise SqueezeError(f"squeeze.json has no grid for checkpoint layer {name!r}")
        in_f, out_f = (0, 0) if prefix + "gguf_blocks" in state else (
            int(state[prefix + "g_idx"].numel()), int(state[prefix + "qweight"].shape[1]))
        layer = _quant_layer_from_state(state, prefix, layer_scheme, in_f, out_f, dtype)
        want = tuple(linear_weight(old).shape) if is_linear(old) else None  # [out, in], Conv1D included
        if want is not None and want != (layer.out_features, layer.in_features):
            raise SqueezeError(f"checkpoint layer {name!r} is {layer.out_features}x{layer.in_features}, the model "
                               f"built from config.json has {want[0]}x{want[1]}")
        set_submodule(model, name, layer)
        del old
    return prefixes


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Set the parameter or buffer ``key`` of ``model`` to ``value`` (cast to its dtype; a meta one is replaced)."""
    owner_name, _, local = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if local in owner._parameters:
        old = owner._parameters[local]
        owner._parameters[local] = nn.Parameter(value.to(old.dtype), requires_grad=False)
    elif local in owner._buffers:
        old = owner._buffers[local]
        owner._buffers[local] = value.to(old.dtype) if old is not None else value
    else:
        raise KeyError(key)


def _load_into(model: nn.Module, path: Path, scheme: QuantScheme, layer_schemes: dict[str, QuantScheme]) -> nn.Module:
    files = model_weight_files(path)
    if not files:
        raise SqueezeError(f"{str(path)!r} has no .safetensors weights")
    reader = ShardedReader(files)
    state = {key: reader.get(key) for key in reader.keys()}
    prefixes = install_checkpoint_tensors(model, state, scheme, layer_schemes)
    rest = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    quant_keys = {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}
    missing = [k for k in missing if k not in quant_keys]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        tied = {k for k in missing if getattr(model.config, "tie_word_embeddings", False) and k.startswith("lm_head")}
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SqueezeError(
            f"checkpoint {str(path)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
