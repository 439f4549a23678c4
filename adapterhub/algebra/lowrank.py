"""Low-rank factor algebra shared by stack and extract: exact sums, truncated SVD, mlx-lm folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store import write_json


def truncated(b_t: np.ndarray, a_t: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-R factors of the product b_t @ a_t ((out, k) @ (k, in)), never forming it.

    QR of both factors reduces the SVD to a k×k core, so the cost follows the
    stacked rank k, not the matrix size. Returns (lora_a (in, R), lora_b (R, out),
    share of the energy kept).
    """
    q_b, r_b = np.linalg.qr(b_t.astype(np.float64))
    q_a, r_a = np.linalg.qr(a_t.T.astype(np.float64))
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    rank = min(rank, s.size)
    total = float(np.sum(s ** 2))
    kept = float(np.sum(s[:rank] ** 2)) / total if total > 0 else 1.0
    left = (q_b @ u[:, :rank]) * s[:rank]  # (out, R)
    right = q_a @ vt[:rank].T  # (in, R)
    return right, left.T, kept


def truncated_dense(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-R factors of a dense (out, in) difference; returns (lora_a, lora_b, relative error)."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    rank = min(rank, s.size)
    total = float(np.sum(s ** 2))
    error = float(np.sqrt(np.sum(s[rank:] ** 2) / total)) if total > 0 else 0.0
    return vt[:rank].T, (u[:, :rank] * s[:rank]).T, error


def write_mlx_adapter(folder: Path, weights: dict[str, np.ndarray], rank: int, scale: float, num_layers: int,
                      keys: list[str], dtype: str = "float32", extra: dict | None = None) -> Path:
    """An adapter folder in exactly the layout mlx_lm.load(adapter_path=...) reads."""
    import mlx.core as mx

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: mx.array(np.ascontiguousarray(v, dtype=np.float32)).astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "adapters.safetensors"), arrays)
    write_json(folder / "adapter_config.json", {
        "fine_tune_type": "lora", "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}, **(extra or {})})
    return folder
