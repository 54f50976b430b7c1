"""What a result was measured on: CPU model and cores, GPU, threads, runtime versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

RUNTIME_PACKAGES = ("torch", "transformers", "onnxruntime", "llama-cpp-python", "tensorrt", "ai-edge-litert", "coremltools")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_versions(names=RUNTIME_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe_device() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def device_line(d: dict) -> str:
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ", no GPU"
    return f"{d['cpu']} ({d['cores']} cores, {d['torch_threads']} torch threads){gpu}; {d['os']}, Python {d['python']}"
