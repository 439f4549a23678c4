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
from pathlib import Path

import numpy as np

from ..safetensors_io import StreamingWriter, build_header, read_bits, read_header
from ..store import temp_path_for

FORMAT = "adapterhub-restore-2"
_SENTINEL = -128  # marks an exception: its exact bits follow the bytes


def _ordered(bits: np.ndarray) -> np.ndarray:
    """Float bit patterns (sign-magnitude) as integers whose difference counts ulps."""
    width = bits.dtype.itemsize * 8
    sign = np.uint64(1) << np.uint64(width - 1)
    wide = bits.astype(np.uint64)
    magnitude = (wide & ~sign).astype(np.int64)
    return np.where(wide & sign, -magnitude, magnitude)


def encode(base: np.ndarray, naive: np.ndarray, is_float: bool) -> bytes:
    """The residual that turns `naive` into `base` (both raw bit arrays of one width)."""
    base, naive = base.reshape(-1), naive.reshape(-1)
    differ = base != naive
    if is_float:
        step = _ordered(base[differ]) - _ordered(naive[differ])
        small = (step != 0) & (step > _SENTINEL) & (step < 128)
    else:
        step = (base[differ] ^ naive[differ]).astype(np.int64)
        small = step < 128
    values = np.where(small, step, _SENTINEL).astype(np.int8)
    exceptions = base[differ][~small]
    return np.packbits(differ).tobytes() + values.tobytes() + exceptions.tobytes()


def decode(naive: np.ndarray, data: bytes, is_float: bool) -> np.ndarray:
    """`base` back from `naive` and its residual."""
    flat = naive.reshape(-1)
    count = flat.size
    mask_bytes = (count + 7) // 8
    differ = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=mask_bytes), count=count).astype(bool)
    n = int(differ.sum())
    values = np.frombuffer(data, dtype=np.int8, count=n, offset=mask_bytes).astype(np.int64)
    exceptions = np.frombuffer(data, dtype=flat.dtype, offset=mask_bytes + n)
    out = flat.copy()
    changed = flat[differ]
    small = values != _SENTINEL
    if is_float:
        width = flat.dtype.itemsize * 8
        ordered = _ordered(changed[small]) + values[small]
        sign = np.uint64(1) << np.uint64(width - 1)
        rebuilt = np.where(ordered < 0, sign | (-ordered).astype(np.uint64), ordered.astype(np.uint64))
        changed[small] = rebuilt.astype(flat.dtype)
    else:
        changed[small] = changed[small] ^ values[small].astype(flat.dtype)
    changed[~small] = exceptions
    out[differ] = changed
    return out.reshape(naive.shape)


class RestoreWriter:
    """Collects restore parts on disk, then writes one safetensors file into the object store."""

    def __init__(self, objects):
        self.objects = objects
        staging = objects.root / "tmp"
        staging.mkdir(parents=True, exist_ok=True)
        self._data_path = temp_path_for(staging / "restore-data")
        self._data = open(self._data_path, "wb")
        self._parts: list[tuple[str, int]] = []
        self._empty: list[str] = []

    def add(self, name: str, data: bytes) -> None:
        if not data:
            self._empty.append(name)
            return
        self._data.write(data)
        self._parts.append((name, len(data)))

    def finish(self) -> dict:
        """Store the file under its sha256; returns {sha256, size}."""
        self._data.close()
        header = build_header([(name, "U8", (size,)) for name, size in self._parts],
                              {"format": FORMAT, "empty": json.dumps(self._empty)})
        target = temp_path_for(self.objects.root / "tmp" / "restore")
        try:
            with open(self._data_path, "rb") as data, StreamingWriter(target, header) as writer:
                writer.copy_range(data, 0, sum(size for _, size in self._parts))
                sha, size = writer.close()
            self.objects.adopt(target, sha)
        finally:
            self._data_path.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
        return {"sha256": sha, "size": size}

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)


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
