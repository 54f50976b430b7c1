"""ONNX Runtime: run an exported .onnx file the way every squeeze runtime runs (token ids -> logits).

The tokenizer is the Hugging Face tokenizer found beside the file, else the one in the model
directory the file was exported from (recorded in its ``squeeze.source`` metadata), else None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.optional import require

LOGITS_BATCH = 8  # windows per onnxruntime call in `OrtRuntime.logits`
# ONNX element type -> numpy dtype for the inputs squeeze feeds.
ORT_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                   "tensor(float16)": np.float16}


def import_onnxruntime():
    return require("onnxruntime", "onnx")


def open_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU InferenceSession for ``path`` (all graph optimisations on)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime fuses INT4 DequantizeLinear -> MatMul (the dq-block graphs) into MatMulNBits; at its default
    # accuracy level it rounds activations to int8 on the fly. 0 dequantizes to float, as squeeze's own
    # MatMulNBits nodes (accuracy_level 0) do, so the graph computes the checkpoint's numbers.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise SqueezeError(f"onnxruntime cannot load {str(path)!r}: {str(e).splitlines()[0]}") from None


def artifact_size(path: Path) -> int:
    """Bytes of the .onnx file plus the external data files it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _tokenizer_for(path: Path, metadata: dict[str, str]):
    from squeeze.model import TOKENIZER_FILES, load_tokenizer

    source = metadata.get("squeeze.source")
    for directory in (path.parent, Path(source) if source else None):
        if directory is not None and directory.is_dir() and any((directory / f).exists() for f in TOKENIZER_FILES[:7]):
            return load_tokenizer(directory)
    return None


class OrtRuntime:
    """Runs an exported causal LM (or any graph, through `run`) in onnxruntime on the CPU."""

    name = "onnxruntime"

    def __init__(self, session, path: Path, tokenizer=None):
        self.session = session
        self.path = path
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.tokenizer = tokenizer
        self.kind = self.metadata.get("squeeze.kind", "causal-lm" if "logits" in self.output_names else "module")
        vocab = self.metadata.get("squeeze.vocab_size")
        self.vocab_size = int(vocab) if vocab else None
        ctx = self.metadata.get("squeeze.max_context")
        self.max_context = int(ctx) if ctx else None
        self.size_bytes = artifact_size(path)

    @classmethod
    def from_path(cls, path: Path, threads: int | None = None) -> "OrtRuntime":
        path = Path(path)
        if path.suffix.lower() != ".onnx" or not path.is_file():
            raise SqueezeError(f"{str(path)!r} is not an .onnx file")
        session = open_session(path, threads)
        runtime = cls(session, path)
        runtime.tokenizer = _tokenizer_for(path, runtime.metadata)
        return runtime

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs))

    def token_feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Feeds for a token graph: ids, mask (all ones unless given), token types 0, empty past key/values."""
        ids = input_ids.to(torch.int64).cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.to(torch.int64).cpu().numpy()
        feeds = {}
        for inp in self.session.get_inputs():
            dtype = ORT_NUMPY_TYPES.get(inp.type, np.float32)
            if inp.name == "input_ids":
                feeds[inp.name] = ids.astype(dtype)
            elif inp.name == "attention_mask":
                feeds[inp.name] = mask.astype(dtype)
            elif inp.name == "token_type_ids":
                feeds[inp.name] = np.zeros_like(ids, dtype=dtype)
            elif inp.name.startswith("past_key_values."):
                # [batch, kv_heads, past_sequence, head_dim]: no past yet
                heads, head_dim = inp.shape[1], inp.shape[3]
                feeds[inp.name] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=dtype)
            else:
                raise SqueezeError(f"{self.path.name} takes input {inp.name!r}, "
                                   "which squeeze cannot fill from token ids")
        return feeds

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if "logits" not in self.output_names:
            raise SqueezeError(f"{self.path.name} is an {self.kind} graph without logits; perplexity needs a causal LM")
        # A graph materialises [batch, heads, L, L] attention scores: run a few windows at a time.
        chunks = [self.run(self.token_feeds(part))["logits"] for part in input_ids.split(LOGITS_BATCH)]
        return torch.from_numpy(np.concatenate(chunks).astype(np.float32, copy=False))

    def decode(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding; a --kv-cache graph feeds its present key/values back, others re-run the sequence."""
        ids = prompt.to(torch.int64)
        if not any(n.startswith("past_key_values.") for n in self.input_names):
            for _ in range(new_tokens):
                ids = torch.cat([ids, self.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids
        feeds = self.token_feeds(ids)
        for _ in range(new_tokens):
            out = self.run(feeds)
            nxt = torch.from_numpy(np.asarray(out["logits"])[:, -1].argmax(-1)).reshape(-1, 1).to(torch.int64)
            ids = torch.cat([ids, nxt], dim=1)
            feeds = {"input_ids": nxt.numpy(), "attention_mask": np.ones(tuple(ids.shape), dtype=np.int64)}
            feeds.update({k.replace("present.", "past_key_values."): v
                          for k, v in out.items() if k.startswith("present.")})
        return ids
