"""Exporters: write a model to a deployment format and verify it in the real runtime.

Each format is one row of `EXPORTERS` (module and function, imported only when used, so
``import squeeze`` stays light and heavy runtimes stay optional). An exporter function takes
(source model directory, output path, its config object, overwrite) and returns an `Artifact`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from squeeze.errors import SqueezeError

# format name -> (module, function, config class name in that module)
EXPORTERS: dict[str, tuple[str, str, str]] = {
    "gguf": ("squeeze.exporters.gguf.exporter", "export_gguf", "GGUFExport"),
    "onnx": ("squeeze.exporters.onnx.exporter", "export_onnx", "ONNXExport"),
    "tensorrt": ("squeeze.exporters.tensorrt", "export_tensorrt", "TensorRTExport"),
    "tflite": ("squeeze.exporters.tflite.exporter", "export_tflite", "TFLiteExport"),
    "coreml": ("squeeze.exporters.coreml.exporter", "export_coreml", "CoreMLExport"),
}

# format name -> the endings its output file may have (checked before any work)
OUTPUT_SUFFIXES: dict[str, tuple[str, ...]] = {"gguf": (".gguf",), "onnx": (".onnx",), "tensorrt": (".plan", ".engine"),
                                                 "tflite": (".tflite",), "coreml": (".mlpackage",)}


@dataclass
class Artifact:
    """An exported file and what its verification in the real runtime measured."""

    path: Path
    format: str
    type: str
    size_bytes: int
    verification: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "type": self.type,
            "size_bytes": self.size_bytes,
            "verification": self.verification,
            "notes": self.notes,
        }


def get_exporter(name: str):
    """(export function, config class) for a format name; unknown names list the known ones."""
    if name not in EXPORTERS:
        raise SqueezeError(f"unknown export format {name!r}; known formats: {', '.join(sorted(EXPORTERS))}")
    module_name, func, config_cls = EXPORTERS[name]
    module = importlib.import_module(module_name)
    return getattr(module, func), getattr(module, config_cls)
