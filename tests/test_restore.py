import numpy as np
import pytest

from adapterhub.algebra.restore import decode, encode


@pytest.mark.parametrize("dtype,bits", [(np.float16, np.uint16), (np.float32, np.uint32)])
def test_float_residuals_round_trip_including_edge_cases(dtype, bits):
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.02, 4096).astype(dtype)
    naive = base.copy()
    near = rng.random(4096) < 0.3
    naive[near] = np.nextafter(base[near], np.inf if dtype == np.float32 else dtype(np.inf)).astype(dtype)
    naive[:4] = [0.0, -0.0, 1e-3, -5.0]
    base[:4] = [-0.0, 0.0, -1e-3, 7.0]  # ±0, a sign change, a large step: all exceptions
    base_bits, naive_bits = base.view(bits), naive.view(bits)
    data = encode(base_bits, naive_bits, True)
    assert np.array_equal(decode(naive_bits, data, True), base_bits)
    assert len(data) < base_bits.nbytes * 0.5  # mostly one byte per differing element


def test_integer_residuals_round_trip():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**32, 1000, dtype=np.uint32)
    naive = base.copy()
    naive[::7] ^= rng.integers(1, 2**32, naive[::7].size, dtype=np.uint32)
    assert np.array_equal(decode(naive, encode(base, naive, False), False), base)


def test_identical_tensors_cost_only_the_bitmap():
    base = np.arange(800, dtype=np.uint16)
    assert len(encode(base, base.copy(), True)) == 100


def _reference_encode(base, naive, is_float):
    """The format as first written (boolean masks, int64 throughout): the fast encoder must give the same bytes."""
    base, naive = base.reshape(-1), naive.reshape(-1)
    differ = base != naive
    if is_float:
        def ordered(bits):
            sign = np.uint64(1) << np.uint64(bits.dtype.itemsize * 8 - 1)
            wide = bits.astype(np.uint64)
            magnitude = (wide & ~sign).astype(np.int64)
            return np.where(wide & sign, -magnitude, magnitude)

        step = ordered(base[differ]) - ordered(naive[differ])
        small = (step != 0) & (step > -128) & (step < 128)
    else:
        step = (base[differ] ^ naive[differ]).astype(np.int64)
        small = step < 128
    values = np.where(small, step, -128).astype(np.int8)
    return np.packbits(differ).tobytes() + values.tobytes() + base[differ][~small].tobytes()


@pytest.mark.parametrize("dtype,bits", [(np.float16, np.uint16), (np.float32, np.uint32), (np.float64, np.uint64)])
def test_the_encoding_is_the_stored_format(dtype, bits):
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, 20000).astype(dtype)
    naive = base.copy()
    near = rng.random(base.size) < 0.4
    naive[near] = np.nextafter(base[near], np.where(rng.random(near.sum()) < 0.5, np.inf, -np.inf).astype(dtype)).astype(dtype)
    flipped = rng.random(base.size) < 0.05
    naive[flipped] = -naive[flipped]
    naive[rng.random(base.size) < 0.02] *= 3
    base[:3], naive[:3] = [0.0, -0.0, np.inf], [-0.0, 0.0, 1.0]
    base_bits, naive_bits = base.view(bits), naive.view(bits)
    data = encode(base_bits, naive_bits, True)
    assert data == _reference_encode(base_bits, naive_bits, True)
    assert np.array_equal(decode(naive_bits, data, True), base_bits)
    packs = rng.integers(0, 2**32, 5000, dtype=np.uint32)
    changed = packs.copy()
    changed[::3] ^= rng.integers(0, 2**32, changed[::3].size, dtype=np.uint32)
    assert encode(packs, changed, False) == _reference_encode(packs, changed, False)


def test_restore_writer_reserves_room_for_its_header(tmp_path):
    from adapterhub.algebra.restore import RestoreWriter, read
    from adapterhub.objects import ObjectStore

    objects = ObjectStore(tmp_path / "objects")
    names = [f"residual/model.layers.{i}.self_attn.q_proj.weight" for i in range(50)] + ["file/README.md", "extra/x"]
    writer = RestoreWriter(objects, names)
    parts = {name: bytes([i % 251]) * (1000 * i + 7) for i, name in enumerate(names[:50])}
    for name, data in parts.items():
        writer.add(name, data)
    writer.add("file/README.md", b"")
    with pytest.raises(ValueError, match="was not announced"):
        writer.add("residual/other", b"1")
    stored = writer.finish()
    writer.keep()
    path = objects.path(stored["sha256"])
    assert path.stat().st_size == stored["size"]
    assert read(path) == {**parts, "file/README.md": b""}
