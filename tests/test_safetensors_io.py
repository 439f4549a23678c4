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
    with pytest.raises(InvalidAdapterError, match="over the format's limit"):
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


def _craft(path, header, data=b"", length=None):
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _tensor(name, dtype="F32", shape=(1,), offsets=(0, 4)):
    return f'"{name}":{{"dtype":"{dtype}","shape":{json.dumps(list(shape))},"data_offsets":{json.dumps(list(offsets))}}}'


# Headers the safetensors library refuses (its Rust read_metadata) and read_header used to let through
# or crash on. (id, header, data, length prefix if not the header's, what the refusal says)
_DEEP = '{"a":' * 100_000 + "1" + "}" * 100_000
REFUSED_HEADERS = [
    ("metadata not an object", '{"__metadata__":["format","mlx"]}', b"", None, "__metadata__ is not a map of strings to strings"),
    ("metadata value not a string", '{"__metadata__":{"format":1}}', b"", None, "__metadata__ is not a map of strings to strings"),
    ("header just over the limit", "{}", b"", 100_000_001, "header length is 100000001 bytes, over the format's limit of 100000000"),
    ("tensor named twice", "{" + _tensor("a") + "," + _tensor("a", offsets=(4, 8)) + "}", bytes(8), None, "header names 'a' twice"),
    ("nested past the recursion limit", _DEEP, b"", None, "is not JSON a safetensors reader accepts (nesting too deep)"),
    ("bool as a dimension", "{" + _tensor("a", shape=(True, 4), offsets=(0, 16)) + "}",
     bytes(16), None, "invalid shape [true, 4]"),
    ("three data offsets", "{" + _tensor("a", offsets=(0, 4, 4)) + "}", bytes(4), None, "invalid data_offsets [0, 4, 4]"),
    ("dtype not a string", "{" + _tensor("a").replace('"F32"', '["F32"]') + "}", bytes(4), None, 'unknown dtype ["F32"]'),
    ("NaN offset", "{" + _tensor("a").replace("[0, 4]", "[0, NaN]") + "}", bytes(4), None, "non-standard number NaN"),
    ("lone surrogate in a name", "{" + _tensor("\\ud800") + "}", bytes(4), None, "not UTF-8 text"),
    ("half a byte of F4", "{" + _tensor("a", dtype="F4", shape=(3,), offsets=(0, 2)) + "}", bytes(2), None,
     "is 12 bits, not a whole number of bytes"),
]


@pytest.mark.parametrize("case,header,data,length,message", REFUSED_HEADERS, ids=[c[0] for c in REFUSED_HEADERS])
def test_headers_the_safetensors_library_refuses_are_refused(tmp_path, case, header, data, length, message):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = _craft(tmp_path / "w.safetensors", header, data, length)
    with pytest.raises(InvalidAdapterError) as info:
        read_header(path)
    assert message in info.value.message and "\n" not in str(info.value)
    with pytest.raises(SafetensorError):  # the rule is the library's, not ours
        load_file(str(path))


def test_header_must_start_with_a_brace(tmp_path):
    # The format says MUST; json.loads would skip the blank and read what follows.
    path = _craft(tmp_path / "w.safetensors", " {}")
    with pytest.raises(InvalidAdapterError, match="does not start with '{'"):
        read_header(path)


@pytest.mark.parametrize("length", [100_000_000, 10])
def test_header_length_past_the_end_says_how_much_follows(tmp_path, length):
    # 100,000,000 is still within the limit: what is wrong is that the file is shorter than it says.
    path = _craft(tmp_path / "w.safetensors", "{}", length=length)
    size = path.stat().st_size
    with pytest.raises(InvalidAdapterError) as info:
        read_header(path)
    assert f"header length is {length} bytes but only {size - 8} bytes follow" in info.value.message
    assert "limit" not in info.value.message


def test_empty_tensors_may_share_an_offset_in_any_order(tmp_path):
    from safetensors.numpy import load_file

    header = "{" + ",".join([_tensor("a"), _tensor("b", offsets=(4, 8)), _tensor("e", shape=(0,), offsets=(4, 4))]) + "}"
    path = _craft(tmp_path / "w.safetensors", header, bytes(8))
    assert set(load_file(str(path))) == {"a", "b", "e"}
    assert read_header(path).structure() == {"a": ["F32", [1]], "b": ["F32", [1]], "e": ["F32", [0]]}


def test_files_written_by_the_safetensors_library_are_read(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": np.zeros((2, 2), np.float64), "empty": np.zeros((0, 3), np.float32)}, str(path), metadata={"format": "np"})
    header = read_header(path)
    assert header.structure() == {"empty": ["F32", [0, 3]], "x": ["F64", [2, 2]]}
    assert header.metadata == {"format": "np"}
