"""TensorRT: run a serialized engine (.plan / .engine) built by `squeeze export --to tensorrt`.

Buffers are CUDA torch tensors (a CUDA build of torch is needed). The vocabulary is the logits'
static last axis; the context limit is the optimisation profile's largest sequence. Without an
NVIDIA GPU or tensorrt the runtime says so in one line (exit code 2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from squeeze.errors import SqueezeError

# TensorRT DataType name -> torch dtype
TRT_TORCH_TYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
                   "INT8": torch.int8, "BOOL": torch.bool}


class TensorRTRuntime:
    """Runs a causal-LM engine: token ids -> float32 logits, on the first CUDA device."""

    name = "tensorrt"

    def __init__(self, engine, path: Path, tokenizer=None):
        self.engine = engine
        self.context = engine.create_execution_context()
        self.path = path
        self.tokenizer = tokenizer
        self.size_bytes = path.stat().st_size
        self.inputs = [n for n in self._names() if self._is_input(n)]
        self.outputs = [n for n in self._names() if not self._is_input(n)]
        if "logits" not in self.outputs:
            raise SqueezeError(f"{path.name} has no logits output; squeeze evaluates causal-LM engines")
        self.vocab_size = int(engine.get_tensor_shape("logits")[-1])
        self.max_context = int(engine.get_tensor_profile_shape("input_ids", 0)[2][1])
        self.max_batch = int(engine.get_tensor_profile_shape("input_ids", 0)[2][0])

    def _names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _is_input(self, name: str) -> bool:
        import tensorrt as trt

        return self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT

    @classmethod
    def from_path(cls, path: Path) -> "TensorRTRuntime":
        from squeeze.exporters.tensorrt import require_tensorrt
        from squeeze.model import load_tokenizer

        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise SqueezeError("the TensorRT runtime needs a CUDA build of torch for its buffers; "
                               "install one (pip install torch --index-url https://download.pytorch.org/whl/cu124)")
        path = Path(path)
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise SqueezeError(f"TensorRT cannot load {str(path)!r} (built by another TensorRT version or GPU?)")
        return cls(engine, path, load_tokenizer(path.parent))

    def _feeds(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = input_ids.cuda()
        feeds = {}
        for name in self.inputs:
            dtype = TRT_TORCH_TYPES[self.engine.get_tensor_dtype(name).name]
            if name == "input_ids":
                feeds[name] = ids.to(dtype)
            elif name == "attention_mask":
                feeds[name] = torch.ones_like(ids, dtype=dtype)
            elif name.startswith("past_key_values."):
                shape = list(self.engine.get_tensor_shape(name))
                feeds[name] = torch.zeros(ids.shape[0], shape[1], 0, shape[3], dtype=dtype, device="cuda")
            else:
                raise SqueezeError(f"{self.path.name} takes input {name!r}, which squeeze cannot fill from token ids")
        return feeds

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = self._feeds(input_ids)
        for name, tensor in feeds.items():
            tensor = feeds[name] = tensor.contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            dtype = TRT_TORCH_TYPES[self.engine.get_tensor_dtype(name).name]
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SqueezeError(f"TensorRT failed to run {self.path.name}")
        stream.synchronize()
        return outputs

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        parts = [self.run(part)["logits"].float().cpu() for part in input_ids.split(self.max_batch)]
        return torch.cat(parts)
