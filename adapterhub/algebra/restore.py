"""Restore data: what it takes to turn the naive inverse of a fuse back into the exact base.

For each base tensor a fuse changed, the residual between the true base and
the naive inverse is stored compactly. Rounding leaves most elements equal and
the rest a few units in the last place apart, so a float residual is a bitmap
of differing elements, one signed byte each for the distance in ulps, and the
exact bits of the rare exceptions (sign changes, ±0, larger steps). Integer
tensors (quantized packs) use the XOR instead of the ulp distance.

The file is a safetensors file of byte tensors. Parts are spilled to disk as
they are produced, so memory does not grow with the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..files import temp_path_for
from ..safetensors_io import build_header, read_bits, read_header, sha256_file
from ..tensor_writers import Profile, writeback

FORMAT = "adapterhub-restore-2"
_SENTINEL = -128  # marks an exception: its exact bits follow the bytes


def _ordered(bits: np.ndarray) -> np.ndarray:
    """Float bit patterns (sign-magnitude) as integers whose difference counts ulps.

    Two's complement of the magnitude where the sign bit is set, without a branch: xor with
    -1 and add one. int32 holds any difference of 16-bit patterns and moves half the bytes of int64.
    """
    width = bits.dtype.itemsize
    wide = bits.view(f"<i{width}").astype(np.int32 if width <= 2 else np.int64)
    negative = wide >> (wide.dtype.itemsize * 8 - 1)  # -1 where the sign bit is set, else 0
    magnitude = wide & ((1 << (width * 8 - 1)) - 1)
    return (magnitude ^ negative) - negative


def _unordered(ordered: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """_ordered's inverse: sign-magnitude bit patterns of `dtype` back from ordered integers."""
    dtype = np.dtype(dtype)
    negative = ordered >> (ordered.dtype.itemsize * 8 - 1)
    magnitude = ((ordered ^ negative) - negative).astype(dtype)
    return magnitude | (negative.astype(dtype) & dtype.type(1 << (dtype.itemsize * 8 - 1)))


def encode(base: np.ndarray, naive: np.ndarray, is_float: bool) -> bytes:
    """The residual that turns `naive` into `base` (both raw bit arrays of one width)."""
    base, naive = base.reshape(-1), naive.reshape(-1)
    differ = base != naive
    # Indices, then plain gathers: several times faster than boolean masks on large arrays.
    where = np.flatnonzero(differ)
    changed, was = base[where], naive[where]
    if is_float:
        step = _ordered(changed) - _ordered(was)
        small = (step != 0) & (step > _SENTINEL) & (step < 128)
    else:
        step = changed ^ was
        small = step < 128
    values = step.astype(np.int8)  # exact where small; the rest is overwritten
    values[~small] = _SENTINEL
    exceptions = changed[~small]
    return np.packbits(differ).tobytes() + values.tobytes() + exceptions.tobytes()


def decode(naive: np.ndarray, data: bytes, is_float: bool) -> np.ndarray:
    """`base` back from `naive` and its residual."""
    flat = naive.reshape(-1)
    count = flat.size
    mask_bytes = (count + 7) // 8
    where = np.flatnonzero(np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=mask_bytes), count=count))
    n = where.size
    values = np.frombuffer(data, dtype=np.int8, count=n, offset=mask_bytes)
    exceptions = np.frombuffer(data, dtype=flat.dtype, offset=mask_bytes + n)
    changed = flat[where]
    small = values != _SENTINEL
    if is_float:
        changed[small] = _unordered(_ordered(changed[small]) + values[small], flat.dtype)
    else:
        changed[small] ^= values[small].astype(flat.dtype)
    changed[~small] = exceptions
    out = flat.copy()
    out[where] = changed
    return out.reshape(naive.shape)


def _metadata(empty: list[str]) -> dict[str, str]:
    return {"format": FORMAT, "empty": json.dumps(empty)}


class RestoreWriter:
    """Writes restore data into the object store: one safetensors file of byte tensors, parts appended as they come.

    The names of the parts are known before the first one is written, so the file starts with
    room for the longest header those names could need; `finish` writes the header into it,
    padded with spaces, hashes the file and moves it to its content address. Nothing is copied,
    and memory does not grow with the model.
    """

    def __init__(self, objects, names: list[str]):
        self.objects = objects
        self._names = set(names)
        # Every part at a size of 20 digits: no real header can be longer.
        self._room = len(build_header([(name, "U8", (10**19,)) for name in names], _metadata(list(names))))
        staging = objects.root / "tmp"
        staging.mkdir(parents=True, exist_ok=True)
        self._path = temp_path_for(staging / "restore")
        self._file = open(self._path, "wb")
        self._file.seek(self._room)
        self._parts: list[tuple[str, int]] = []
        self._empty: list[str] = []

    def add(self, name: str, data: bytes) -> None:
        if name not in self._names:
            raise ValueError(f"restore part {name} was not announced")
        if not data:
            self._empty.append(name)
            return
        self._file.write(data)
        self._parts.append((name, len(data)))

    def finish(self, profile: Profile | None = None) -> dict:
        """Write the header, hash and sync the file; returns {sha256, size}. `keep` then stores it."""
        profile = profile or Profile(activities=False)
        with profile.timing("writing"):
            self._file.seek(0)
            self._file.write(build_header([(name, "U8", (size,)) for name, size in self._parts],
                                          _metadata(self._empty), size=self._room))
            self._file.flush()
            start = writeback()
            if start:  # to disk while the file is hashed, so the fsync below has little left
                start(self._file.fileno(), 0, 0)
        with profile.timing("hashing"):
            self._sha = sha256_file(self._path)
        with profile.timing("writing"):
            os.fsync(self._file.fileno())
            self._file.close()
        return {"sha256": self._sha, "size": self._path.stat().st_size}

    def keep(self) -> None:
        """Move the finished file into the object store, under its sha256."""
        self.objects.adopt(self._path, self._sha)

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


def read(path: Path) -> dict[str, bytes]:
    """Restore data back as name -> bytes."""
    header = read_header(path)
    if header.metadata.get("format") != FORMAT:
        from ..errors import CorruptRegistryError

        raise CorruptRegistryError(f"{path} is not adapterhub restore data ({header.metadata.get('format')!r})",
                                   hint="re-fuse the model to make new restore data")
    parts = {name: read_bits(header, name).tobytes() for name in header.tensors}
    parts.update({name: b"" for name in json.loads(header.metadata.get("empty", "[]"))})
    return parts
