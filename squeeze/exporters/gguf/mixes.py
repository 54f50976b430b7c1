"""`--type` names -> per-tensor ggml types, following llama.cpp's mixes.

The rules are those of llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp, 2025 master) for a
dense (non-MoE, non-Falcon, non-70B) model without an importance matrix:

* 1-D tensors (norms, biases) stay F32; float mixes write every 2-D weight in their float type.
* The output matrix (or, with tied embeddings, token_embd, which llama.cpp then treats as the output)
  becomes Q6_K (Q8_0 for q8_0 and when its rows do not split into blocks of the default type).
* _S/_M/_L mixes raise attn_v / ffn_down / attn_output in some layers (`_bump`).
* Pure K types (``q3_k``, ``q4_k``, ``q5_k``: llama-quantize's ``--pure``) write every 2-D weight, output
  and token_embd included, in the one type: the export of a checkpoint calibrated on that single grid.
* Rows that do not split into blocks fall back: Q2_K/Q3_K -> Q4_0 (llama.cpp master; older releases
  chose IQ4_NL, which squeeze does not write), Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when
  even that does not fit (llama.cpp refuses legacy types there; squeeze writes F16 and says so).
"""

from __future__ import annotations

from dataclasses import dataclass

from squeeze.errors import SqueezeError
from squeeze.exporters.gguf.codecs import FORMATS


@dataclass(frozen=True)
class Mix:
    """One ``--type``: llama.cpp file type id and the ggml type most weights get."""

    name: str
    ftype: int  # enum llama_ftype (general.file_type)
    default: str  # ggml type name
    pure: bool = False  # every weight in ``default`` (llama-quantize --pure), no per-tensor bumps


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("f32", 0, "F32"),
    Mix("f16", 1, "F16"),
    Mix("bf16", 32, "BF16"),
    Mix("q8_0", 7, "Q8_0"),
    Mix("q4_0", 2, "Q4_0"),
    Mix("q4_1", 3, "Q4_1"),
    Mix("q5_0", 8, "Q5_0"),
    Mix("q5_1", 9, "Q5_1"),
    Mix("q2_k", 10, "Q2_K"),
    Mix("q3_k_s", 11, "Q3_K"),
    Mix("q3_k_m", 12, "Q3_K"),
    Mix("q3_k_l", 13, "Q3_K"),
    Mix("q4_k_s", 14, "Q4_K"),
    Mix("q4_k_m", 15, "Q4_K"),
    Mix("q5_k_s", 16, "Q5_K"),
    Mix("q5_k_m", 17, "Q5_K"),
    Mix("q6_k", 18, "Q6_K"),
    Mix("q3_k", 12, "Q3_K", pure=True),
    Mix("q4_k", 15, "Q4_K", pure=True),
    Mix("q5_k", 17, "Q5_K", pure=True),
)}

FALLBACKS: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

CATEGORIES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def get_mix(name: str | None) -> Mix:
    key = (name or "f16").strip().lower()
    if key not in MIXES:
        raise SqueezeError(f"unknown GGUF --type {name!r}; choose from {', '.join(MIXES)}")
    return MIXES[key]


def category(gguf_name: str) -> str:
    """llama.cpp's tensor category of a GGUF tensor name ("other" for the rest)."""
    base = gguf_name.rsplit(".", 1)[0].split(".")[-1]
    return base if base in CATEGORIES else "other"


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _bump(mix: str, cat: str, i: int, n: int, n_gqa: int) -> str | None:
    """The raised type of attn_v / ffn_down / attn_output in the K mixes, None to keep the default."""
    if cat == "attn_v":
        rules = {
            "q2_k": "Q4_K" if n_gqa >= 4 else "Q3_K",
            "q3_k_m": "Q5_K" if i < 2 else "Q4_K",
            "q3_k_l": "Q5_K",
            "q4_k_m": "Q6_K" if use_more_bits(i, n) else None,
            "q5_k_m": "Q6_K" if use_more_bits(i, n) else None,
            "q4_k_s": "Q5_K" if i < 4 else None,
        }
        return rules.get(mix)
    if cat == "ffn_down":
        rules = {
            "q2_k": "Q3_K",
            "q3_k_m": "Q5_K" if i < n // 16 else "Q4_K",
            "q3_k_l": "Q5_K",
            "q4_k_m": "Q6_K" if use_more_bits(i, n) else None,
            "q5_k_m": "Q6_K" if use_more_bits(i, n) else None,
            "q4_k_s": "Q5_K" if i < n // 8 else None,
        }
        return rules.get(mix)
    if cat == "attn_output":
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(mix)
    return None


def fits(qtype: str, cols: int) -> bool:
    return cols % FORMATS[qtype].block_size == 0


def fallback(qtype: str, cols: int) -> str:
    """A type whose blocks fit rows of ``cols`` (``qtype`` itself when it fits)."""
    if fits(qtype, cols):
        return qtype
    alt = FALLBACKS.get(qtype)
    return alt if alt is not None and fits(alt, cols) else "F16"


def imatrix_bump(mix: str, cat: str, i: int, n: int) -> str | None:
    """The type llama.cpp gives a tensor only when an importance matrix is given: Q4_0/Q5_0 files keep
    ffn_down of the first n_layer/8 layers in Q4_1/Q5_1 ("craziness in the first few ffn_down layers").
    squeeze applies it to calibrated checkpoints, whose calibration plays the imatrix's part."""
    if cat == "ffn_down" and i < n // 8:
        return {"q4_0": "Q4_1", "q5_0": "Q5_1"}.get(mix)
    return None


def choose_type(mix: Mix, gguf_name: str, shape: tuple[int, ...], layer: int, n_layer: int,
                n_gqa: int, tied: bool, calibrated: bool = False) -> tuple[str, str]:
    """(chosen ggml type, the type the mix asked for before any shape fallback) for one tensor;
    ``calibrated``: with llama.cpp's rules for a quantization given an imatrix (`imatrix_bump`)."""
    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "F32", "F32"
    if FORMATS[mix.default].is_float:
        return mix.default, mix.default
    cat = category(gguf_name)
    cols = shape[-1]
    wanted = mix.default
    if mix.pure:
        pass
    elif cat == "output" or (tied and cat == "token_embd"):
        if not fits(mix.default, cols):
            wanted = "Q8_0"
        elif mix.default != "Q8_0":
            wanted = "Q6_K"
    elif cat != "token_embd":
        wanted = ((calibrated and imatrix_bump(mix.name, cat, layer, n_layer))
                  or _bump(mix.name, cat, layer, n_layer, n_gqa) or mix.default)
    return fallback(wanted, cols), wanted


def layer_types(model, names: list[str], mix_name: str) -> dict[str, str | None]:
    """The GGUF type `--type mix_name` gives each Linear ``names`` of a Hugging Face ``model`` (None: float).

    This is how ``--scheme q4_k_m`` calibrates every layer on the grid the exporter will write it in.
    """
    from squeeze.exporters.gguf.arch import get_arch, gguf_name, read_hparams

    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SqueezeError(f"the GGUF mix {mix_name!r} assigns types by llama.cpp tensor names; it needs a "
                           "Hugging Face model with a config (use a single GGUF type such as q4_k instead)")
    spec, hp = get_arch(getattr(cfg, "model_type", None)), read_hparams(cfg)
    mix = get_mix(mix_name)
    out: dict[str, str | None] = {}
    for name in names:
        hf = name + ".weight"
        gname = gguf_name(spec, hf)
        if gname is None:
            raise SqueezeError(f"{name} has no llama.cpp tensor name in the {spec.gguf_arch} layout; "
                               f"the GGUF mix {mix_name!r} cannot place it (--ignore it)")
        shape = tuple(model.get_submodule(name).weight.shape)
        qtype, _ = choose_type(mix, gname, shape, layer_index(gname), hp.n_layer, hp.n_head // hp.n_head_kv,
                               hp.tie_embeddings, calibrated=True)
        out[name] = None if FORMATS[qtype].is_float else qtype
    return out


def layer_index(gguf_tensor: str) -> int:
    """The block number of ``blk.N.*`` tensors, -1 for the rest."""
    parts = gguf_tensor.split(".")
    return int(parts[1]) if parts[0] == "blk" else -1
