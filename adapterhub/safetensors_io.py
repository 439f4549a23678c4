"""The only module that reads safetensors bytes: headers without loading, streaming sha256, finiteness.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping tensor names to dtype, shape and byte offsets, then the raw data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

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


# ---- streaming tensors in and out -------------------------------------------

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


class _Lane:
    """One background thread draining a bounded queue of chunks (hashlib and file writes release the GIL).

    The queue is deep (32 chunks of 8 MB, shared by both lanes of a writer) so hashing keeps
    going while the producer computes a tensor, instead of the two taking turns.
    """

    def __init__(self, consume: Callable[[bytes], None], depth: int = 32):
        import queue
        import threading

        self._queue: "queue.Queue[bytes | None]" = queue.Queue(depth)
        self._consume = consume
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._consume(chunk)
                except BaseException as e:  # noqa: BLE001 - re-raised in the producer by finish()
                    self._error = e

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class StreamingWriter:
    """Writes a safetensors file front to back: header first, then each tensor in order.

    Bytes go to a temporary file and are hashed as they are written, each on its
    own thread so hashing, writing and the caller's work overlap; `close()`
    renames the file into place, so a crash never leaves a truncated file under
    its name.
    """

    SYNC_EVERY = 256 << 20  # flush as we go, so close() does not wait for the whole file

    def __init__(self, path: Path, header: bytes, progress: Progress | None = None):
        from .files import temp_path_for

        self.path = Path(path)
        self._tmp = temp_path_for(self.path)
        self._file = open(self._tmp, "wb", buffering=0)
        self._digest = hashlib.sha256()
        self._size = self._unsynced = 0
        self._progress = progress
        self._hashing = _Lane(self._digest.update)
        self._writing = _Lane(self._write_chunk)
        self.write(header)

    def _write_chunk(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[self._file.write(view):]
        self._unsynced += len(chunk)
        if self._unsynced >= self.SYNC_EVERY:
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def write(self, data: bytes | memoryview) -> None:
        chunk = bytes(data)
        self._hashing.put(chunk)
        self._writing.put(chunk)
        self._size += len(chunk)
        if self._progress:
            self._progress(len(chunk))

    def copy_range(self, source: BinaryIO, offset: int, length: int) -> None:
        """Copy bytes from another file without decoding them."""
        source.seek(offset)
        while length:
            chunk = source.read(min(length, CHUNK))
            if not chunk:
                raise InvalidAdapterError(f"{source.name} ended early", hint="the file is truncated")
            self.write(chunk)
            length -= len(chunk)

    def close(self) -> tuple[str, int]:
        self._hashing.finish()
        self._writing.finish()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self._digest.hexdigest(), self._size

    def abort(self) -> None:
        for lane in (self._hashing, self._writing):
            try:
                lane.finish()
            except BaseException:  # noqa: BLE001 - the original error matters, not this one
                pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


# ---- the fuse / unfuse pipeline: files whose layout is known before the first byte ----

PROFILE_FIELDS = ("reading", "computing", "restore", "copying", "writing", "hashing", "waiting")
COPY_BLOCK = 64 << 20  # one kernel copy call: large, so the per-call cost vanishes
WRITEBACK_EVERY = 256 << 20  # how often a writer asks the kernel to start writing its dirty pages


class Profile:
    """Seconds per activity, summed over the threads that did it.

    The pipeline overlaps its activities, so they may add up to more than the wall time;
    "waiting" is the computing thread blocked on the writers (memory budget, final flush).
    """

    def __init__(self):
        import threading
        import time

        self._clock = time.perf_counter
        self.started = self._clock()
        self.seconds = dict.fromkeys(PROFILE_FIELDS, 0.0)
        self._lock = threading.Lock()

    def add(self, what: str, seconds: float) -> None:
        with self._lock:
            self.seconds[what] += seconds

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self.add(what, self._clock() - start)

    def to_dict(self) -> dict[str, float]:
        return {"wall": round(self._clock() - self.started, 3), **{k: round(v, 3) for k, v in self.seconds.items()}}


def format_profile(profile: dict[str, float]) -> str:
    """One line for a person: `profile  wall 12.3 s | reading 1.0 | computing 5.2 | ...`."""
    rest = " | ".join(f"{k} {v:.2f}" for k, v in profile.items() if k != "wall")
    return f"profile  wall {profile['wall']:.2f} s | {rest}  (seconds per activity, summed over threads)"


class ByteBudget:
    """Bytes handed to writer threads and not yet written, shared by every file of one command.

    The producer waits while the budget is spent, so memory stays bounded however far
    ahead it computes; one item always passes, so a tensor larger than the budget still goes.
    """

    def __init__(self, limit: int):
        import threading

        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._changed:
            while self.used and self.used + n > self.limit:
                self._changed.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._changed:
            self.used -= n
            self._changed.notify_all()


@lru_cache(maxsize=1)
def writeback():
    """A call (fd, offset, length) that starts writing a file's dirty pages to disk without waiting
    for them (Linux's sync_file_range with SYNC_FILE_RANGE_WRITE; length 0: to the end), or None
    where the C library lacks it. The fsync that ends a file then finds little left to do."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, offset, length: call(fd, offset, length, 2)


class _Stopped(Exception):
    pass


class ShardWriter:
    """Writes one file from a layout fixed before the first byte, on two threads of its own.

    `parts` is the file after `header`, in order: ("copy", offset, length) for bytes taken
    unchanged from `source`, ("put", length) for bytes the caller hands over with `put`, in
    that order, while it goes on computing the next ones. Every part's place in the file is
    known up front, so the copying needs no order: one thread copies the unchanged ranges in
    large blocks in the kernel (copy_file_range: no trip through Python, a reflink where the
    filesystem has one; large reads and writes where the call is missing), while the other
    walks the file in order, hashing the same ranges as it reads them from the source (one
    read, which the copy's has just brought into the page cache) and hashing and writing what
    `put` hands over. hashlib releases the GIL, so the writers of several files hash on
    several cores. The file is fsynced before `close` returns its sha256 and size; it is
    written directly under `path`, which suits a staging folder renamed into place (or
    removed) as a whole.
    """

    def __init__(self, path: Path, header: bytes, parts: list[tuple], source: Path | None = None,
                 budget: ByteBudget | None = None, profile: Profile | None = None, progress: Progress | None = None):
        import queue
        import threading

        self.path = Path(path)
        self._header, self._parts, self._source = header, parts, source
        self._budget = budget or ByteBudget(512 << 20)
        self._profile = profile or Profile()
        self._progress = progress
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._digest = hashlib.sha256()
        self._size = sum(p[-1] for p in parts) + len(header)
        self._written = self._synced = 0
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._stop = False
        self._src = os.open(source, os.O_RDONLY) if any(p[0] == "copy" for p in parts) else None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except BaseException:
            self._fd = None
            self._close_files()
            raise
        self._ended = False  # the hashing thread took close's or abort's end mark
        self._hash_buffer: memoryview | None = None
        self._threads = [threading.Thread(target=self._guarded, args=(run,), name=f"{run.__name__} {self.path.name}",
                                          daemon=True) for run in (self._hash_in_order, self._copy_ranges)]
        for thread in self._threads:
            thread.start()

    # -- the caller's side --------------------------------------------------

    def put(self, data) -> None:
        """Hand over the next "put" part: any C-contiguous buffer, kept alive until it is written."""
        view = memoryview(data).cast("B")
        if self._errors:
            raise self._errors[0]
        with self._profile.timing("waiting"):
            self._budget.acquire(view.nbytes)
        self._queue.put(view)

    def close(self) -> tuple[str, int]:
        """Wait for the file to be written and synced; returns (sha256, size)."""
        self._queue.put(None)
        with self._profile.timing("waiting"):
            for thread in self._threads:
                thread.join()
            if not self._errors:
                with self._profile.timing("writing"):
                    os.fsync(self._fd)
        self._close_files()
        if self._errors:
            raise self._errors[0]
        if self._written != self._size:  # a planning error, never a short file under a good hash
            raise ValueError(f"{self.path.name}: {self._written} bytes written of {self._size} planned")
        return self._digest.hexdigest(), self._size

    def abort(self) -> None:
        """Stop at the next block and delete the partial file."""
        self._stop = True
        self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._close_files()
        self.path.unlink(missing_ok=True)

    def _close_files(self) -> None:
        for fd in (self._fd, self._src):
            if fd is not None:
                os.close(fd)
        self._fd = self._src = None

    # -- the two threads ----------------------------------------------------

    def _guarded(self, run) -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - raised in the caller by put() or close()
            self._errors.append(e)
            self._stop = True  # the other thread stops at its next block
            if run == self._hash_in_order and not self._ended:
                # Keep taking what the caller hands over, so it never waits for memory this thread holds.
                while (view := self._queue.get()) is not None:
                    self._budget.release(view.nbytes)

    def _hash_in_order(self) -> None:
        self._hash(memoryview(self._header))
        self._write(memoryview(self._header), 0)
        offset = len(self._header)
        for part in self._parts:
            if part[0] == "copy":
                self._hash_source(part[1], part[2])
            else:
                view = self._queue.get()
                if view is None:  # closed or aborted before every part came
                    self._ended = True
                    raise _Stopped(f"{self.path.name} was closed before every part was written")
                try:
                    if view.nbytes != part[1]:
                        raise ValueError(f"{self.path.name}: a part of {view.nbytes} bytes where {part[1]} were planned")
                    self._hash(view)
                    self._write(view, offset)
                finally:
                    self._budget.release(view.nbytes)
            offset += part[-1]

    def _copy_ranges(self) -> None:
        offset = len(self._header)
        kernel = hasattr(os, "copy_file_range")
        buffer = None
        for part in self._parts:
            if part[0] == "copy":
                source, length, done = part[1], part[2], 0
                while done < length:
                    if self._stop:
                        return
                    n = min(COPY_BLOCK, length - done)
                    if not (kernel and self._copy_in_kernel(source + done, offset + done, n)):
                        kernel = False  # another filesystem (older kernels), or one without the call
                        buffer = buffer or memoryview(bytearray(CHUNK))
                        n = min(CHUNK, n)
                        with self._profile.timing("reading"):
                            if os.preadv(self._src, [buffer[:n]], source + done) != n:
                                raise self._truncated()
                        self._write(buffer[:n], offset + done)
                    done += n
            offset += part[-1]

    def _hash(self, view: memoryview) -> None:
        with self._profile.timing("hashing"):
            self._digest.update(view)

    def _hash_source(self, offset: int, length: int) -> None:
        """Hash a range of the source, read in blocks into one reused buffer.

        Not through a mapping: unmapping a window makes the kernel flush the other cores'
        TLBs, which stalled every thread of the process (a third slower in all, on 2 cores).
        """
        buffer = self._hash_buffer = self._hash_buffer or memoryview(bytearray(CHUNK))
        done = 0
        while done < length:
            if self._stop:
                raise _Stopped(f"{self.path.name} was aborted")
            with self._profile.timing("reading"):
                n = os.preadv(self._src, [buffer[:min(CHUNK, length - done)]], offset + done)
            if n == 0:
                raise self._truncated()
            with self._profile.timing("hashing"):
                self._digest.update(buffer[:n])
            done += n

    def _write(self, view: memoryview, offset: int) -> None:
        n = view.nbytes
        with self._profile.timing("writing"):
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        self._advance(n)

    def _advance(self, n: int) -> None:
        """Count bytes in place; start their writeback every WRITEBACK_EVERY bytes, so close's fsync has little left."""
        with self._lock:
            self._written += n
            due = self._written - self._synced >= WRITEBACK_EVERY
            if due:
                self._synced = self._written
        if self._progress:
            self._progress(n)
        start = writeback()
        if due and start:
            start(self._fd, 0, 0)  # the whole file: the two threads write in different places

    def _copy_in_kernel(self, source: int, target: int, n: int) -> bool:
        """Copy n bytes of the source in the kernel; False where the call is not supported (then nothing was copied)."""
        import errno

        done = 0
        with self._profile.timing("copying"):
            try:
                while done < n:
                    copied = os.copy_file_range(self._src, self._fd, n - done, source + done, target + done)
                    if copied == 0:
                        raise self._truncated()
                    done += copied
            except OSError as e:
                if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                return False
        self._advance(n)
        return True

    def _truncated(self) -> InvalidAdapterError:
        return InvalidAdapterError(f"{self._source} ended early", hint="the file is truncated")


