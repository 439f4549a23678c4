"""How exact a float32 matmul is on the device the tests run on, measured rather than assumed.

On the CPU, MLX multiplies float32 in float32 (relative error ~1e-7). On a GPU a
float32 matmul may run in TF32 (10-bit mantissa, ~1e-3). A test that compares two
float32 computations made of matmuls (logits of two equivalent adapters, a fused
weight against its factors) must allow for what the device does, or it fails on
a GPU for reasons unrelated to what it checks; and it must stay tight on the CPU.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def matmul_relative_error() -> float:
    """Worst relative error of a float32 matmul on mx.default_device(), against float64 numpy."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal((256, 64)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = np.array(mx.array(a) @ mx.array(b), dtype=np.float64)
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def tolerance(cpu: float) -> float:
    """`cpu`, the tolerance a check needs with exact float32 matmuls, widened by the device's matmul error.

    Calibrated so that the CPU keeps `cpu` (its matmul error, ~1e-7, is far below the checks'
    1e-5 to 1e-4), while TF32 (~1e-3) widens a logits check to ~1e-2: still far below the
    differences the checks exist to catch (a missing or doubled adapter moves logits by > 0.1).
    """
    return max(cpu, 10 * matmul_relative_error())
