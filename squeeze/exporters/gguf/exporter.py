"""``squeeze export --to gguf``: stream a model or squeeze checkpoint into a GGUF file and verify it in llama.cpp.

    squeeze.export("model/", "gguf", "model-q4_k_m.gguf", qtype="q4_k_m")

Metadata and tensor infos are written first (types and byte sizes are known from shapes alone), then each
tensor is read, converted and written one at a time. The file is written beside the output under a
temporary name and renamed into place only after verification passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np

from squeeze.errors import SqueezeError
from squeeze.optional import require
from squeeze.exporters import Artifact
from squeeze.exporters.gguf.arch import ArchSpec, Hparams, add_hparams, get_arch, read_hparams
from squeeze.exporters.gguf.codecs import FORMATS
from squeeze.exporters.gguf.mixes import Mix, get_mix
from squeeze.exporters.gguf.plan import (TensorPlan, fallback_notes, matching_mixes, plan_tensors, tensor_bytes,
                                         type_counts)
from squeeze.exporters.gguf.source import ModelSource, exact_type
from squeeze.exporters.gguf.verify import VerifySettings, verify_gguf
from squeeze.exporters.gguf.vocab import Vocab, add_vocab, gguf_vocab, read_vocab
from squeeze.fsutil import atomic_output_file
from squeeze.scheme import GGUFMix

log = logging.getLogger("squeeze")
GGML_QUANTIZATION_VERSION = 2


@dataclass(frozen=True)
class GGUFExport:
    """GGUF export settings: ``qtype`` is a --type name (f16, q4_0, q4_k_m, ...; default: f16 for float
    models, the checkpoint's exact type for squeeze checkpoints)."""

    reads_gguf: ClassVar[bool] = True  # a GGUF input keeps its own vocabulary (see export_gguf)
    qtype: str | None = None
    verify: bool = True
    requantize: bool = False
    verify_settings: VerifySettings = VerifySettings()


def _require_gguf() -> None:
    require("gguf", "gguf")


def _hf_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise SqueezeError(f"cannot read {str(model_dir / 'config.json')!r}: {str(e).splitlines()[0]}") from None
    return cfg


def resolve_mix(qtype: str | None, source: ModelSource, spec: ArchSpec, hp: Hparams) -> Mix:
    """--type, or for a checkpoint without one: its GGUF mix, else the first mix storing its grid that writes
    every calibrated layer exactly (Q4_K layers under q4_k_s may be asked to be Q5_K: then q4_k_m)."""
    if qtype is not None or source.scheme is None:
        return get_mix(qtype)
    if isinstance(source.scheme, GGUFMix):
        return get_mix(source.scheme.mix)
    grid = exact_type(source.scheme)
    if grid is None:
        raise SqueezeError(f"no GGUF type stores the checkpoint's {source.scheme.name} grid exactly; pass --type "
                           "and --requantize to re-round it (or quantize with a GGUF scheme such as --scheme q4_0)")
    candidates = [get_mix(m) for m in matching_mixes(grid)]
    for mix in candidates:
        try:
            plan_tensors(source, spec, hp, mix, requantize=False)
            return mix
        except SqueezeError:
            continue
    return candidates[0]  # planning it again raises the refusal that names what to do

def write_gguf(path: Path, spec: ArchSpec, hp: Hparams, mix: Mix, vocab: Vocab, plans: list[TensorPlan],
               source: ModelSource) -> None:
    """Stream the file: header, metadata and tensor infos, then each tensor's bytes in plan order."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(None, spec.gguf_arch)
    writer.add_name(hp.name or source.dir.name)
    writer.add_quantized_by("squeeze")
    writer.add_file_type(mix.ftype)
    writer.add_quantization_version(GGML_QUANTIZATION_VERSION)
    add_hparams(writer, hp)
    add_vocab(writer, vocab)
    for p in plans:
        qtype = GGMLQuantizationType(FORMATS[p.qtype].type_id)
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plans:
            data = tensor_bytes(p, source)
            if data.nbytes != p.nbytes:  # the plan and the codec disagree: a bug, never a user error
                raise RuntimeError(f"{p.gguf_name}: {data.nbytes} bytes produced, {p.nbytes} planned")
            writer.write_tensor_data(data)
            del data
    finally:
        writer.close()


def _notes(mix: Mix, plans: list[TensorPlan], source: ModelSource) -> list[str]:
    counts = ", ".join(f"{t} x{n}" for t, n in sorted(type_counts(plans).items()))
    notes = [f"gguf --type {mix.name}: {len(plans)} tensors ({counts})"]
    notes += fallback_notes(plans)
    exact = [p for p in plans if p.exact]
    if exact:
        notes.append(f"{len(exact)} calibrated layer(s) written exactly from the checkpoint's integers "
                     f"({', '.join(sorted({p.qtype for p in exact}))}, no re-rounding)")
    requant = [p for p in plans if p.requantized]
    if requant:
        notes.append(f"warning: --requantize re-rounded {len(requant)} calibrated layer(s) of the "
                     f"{source.scheme.name} checkpoint onto {', '.join(sorted({p.qtype for p in requant}))}; "
                     "their calibration is lost")
    deq = [p for p in plans if source.quant_layer(p.hf_name) is not None and FORMATS[p.qtype].is_float]
    if deq:
        types = ", ".join(sorted({p.qtype for p in deq}))
        notes.append(f"{len(deq)} checkpoint layer(s) written dequantized as {types}")
    return notes


def export_gguf(src: Path, out: Path, config: GGUFExport, overwrite: bool = False) -> Artifact:
    """Write the model directory ``src`` (or a GGUF file, re-quantized with its own vocabulary) to ``out``."""
    from squeeze.sources import as_model_dir, is_gguf

    _require_gguf()
    with as_model_dir(src, out.parent) as model_dir:
        return _export_dir(model_dir, out, config, overwrite, gguf_vocab(src) if is_gguf(src) else None)


def _export_dir(model_dir: Path, out: Path, config: GGUFExport, overwrite: bool, vocab: Vocab | None) -> Artifact:
    cfg = _hf_config(model_dir)
    spec = get_arch(getattr(cfg, "model_type", None))
    hp = read_hparams(cfg)
    source = ModelSource(model_dir)
    mix = resolve_mix(config.qtype, source, spec, hp)
    plans = plan_tensors(source, spec, hp, mix, config.requantize)
    vocab = vocab or read_vocab(model_dir, hp.vocab_size, spec.bpe_pre)
    notes = _notes(mix, plans, source)
    for note in notes:
        if note.startswith("warning:"):
            log.warning(note)
    if config.verify:  # no llama.cpp to verify with: said after the input checks, before the file is written
        from squeeze.eval.llamacpp_backends import llama_cpp_backend

        llama_cpp_backend().load()
    verification = None
    with atomic_output_file(out, overwrite) as tmp:
        write_gguf(tmp, spec, hp, mix, vocab, plans, source)
        if config.verify:
            verification = verify_gguf(tmp, model_dir, plans, source, config.verify_settings)
    return Artifact(path=out, format="gguf", type=mix.name, size_bytes=out.stat().st_size,
                    verification=verification, notes=notes)
