"""Safetensors read tensor by tensor and written in shards, so that no step holds a whole model.

Reading uses plain file reads, not a memory map: pages of a mapped multi-GB checkpoint stay resident in the
process (and count in its RSS) after the tensor copied out of them is gone. Headers are checked before
anything is allocated (sizes and offsets inside the file).

Writing appends each tensor's bytes to the current shard as it arrives (one tensor in memory at a time);
a shard is closed once the next tensor would take it past ``max_shard_bytes``. One shard is
``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``,
the layout transformers and vLLM read. Within a shard tensors are laid out by item size, widest first, so
every tensor starts at a multiple of its item size, as safetensors' own writer does.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from squeeze.errors import SqueezeError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
SCAN_CHUNK_BYTES = 64 * 2**20  # what `SafetensorsFile.scan` reads at a time

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_size(text: str) -> int:
    """Bytes from "5GB", "500MB", "2GiB" or a plain integer."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise SqueezeError(f"cannot read the size {text!r}; write e.g. 2GB, 500MB or 4GiB")
    return int(value * units[unit])


def shard_limit(size: str | int | None) -> int:
    """``--max-shard-size`` in bytes (None: the default, 5GB)."""
    if size is None:
        return DEFAULT_MAX_SHARD_BYTES
    if isinstance(size, int):
        if size <= 0:
            raise SqueezeError(f"--max-shard-size must be positive, got {size}")
        return size
    try:
        return parse_size(size)
    except SqueezeError as e:
        raise SqueezeError(f"--max-shard-size: {e}") from None


class _NoHash:
    def update(self, data) -> None:
        pass


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise self._corrupt("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise self._corrupt(f"header length {n} does not fit the file ({size} bytes)")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._corrupt(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad entry for tensor {name!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if not (0 <= begin <= end and self.data_start + end <= size and end - begin == numel * dtype.itemsize):
                raise self._corrupt(f"tensor {name!r} lies outside the file or has the wrong size")
            self.entries[name] = (dtype, shape, begin, end)

    def _corrupt(self, why: str) -> SqueezeError:
        return SqueezeError(f"{str(self.path)!r} is not a readable safetensors file ({why}); re-download or re-create it")

    def keys(self) -> list[str]:
        return list(self.entries)

    def scan(self, h=None) -> list[str]:
        """Read the file in chunks of at most `SCAN_CHUNK_BYTES` (feeding its bytes, in order, to the hash ``h``
        when given); returns the names of the floating-point tensors holding NaN or Inf. Memory: one chunk
        and its isfinite temporaries, whatever the tensors' sizes."""
        bad = []
        h = h if h is not None else _NoHash()
        buffer = memoryview(bytearray(SCAN_CHUNK_BYTES))
        with self.path.open("rb") as fh:
            h.update(fh.read(self.data_start))
            for name, (dtype, shape, begin, end) in sorted(self.entries.items(), key=lambda e: e[1][2]):
                fh.seek(self.data_start + begin)
                step = SCAN_CHUNK_BYTES - SCAN_CHUNK_BYTES % dtype.itemsize
                finite, left = True, end - begin
                while left:
                    chunk = buffer[: min(step, left)]
                    if fh.readinto(chunk) != len(chunk):
                        raise self._corrupt(f"tensor {name!r} is truncated")
                    h.update(chunk)
                    if dtype.is_floating_point and finite:
                        finite = bool(torch.isfinite(torch.frombuffer(chunk, dtype=dtype)).all())
                    left -= len(chunk)
                if not finite:
                    bad.append(name)
            h.update(fh.read())
        return bad

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            with self.path.open("rb") as fh:
                fh.seek(self.data_start + begin)
                if fh.readinto(view) != end - begin:
                    raise self._corrupt(f"tensor {name!r} is truncated")
        return out


class ShardedReader:
    """The tensors of every .safetensors file in a model directory (one file or shards), read one at a time."""

    def __init__(self, files: list[Path]):
        self.files = [SafetensorsFile(f) for f in files]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for key in f.keys():
                self.where[key] = f

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key].entries[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].entries[key][1]

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get(key)


class ShardWriter:
    """Writes tensors into ``directory`` as they come, shard by shard (see the module docstring)."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, label: str = "shard"):
        self.directory = Path(directory)
        self.label = label
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict] = []  # per shard: its part files by item size, entries, bytes
        self.names: set[str] = set()
        self._new_shard()

    def _new_shard(self) -> None:
        index = len(self.shards)
        self.shards.append({"parts": {}, "entries": {}, "bytes": 0, "index": index})

    def _part(self, shard: dict, itemsize: int):
        if itemsize not in shard["parts"]:
            path = self.directory / f".{self.label}{shard['index']:05d}.part{itemsize}"
            shard["parts"][itemsize] = {"path": path, "fh": path.open("wb"), "bytes": 0, "names": []}
        return shard["parts"][itemsize]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in DTYPE_NAMES:
            raise SqueezeError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        nbytes = t.numel() * t.element_size()
        shard = self.shards[-1]
        if shard["bytes"] and shard["bytes"] + nbytes > self.max_shard_bytes:
            self._new_shard()
            shard = self.shards[-1]
        part = self._part(shard, t.element_size())
        if nbytes:
            part["fh"].write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        shard["entries"][name] = (DTYPE_NAMES[t.dtype], list(t.shape), part["bytes"], nbytes, t.element_size())
        part["bytes"] += nbytes
        part["names"].append(name)
        shard["bytes"] += nbytes

    def close(self) -> list[Path]:
        """Write the shard files (and the index when there are several); returns them."""
        shards = [s for s in self.shards if s["entries"]] or self.shards[:1]
        n = len(shards)
        files, weight_map, total = [], {}, 0
        for i, shard in enumerate(shards):
            name = WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._write_shard(shard, self.directory / name)
            files.append(self.directory / name)
            weight_map.update({k: name for k in shard["entries"]})
            total += shard["bytes"]
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files

    def _write_shard(self, shard: dict, path: Path) -> None:
        parts = [shard["parts"][size] for size in sorted(shard["parts"], reverse=True)]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for part in parts:
            part["fh"].close()
            for name in part["names"]:
                dtype, shape, start, nbytes, _ = shard["entries"][name]
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset + start, offset + start + nbytes]}
            offset += part["bytes"]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with path.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for part in parts:
                with part["path"].open("rb") as fh:
                    while chunk := fh.read(1 << 24):
                        out.write(chunk)
                os.unlink(part["path"])
            out.flush()
            os.fsync(out.fileno())

    def abort(self) -> None:
        for shard in self.shards:
            for part in shard["parts"].values():
                part["fh"].close()
                part["path"].unlink(missing_ok=True)


def save_tensors(path: Path, tensors) -> None:
    """One safetensors file at ``path`` from (name, tensor) pairs, written as they come."""
    writer = ShardWriter(path.parent, max_shard_bytes=1 << 62, label=path.name)
    try:
        for name, t in tensors:
            writer.add(name, t)
        writer._write_shard(writer.shards[0], path)
    except BaseException:
        writer.abort()
        raise


def model_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else every *.safetensors."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise SqueezeError(f"{str(index)!r} is not a safetensors index ({e!r})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SqueezeError(f"{str(index)!r} names shard(s) that are not there: {', '.join(missing[:3])}")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))
