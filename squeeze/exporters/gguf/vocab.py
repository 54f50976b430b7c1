"""The tokenizer embedded in a GGUF file: SentencePiece (tokenizer.model) or BPE (tokenizer.json).

Follows llama.cpp's convert_hf_to_gguf.py (``_set_vocab_sentencepiece`` / ``_set_vocab_gpt2``): every id
up to the model's vocab_size gets a token, a score and a type; special ids and add_bos/add_eos come
from tokenizer_config.json / config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from squeeze.errors import SqueezeError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of added tokens (tokenizer_config.json's added_tokens_decoder)."""
    decoder = _json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
    out = {int(i): (t["content"], bool(t.get("special", False))) for i, t in decoder.items()}
    for t in _json(model_dir / "tokenizer.json").get("added_tokens", []):
        out.setdefault(int(t["id"]), (t["content"], bool(t.get("special", False))))
    return out


def _specials(model_dir: Path, token_to_id: dict[str, int]) -> tuple[dict[str, int], bool | None, bool | None]:
    tok_cfg = _json(model_dir / "tokenizer_config.json")
    cfg = _json(model_dir / "config.json")
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_cfg.get(f"{kind}_token"))
        if content is not None and content in token_to_id:
            special[kind] = token_to_id[content]
        elif isinstance(cfg.get(f"{kind}_token_id"), int):
            special[kind] = cfg[f"{kind}_token_id"]
    return special, tok_cfg.get("add_bos_token"), tok_cfg.get("add_eos_token")


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = sp.vocab_size()
    if n > vocab_size:
        raise SqueezeError(f"tokenizer.model has {n} pieces but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-1000.0] * vocab_size, [UNUSED] * vocab_size
    for i in range(n):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), float(sp.GetScore(i))
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else
                    UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    for i, (content, special) in _added_tokens(model_dir).items():
        if i < vocab_size and (i >= n or types[i] == NORMAL):
            tokens[i], scores[i] = content.encode("utf-8"), -1000.0
            types[i] = CONTROL if special else USER_DEFINED
    token_to_id = {t.decode("utf-8", "replace"): i for i, t in enumerate(tokens)}
    special, add_bos, add_eos = _specials(model_dir, token_to_id)
    for kind, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if token_id >= 0:
            special.setdefault(kind, token_id)
    return Vocab("llama", "default", tokens, types, scores=scores, special=special,
                 add_bos=True if add_bos is None else add_bos, add_eos=add_eos)


def bpe_vocab(model_dir: Path, vocab_size: int, pre: str) -> Vocab:
    tj = _json(model_dir / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise SqueezeError("tokenizer.json is not a byte-level BPE tokenizer; GGUF export embeds SentencePiece "
                           "vocabularies from tokenizer.model — add the model's tokenizer.model")
    vocab: dict[str, int] = dict(model["vocab"])
    added = _added_tokens(model_dir)
    for i, (content, _) in added.items():
        vocab.setdefault(content, i)
    if max(vocab.values()) >= vocab_size:
        raise SqueezeError(f"tokenizer.json has token ids up to {max(vocab.values())} but vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text.encode("utf-8"), NORMAL
    for i, (content, special) in added.items():
        types[i] = CONTROL if special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special, add_bos, add_eos = _specials(model_dir, vocab)
    return Vocab("gpt2", pre, tokens, types, merges=merges, special=special,
                 add_bos=bool(add_bos), add_eos=add_eos)


def read_vocab(model_dir: Path, vocab_size: int, bpe_pre: str) -> Vocab:
    """The model directory's tokenizer, preferring tokenizer.model (SentencePiece)."""
    if (model_dir / "tokenizer.model").is_file():
        return sentencepiece_vocab(model_dir, vocab_size)
    if (model_dir / "tokenizer.json").is_file():
        return bpe_vocab(model_dir, vocab_size, bpe_pre)
    raise SqueezeError(f"{str(model_dir)!r} has no tokenizer.model or tokenizer.json; GGUF files embed the "
                       "tokenizer, so copy the model's tokenizer files into the directory")


# Vocab.special key -> the GGUF field that holds its id
SPECIAL_FIELDS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def gguf_vocab(path: Path) -> Vocab:
    """The tokenizer a GGUF file embeds, copied as it is (a GGUF input re-exported keeps its vocabulary)."""
    from squeeze.sources import read_gguf_fields

    fields = read_gguf_fields(path)

    def get(key: str, default=None):
        field = fields.get(f"tokenizer.ggml.{key}")
        return field.contents() if field is not None else default

    tokens = get("tokens")
    if not tokens:
        raise SqueezeError(f"{str(path)!r} embeds no tokenizer (no tokenizer.ggml.tokens)")
    special = {kind: int(get(key)) for kind, key in SPECIAL_FIELDS.items() if get(key) is not None}
    return Vocab(get("model", "llama"), get("pre", "default"), [t.encode("utf-8") for t in tokens],
                 [int(t) for t in get("token_type", [NORMAL] * len(tokens))], scores=get("scores"),
                 merges=get("merges"), special=special, add_bos=get("add_bos_token"), add_eos=get("add_eos_token"))


def add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, token_id in vocab.special.items():
        adders[kind](token_id)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(bool(vocab.add_bos))
    if vocab.add_eos is not None:
        writer.add_add_eos_token(bool(vocab.add_eos))
