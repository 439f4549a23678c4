"""truncated_dense: the rank-R factors extract writes, against a full SVD."""

import numpy as np
import pytest

from adapterhub.algebra import lowrank
from adapterhub.algebra.lowrank import truncated_dense


def _best_error(delta: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2)))


def _actual_error(delta: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray) -> float:
    d = delta.astype(np.float64)
    return float(np.linalg.norm(d - (lora_a @ lora_b).T) / np.linalg.norm(d))


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_a_fused_lora_is_recovered_exactly_and_its_error_is_the_true_one(shape):
    rng = np.random.default_rng(3)
    delta = (rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1])) * 0.01).astype(np.float32)
    lora_a, lora_b, error = truncated_dense(delta, 4)
    assert lora_a.shape == (shape[1], 4) and lora_b.shape == (4, shape[0])
    # Float32 rounding of the delta is all that is lost; the reported error is the measured one.
    assert error < 1e-6 and error == pytest.approx(_actual_error(delta, lora_a, lora_b), rel=1e-3)
    assert error == pytest.approx(_best_error(delta, 4), rel=1e-2)


def test_a_truncation_is_near_the_best_and_reported_as_it_is():
    rng = np.random.default_rng(4)
    # A slowly decaying spectrum: the case power iterations are there for.
    delta = (rng.standard_normal((400, 64)) / np.arange(1, 65) @ rng.standard_normal((64, 300))).astype(np.float32)
    lora_a, lora_b, error = truncated_dense(delta, 8)
    assert error == pytest.approx(_actual_error(delta, lora_a, lora_b), rel=1e-9)
    assert _best_error(delta, 8) <= error < 1.01 * _best_error(delta, 8)


def test_the_same_delta_gives_the_same_factors():
    delta = np.random.default_rng(5).standard_normal((256, 128)).astype(np.float32)
    first, again = truncated_dense(delta, 4), truncated_dense(delta, 4)
    assert all(np.array_equal(x, y) for x, y in zip(first[:2], again[:2])) and first[2] == again[2]


def test_small_and_zero_matrices_are_factored_whole(monkeypatch):
    monkeypatch.setattr(lowrank, "POWER_ITERATIONS", None)  # the randomized path would fail on it
    delta = np.random.default_rng(6).standard_normal((7, 5)).astype(np.float32)
    lora_a, lora_b, error = truncated_dense(delta, 9)
    assert lora_a.shape == (5, 5) and error == 0.0 and _actual_error(delta, lora_a, lora_b) < 1e-12
    lora_a, lora_b, error = truncated_dense(np.zeros((7, 5), np.float32), 2)
    assert error == 0.0 and not (lora_a @ lora_b).any()
    monkeypatch.undo()
    lora_a, lora_b, error = truncated_dense(np.zeros((300, 200), np.float32), 2)
    assert error == 0.0 and np.isfinite(lora_a).all() and not (lora_a @ lora_b).any()
