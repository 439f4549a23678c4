import hashlib
import json
import struct

import mlx.core as mx
import numpy as np
import pytest

from adapterhub.errors import InvalidAdapterError, UnsafeFormatError
from adapterhub.safetensors_io import non_finite_tensors, read_header, sha256_file


def _save(path, **tensors):
    mx.save_safetensors(str(path), tensors)
    return path


def test_header_reads_names_shapes_and_dtypes_without_loading(tmp_path):
    path = _save(tmp_path / "w.safetensors", a=mx.zeros((3, 4), dtype=mx.bfloat16), b=mx.ones((5,), dtype=mx.float32))
    header = read_header(path)
    assert header.structure() == {"a": ["BF16", [3, 4]], "b": ["F32", [5]]}


def test_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path / "w.safetensors", a=mx.zeros((64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(InvalidAdapterError, match="truncated|outside the file"):
        read_header(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 16)
    with pytest.raises(InvalidAdapterError, match="not JSON"):
        read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidAdapterError, match="too short"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(InvalidAdapterError, match="header claims"):
        read_header(path)


def test_wrong_byte_count_for_shape_is_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(InvalidAdapterError, match="needs 16 bytes"):
        read_header(path)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_found_in_every_float_dtype(tmp_path, dtype, bad):
    good = mx.random.normal((8, 8)).astype(dtype)
    poisoned = np.array(mx.random.normal((8, 8)).astype(mx.float32))
    poisoned[3, 5] = bad
    path = _save(tmp_path / "w.safetensors", good=good, poisoned=mx.array(poisoned).astype(dtype))
    assert non_finite_tensors(read_header(path)) == ["poisoned"]


def test_large_finite_values_are_not_flagged(tmp_path):
    path = _save(tmp_path / "w.safetensors", a=mx.array([65504.0, -65504.0, 1e-7], dtype=mx.float16))
    assert non_finite_tensors(read_header(path)) == []


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickles_are_refused_with_a_conversion_hint(tmp_path, suffix):
    path = tmp_path / f"adapter_model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFormatError) as info:
        read_header(path)
    assert "safetensors" in info.value.hint and "weights_only=True" in info.value.hint


def test_streaming_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(0).bytes(20 * 1024 * 1024 + 123))
    seen = []
    assert sha256_file(path, seen.append) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(seen) == path.stat().st_size
