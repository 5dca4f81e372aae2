"""Streaming HF safetensors I/O and HF-folder file sorting.

- :class:`HFWeights` indexes a single ``model.safetensors`` or a sharded set (``model.safetensors.index.json``) from
  the file headers alone and reads one tensor at a time with plain positioned reads (no mmap: memory-mapped pages
  would count towards the process's resident memory and make it look as if the whole model were loaded).
- :class:`ShardedSafetensorsWriter` writes sharded safetensors incrementally: the full list of (name, shape, dtype) is
  known up front, so each shard's header is written first and tensors are appended one at a time as they arrive.
  Memory stays at one tensor, not one shard. Files are ``model-0000k-of-0000n.safetensors`` plus the index, as
  ``save_pretrained`` writes them.
- :func:`sort_hf_files` splits the non-weight files of an HF folder into tokenizer files and other small files
  (config.json, generation_config.json, README, ...) that are carried through a conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_s2d.errors import S2DError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")
MAX_EXTRA_FILE_BYTES = 50 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset of the data buffer) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise S2DError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise S2DError(f"{path}: not a safetensors file (header length {n} is implausible)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise S2DError(f"{path}: cannot read the safetensors header ({e})") from e
    return header, 8 + n


class HFWeights:
    """Index of the tensors of an HF model folder; reads tensors one at a time."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise S2DError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {', '.join(found)}: convert .bin weights to safetensors first)" if found else ""
            raise S2DError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.files = [self.dir / f for f in files]
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            if not path.is_file():
                raise S2DError(f"{index}: lists shard '{path.name}', which does not exist")
            self._add_file(path, weight_map)
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise S2DError(f"{index}: lists tensors not found in their shard files: {', '.join(absent[:10])}")

    def _add_file(self, path: Path, weight_map: dict | None) -> None:
        header, base = read_safetensors_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if weight_map is not None and weight_map.get(name) != path.name:
                continue  # the index is authoritative about where a tensor lives
            if meta.get("dtype") not in _ST_DTYPES:
                raise S2DError(f"{path}: tensor '{name}' has unsupported dtype {meta.get('dtype')!r}")
            b, e = meta["data_offsets"]
            self.tensors[name] = TensorInfo(name, path, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                            base + b, base + e)

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (positioned read, no mmap)."""
        info = self.tensors.get(name)
        if info is None:
            raise S2DError(f"{self.dir}: no tensor '{name}'")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise S2DError(f"{info.file}: truncated data for tensor '{name}' ({got} of {info.nbytes} bytes)")
        return buf.view(info.dtype).reshape(info.shape)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise S2DError(f"--shard-size: cannot parse {text!r} (use e.g. 5GB, 500MB, 2GiB)") from None


class ShardedSafetensorsWriter:
    """Writes a planned list of tensors into size-bounded safetensors shards, one tensor at a time, in plan order."""

    def __init__(self, out_dir: str | Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.dir = Path(out_dir)
        self.meta = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            n = _nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += n
        total = len(shards)
        self.files = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
        self.order = [(k, name, shape, dtype) for k, shard in enumerate(shards) for name, shape, dtype in shard]
        self.shards = shards
        self.total_size = sum(_nbytes(s, d) for _, _, s, d in self.order)
        self._next = 0
        self._file = None
        self._open_shard = -1

    def _start_shard(self, k: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {"__metadata__": self.meta}, 0
        for name, shape, dtype in self.shards[k]:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data buffer to 8 bytes
        self._file = open(self.dir / self.files[k], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._open_shard = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order):
            raise RuntimeError(f"safetensors writer: unexpected extra tensor '{name}'")
        k, want, shape, dtype = self.order[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"safetensors writer: expected {want} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if k != self._open_shard:
            self._start_shard(k)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the last shard and write the index; refuses if a planned tensor was never written."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._next != len(self.order):
            raise RuntimeError(f"safetensors writer: {len(self.order) - self._next} planned tensors not written "
                               f"(next: {self.order[self._next][1]})")
        weight_map = {name: self.files[k] for k, name, _, _ in self.order}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def sort_hf_files(hf_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(tokenizer files, other small non-weight files) at the top level of an HF folder."""
    tok, extra = [], []
    for p in sorted(Path(hf_dir).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name in TOKENIZER_FILES or p.suffix == ".tiktoken":
            tok.append(p)
        elif p.stat().st_size <= MAX_EXTRA_FILE_BYTES:
            extra.append(p)
    return tok, extra


def copy_files(files: Sequence[Path], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy2(p, dst / p.name)
