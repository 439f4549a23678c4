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
