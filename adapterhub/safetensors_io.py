"""Reading safetensors: headers checked without loading, tensors read alone, streaming sha256, finiteness.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping tensor names to dtype, shape and byte offsets, then the raw data.
The encoding both directions share (headers built, tensors as little-endian
bits) lives here too; the writers that put files on disk are in tensor_writers.
"""

from __future__ import annotations

import hashlib
import json
import struct
from math import prod
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

from . import jsonio
from .errors import InvalidAdapterError, UnsafeFormatError

# Every dtype the safetensors library accepts, in bits per element (its Rust `Dtype::bitsize`).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# Whole-byte dtypes, the ones whose elements can be read and written one by one.
DTYPE_SIZES = {k: bits // 8 for k, bits in DTYPE_BITS.items() if bits % 8 == 0}
# What mlx.core.load accepts (mlx/io/safetensors.cpp, dtype_from_safetensor_str): no F64, no FP8/FP4/FP6.
MLX_LOADABLE = ("BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "C64", "U64", "I64")
FLOAT_DTYPES = ("F32", "F16", "BF16")
# Exponent-bit masks: a float is non-finite exactly when all its exponent bits are set.
_EXPONENT_MASKS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                   "F64": ("<u8", 0x7FF0000000000000)}
# The safetensors library refuses a header longer than this (MAX_HEADER_SIZE in its tensor.rs); mlx too.
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CHUNK = 8 * 1024 * 1024

Progress = Callable[[int], None]


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
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


def _bad_file(path: Path, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"{path} is not a valid safetensors file: {why}",
        hint="re-save it with safetensors (mlx.core.save_safetensors or safetensors.numpy.save_file)",
    )


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without reading tensor data.

    Applies the rules of the safetensors library (its Rust `read_metadata`), so a
    file passes here exactly when safetensors itself would open it.

    Raises:
        InvalidAdapterError: the file is missing, truncated, or not safetensors.
    """
    path = Path(path)
    refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(path, f"{size} bytes is too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            # The limit first, as the library does: a huge length is refused without reading anything.
            if length > MAX_HEADER_BYTES:
                raise _bad_file(path, f"its header length is {length} bytes, over the format's limit of {MAX_HEADER_BYTES}")
            if length > size - 8:
                raise _bad_file(path, f"its header length is {length} bytes but only {size - 8} bytes follow "
                                      "the 8-byte length prefix (truncated?)")
            raw = f.read(length)
    except FileNotFoundError:
        raise InvalidAdapterError(f"{path} does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise InvalidAdapterError(f"{path} is a folder, not a safetensors file", hint="check the path") from None
    return parse_header(prefix + raw, path, size - 8 - length)


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; the format forbids them, and a reader
    # that keeps the first would see other tensors than the ones checked here.
    doc: dict = {}
    for key, value in pairs:
        if key in doc:
            raise _Duplicate(key)
        # Python reads a lone surrogate escape ("\\ud800") into a str that is not Unicode; serde_json refuses it.
        key.encode("utf-8")
        if isinstance(value, str):
            value.encode("utf-8")
        doc[key] = value
    return doc


def _show(value: object, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"


def quote_name(name: str, limit: int = 120) -> str:
    """A tensor name for a one-line message: a name from a file may hold newlines or be huge."""
    text = json.dumps(name, ensure_ascii=False)[1:-1]
    return f"'{text if len(text) <= limit else text[:limit] + '…'}'"


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(raw: bytes, path: Path, data_size: int | None = None) -> Header:
    """Check a header given as its bytes (8-byte length prefix and JSON).

    Args:
        raw: the header as stored at the start of a file.
        path: the file it belongs to (kept in the Header, named in errors).
        data_size: bytes after the header; tensors must cover exactly these. None
            when the data is not at hand (a header kept apart from its tensors).
    """
    path = Path(path)
    if len(raw) < 8:
        raise _bad_file(path, f"{len(raw)} bytes is too short for a header")
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + length]
    if not text.startswith(b"{"):
        raise _bad_file(path, "its header does not start with '{'")
    try:
        doc = jsonio.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeError:
        raise _bad_file(path, "its header is not UTF-8 text") from None
    except _Duplicate as e:
        raise _bad_file(path, f"its header names {quote_name(str(e))} twice") from None
    except jsonio.JSONError as e:
        # A real header is three levels deep (tensor, info, shape): "nesting too deep" is an attack.
        raise _bad_file(path, f"its header is not JSON a safetensors reader accepts ({e})") from None
    if not isinstance(doc, dict):
        raise _bad_file(path, "header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_file(path, "its __metadata__ is not a map of strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, spec in doc.items():
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
            raise _bad_file(path, f"tensor {quote_name(name)} has no dtype, shape and data_offsets")
        dtype, shape = spec["dtype"], spec["shape"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _bad_file(path, f"tensor {quote_name(name)} has unknown dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise _bad_file(path, f"tensor {quote_name(name)} has invalid shape {_show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
            raise _bad_file(path, f"tensor {quote_name(name)} has invalid data_offsets {_show(offsets)}")
        begin, end = offsets
        if end < begin or (data_size is not None and end > data_size):
            raise _bad_file(path, f"tensor {quote_name(name)} lies outside the file (offsets {begin}..{end}, "
                                  f"data is {data_size} bytes; truncated?)")
        bits = prod(shape) * DTYPE_BITS[dtype]
        if bits % 8:
            raise _bad_file(path, f"tensor {quote_name(name)} of shape {shape} {dtype} is {bits} bits, not a whole number of bytes")
        if end - begin != bits // 8:
            raise _bad_file(path, f"tensor {quote_name(name)} of shape {shape} {dtype} needs {bits // 8} bytes, has {end - begin}")
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    position = 0
    # Ordered as the library orders them, by (begin, end): empty tensors may share an offset.
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != position:
            raise _bad_file(path, f"tensor {quote_name(name)} starts at {t.begin}, expected {position} (overlapping or gapped data)")
        position = t.end
    if data_size is not None and position != data_size:
        raise _bad_file(path, f"data section is {data_size} bytes but tensors cover {position} (truncated or padded)")
    return Header(path, tensors, metadata, 8 + length)


def unloadable_by_mlx(header: Header) -> dict[str, str]:
    """Tensor name -> dtype, for every tensor that mlx.core.load refuses."""
    return {k: t.dtype for k, t in sorted(header.tensors.items()) if t.dtype not in MLX_LOADABLE}


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


def has_non_finite(bits, dtype: str) -> bool:
    """Whether raw float bits (a numpy array of one safetensors float dtype's patterns) hold an inf or NaN.

    With the sign cleared, a pattern is at least the exponent mask exactly when every exponent
    bit is set: one masking pass and one max, far cheaper than isfinite's several passes.
    """
    if dtype not in _EXPONENT_MASKS or not bits.size:
        return False
    _, mask = _EXPONENT_MASKS[dtype]
    magnitude = bits.dtype.type((1 << (bits.dtype.itemsize * 8 - 1)) - 1)
    return bool((bits & magnitude).max() >= mask)


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


# ---- tensors as bytes, both ways ---------------------------------------------

MLX_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U8": "uint8",
              "I32": "int32", "I8": "int8", "U16": "uint16", "I16": "int16", "I64": "int64", "U64": "uint64", "BOOL": "bool_",
              "C64": "complex64"}
_BIT_VIEWS = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def header_bytes(header: Header) -> bytes:
    """The file's header exactly as stored (length prefix, JSON and padding)."""
    with open(header.path, "rb") as f:
        return f.read(header.data_start)


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None,
                 size: int | None = None) -> bytes:
    """A safetensors header for tensors laid out in the given order.

    Padded with spaces (which JSON allows) to a multiple of 8 bytes, or to exactly `size`
    bytes: the room a writer reserved before it knew the header.
    """
    doc: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = prod(shape) * DTYPE_SIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if size is not None and len(raw) > size - 8:
        raise ValueError(f"a header of {len(raw) + 8} bytes does not fit the {size} reserved for it")
    raw += b" " * (size - 8 - len(raw) if size is not None else -len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_bits(header: Header, name: str):
    """A tensor's raw elements as a numpy array of unsigned ints of the same width (no decoding)."""
    import numpy as np

    t = header.tensors[name]
    width = DTYPE_SIZES[t.dtype]
    return np.fromfile(header.path, dtype=_BIT_VIEWS[width], count=(t.end - t.begin) // width,
                       offset=header.data_start + t.begin).reshape(t.shape)


def read_tensor(header: Header, name: str):
    """One tensor as an mlx array, read alone: never the whole file."""
    import mlx.core as mx

    t = header.tensors[name]
    return mx.array(read_bits(header, name)).view(getattr(mx, MLX_DTYPES[t.dtype]))


def tensor_bytes(array) -> bytes:
    """The little-endian bytes of an mlx array, as safetensors stores them."""
    import mlx.core as mx
    import numpy as np

    width = array.dtype.size
    bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[width]
    return np.array(array.view(bits) if array.dtype != bits else array).astype(_BIT_VIEWS[width], copy=False).tobytes()


def tensor_bits(array):
    """An evaluated mlx array's elements as a C-contiguous numpy array of little-endian unsigned ints.

    No copy where the array is contiguous already: the numpy array shares the mlx buffer
    (and keeps it alive), so a writer or hashing thread can take it as it is.
    """
    import mlx.core as mx
    import numpy as np

    width = array.dtype.size
    bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[width]
    shared = np.asarray(array.view(bits) if array.dtype != bits else array)
    return np.ascontiguousarray(shared.astype(_BIT_VIEWS[width], copy=False))


def safetensors_dtype(array) -> str:
    name = str(array.dtype).removeprefix("mlx.core.")
    return next(k for k, v in MLX_DTYPES.items() if v == name)
