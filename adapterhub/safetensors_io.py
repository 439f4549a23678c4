"""The only module that reads safetensors bytes: headers without loading, streaming sha256, finiteness.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping tensor names to dtype, shape and byte offsets, then the raw data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import InvalidAdapterError, UnsafeFormatError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# Exponent-bit masks: a float is non-finite exactly when all its exponent bits are set.
_EXPONENT_MASKS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                   "F64": ("<u8", 0x7FF0000000000000)}
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CHUNK = 8 * 1024 * 1024

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed, checked safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int

    def structure(self) -> dict[str, list]:
        """Tensor name -> [dtype, shape]: what identifies the file's layout."""
        return {k: [t.dtype, list(t.shape)] for k, t in sorted(self.tensors.items())}


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeFormatError for pickle-based weights: opening them can run arbitrary code."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(
            f"{path} is a pickle file; adapterhub never unpickles weights (it can run arbitrary code)",
            hint="convert it to safetensors where you trust the file: python -c \"import torch; "
            "from safetensors.torch import save_file; "
            f"save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"",
        )


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without reading tensor data.

    Raises:
        InvalidAdapterError: the file is missing, truncated, or not safetensors.
    """
    path = Path(path)
    refuse_pickle(path)
    bad = lambda why: InvalidAdapterError(  # noqa: E731
        f"{path} is not a valid safetensors file: {why}",
        hint="re-save it with safetensors (mlx.core.save_safetensors or safetensors.numpy.save_file)",
    )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes is too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"header claims {length} bytes but the file has {size}")
            raw = f.read(length)
    except FileNotFoundError:
        raise InvalidAdapterError(f"{path} does not exist", hint="check the path") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    data_start = 8 + length
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, spec in doc.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor '{name}' has no dtype, shape and data_offsets") from None
        if dtype not in DTYPE_SIZES:
            raise bad(f"tensor '{name}' has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"tensor '{name}' has invalid shape {list(shape)}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise bad(f"tensor '{name}' lies outside the file (offsets {begin}..{end}, data is {data_size} bytes; truncated?)")
        if end - begin != prod(shape) * DTYPE_SIZES[dtype]:
            raise bad(f"tensor '{name}' of shape {list(shape)} {dtype} needs {prod(shape) * DTYPE_SIZES[dtype]} bytes, has {end - begin}")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    position = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].begin):
        if t.begin != position:
            raise bad(f"tensor '{name}' starts at {t.begin}, expected {position} (overlapping or gapped data)")
        position = t.end
    if position != data_size:
        raise bad(f"data section is {data_size} bytes but tensors cover {position} (truncated or padded)")
    return Header(path, tensors, metadata, data_start)


def non_finite_tensors(header: Header) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity, checked on raw bits."""
    import numpy as np

    found = []
    with open(header.path, "rb") as f:
        for name, t in sorted(header.tensors.items()):
            if t.dtype not in _EXPONENT_MASKS or t.end == t.begin:
                continue
            view, mask = _EXPONENT_MASKS[t.dtype]
            bits = np.fromfile(f, dtype=view, count=(t.end - t.begin) // np.dtype(view).itemsize,
                               offset=header.data_start + t.begin - f.tell())
            if np.any((bits & mask) == mask):
                found.append(name)
    return found


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The sha256 of a file (for an LFS-tracked file, the same as Hugging Face's oid)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if progress:
                progress(n)
    return digest.hexdigest()


def copy_hashed(src: BinaryIO, dst: BinaryIO, progress: Progress | None = None) -> tuple[str, int]:
    """Copy a stream while hashing it, so a file is hashed as it is written."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while n := src.readinto(buffer):
        digest.update(view[:n])
        dst.write(view[:n])
        size += n
        if progress:
            progress(n)
    return digest.hexdigest(), size
