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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model import TOKENIZER_FILES, is_linear, linear_weight, set_submodule
from squeeze.modules import QuantLinear
from squeeze.primitives import pack_rows, unpack_rows
from squeeze.scheme import QuantScheme, get_scheme

WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "squeeze.json"


def _layer_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    bits = layer.scheme.bits
    if layer.gguf_blocks is not None:
        out = {"gguf_blocks": layer.gguf_blocks}
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


def quantization_config(scheme, desc_act: bool = False, gguf_blocks: bool = False) -> dict:
    if gguf_blocks:  # the scheme is a GGUF type or mix; per-layer types are in squeeze.json
        return {"quant_method": GGUF_QUANT_METHOD, "scheme": scheme.name}
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size if scheme.granularity == "group" else -1,
        "sym": scheme.symmetric,
        "desc_act": desc_act,
    }


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to save: packed quantized layers plus the remaining float state (tied copies once)."""
    state: dict[str, torch.Tensor] = {}
    quant_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quant_prefixes.append(name + ".")
            for key, t in _layer_tensors(module).items():
                state[f"{name}.{key}"] = t
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in quant_prefixes):
            continue
        if t.data_ptr() in seen:  # a tied weight (lm_head sharing the embedding): stored once
            continue
        seen.add(t.data_ptr())
        state[key] = t
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint(
    model: nn.Module,
    out: Path,
    scheme,
    metadata: dict,
    source_dir: Path | None,
    desc_act: bool = False,
) -> None:
    """Write the checkpoint files into the (empty, temporary) directory ``out``."""
    save_file(checkpoint_state(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if source_dir is not None and (source_dir / "config.json").is_file():
        config = json.loads((source_dir / "config.json").read_text())
    elif getattr(model, "config", None) is not None:
        config = model.config.to_dict()
    else:
        config = {}
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    gguf_form = (any(m.gguf_blocks is not None for m in layers)
                 or len({m.scheme.with_(activations=None) for m in layers}) > 1)
    config["quantization_config"] = quantization_config(scheme, desc_act, gguf_form)
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
    if qc.get("quant_method") == GGUF_QUANT_METHOD:
        return get_scheme(str(qc.get("scheme")))
    if qc.get("quant_method") != "gptq":
        raise SqueezeError(f"unsupported quant_method {qc.get('quant_method')!r}; squeeze reads 'gptq' and "
                           f"'{GGUF_QUANT_METHOD}' checkpoints")
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


def load_into(model: nn.Module, path: Path, scheme: QuantScheme, layer_schemes: dict[str, QuantScheme]) -> nn.Module:
    """Replace ``model``'s quantized layers with QuantLinears and load all weights from ``path``."""
    try:
        return _load_into(model, path, scheme, layer_schemes)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:  # tensors missing, misnamed or misshapen
        raise SqueezeError(f"checkpoint {str(path)!r} is inconsistent ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); re-create it") from None


def _load_into(model: nn.Module, path: Path, scheme: QuantScheme, layer_schemes: dict[str, QuantScheme]) -> nn.Module:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SqueezeError(f"{str(path)!r} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    prefixes = sorted(k[: -len(suffix)] for k in state for suffix in ("qweight", "gguf_blocks")
                      if k.endswith("." + suffix))
    dtype = next(model.parameters()).dtype
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
            int(state[prefix + "g_idx"].numel()), int(state[prefix + "scales"].shape[1]))
        layer = _quant_layer_from_state(state, prefix, layer_scheme, in_f, out_f, dtype)
        want = tuple(linear_weight(old).shape) if is_linear(old) else None  # [out, in], Conv1D included
        if want is not None and want != (layer.out_features, layer.in_features):
            raise SqueezeError(f"checkpoint layer {name!r} is {layer.out_features}x{layer.in_features}, the model "
                               f"built from config.json has {want[0]}x{want[1]}")
        set_submodule(model, name, layer)
        del old
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
