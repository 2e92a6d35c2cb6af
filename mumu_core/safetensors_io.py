"""General safetensors file I/O: header parsing and validation, header writing, file hashing.

Used by the merge engine, the bundle reader and the LoRA loader. The header is parsed by hand (no
memory map, no tensor data read) and every problem - a pickle or zip instead of safetensors, a
truncated file, overlapping or mis-sized tensors - is a `MumuError` that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MumuError

# safetensors dtype names -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit
_FADVISE = hasattr(os, "posix_fadvise")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]  # in file (offset) order
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.tensors.items()}


def _not_safetensors(path: Path, head: bytes) -> str | None:
    if head[:2] == b"PK":
        return "a zip archive (a pickled PyTorch .ckpt/.pt checkpoint)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    if head[:4] == b"GGUF":
        return "a GGUF file"
    return None


def read_header(path: str | os.PathLike, what: str = "file") -> SafetensorsHeader:
    """Parse and validate a safetensors header; every failure is a MumuError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise MumuError(f"{what} {path} does not exist (or is not a file).")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < n <= _MAX_HEADER
        # sniff other formats only when the file does not start like safetensors: a header length
        # of e.g. 128 bytes also begins with 0x80, the pickle opcode
        kind = None if looks_safetensors else _not_safetensors(path, head)
        if kind:
            raise MumuError(f"{what} {path} is {kind}, not safetensors. Pickled checkpoints are never loaded "
                            f"(they can run code); use the .safetensors release of the model or convert it "
                            f"in a trusted environment.")
        if len(head) < 9:
            raise MumuError(f"{what} {path} is {size} bytes, too short to be a safetensors file (truncated?).")
        if n > _MAX_HEADER or 8 + n > size:
            raise MumuError(f"{what} {path} is truncated or not safetensors: its header claims {n} bytes but the "
                            f"file has {size}. Re-download or re-copy the file.")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise MumuError(f"{what} {path} is corrupt or not safetensors: its header is not valid JSON ({exc}).") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MumuError(f"{what} {path} is corrupt: header entry {name!r} is malformed.") from None
        if dtype not in DTYPES:
            raise MumuError(f"{what} {path}: tensor {name!r} has dtype {dtype}, which this merge cannot handle.")
        entry = TensorEntry(name, dtype, shape, base + int(start), base + int(end))
        expected = entry.numel * DTYPES[dtype][1]
        if entry.nbytes != expected or start < 0:
            raise MumuError(f"{what} {path} is corrupt: tensor {name!r} spans {entry.nbytes} bytes, its shape "
                            f"{list(shape)} x {dtype} needs {expected}.")
        entries.append(entry)
    entries.sort(key=lambda e: e.start)
    data_end = max((e.end for e in entries), default=base)
    if data_end > size:
        raise MumuError(f"{what} {path} is truncated: the header indexes {data_end} bytes, the file has {size}. "
                        f"Re-download or re-copy the file.")
    pos = base
    for e in entries:
        if e.start < pos:
            raise MumuError(f"{what} {path} is corrupt: tensor {e.name!r} overlaps the previous tensor.")
        pos = e.end
    return SafetensorsHeader(path, {e.name: e for e in entries}, dict(metadata), size)


def build_header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str],
                       size: int | None = None) -> bytes:
    """Header for tensors written in the given order; space-padded to 8 bytes (or to exactly `size`)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = DTYPES[dtype][1]
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if size is not None:
        if len(raw) > size:
            raise ValueError(f"header needs {len(raw)} bytes, {size} reserved")
        raw += b" " * (size - len(raw))  # trailing spaces are legal header padding
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def sha256_file(path: str | os.PathLike, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        pos = 0
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if _FADVISE:
                os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
            pos += n
    return h.hexdigest()
