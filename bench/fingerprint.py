"""Fingerprinting speed: a generated ~2 GB sharded model, cold and warm, against plain hashlib.

Cold means an empty hash cache (the files are in the OS page cache for every
contender, since the hashlib loop runs first over the same files); warm means
an unchanged model whose hashes are cached by (path, size, mtime, inode).

    .venv/bin/python bench/fingerprint.py [--gb 2] [--shards 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.fingerprint import HashCache, fingerprint_model  # noqa: E402

TENSOR_SHAPE = (4096, 4096)  # BF16: 32 MiB each


def write_shard(path: Path, first: int, count: int, rng: np.random.Generator) -> None:
    nbytes = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    header = {f"model.layers.{first + i}.mlp.up_proj.weight": {"dtype": "BF16", "shape": list(TENSOR_SHAPE),
                                                              "data_offsets": [i * nbytes, (i + 1) * nbytes]}
              for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            f.write(rng.bytes(nbytes))


def make_model(folder: Path, gb: float, shards: int) -> list[Path]:
    folder.mkdir(parents=True)
    per_tensor = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    tensors = max(shards, round(gb * 2**30 / per_tensor))
    rng = np.random.default_rng(0)
    files, done = [], 0
    for s in range(shards):
        count = tensors // shards + (s < tensors % shards)
        path = folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_shard(path, done, count, rng)
        files.append(path)
        done += count
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": done, "hidden_size": 4096,
                                                    "vocab_size": 32000}))
    return files


def hashlib_loop(files: list[Path]) -> None:
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-fp-"))
    files = make_model(work / "model", args.gb, args.shards)
    size = sum(p.stat().st_size for p in files) / 1e9
    print(f"model: {len(files)} shards, {size:.2f} GB in {work / 'model'}")
    hashlib_loop(files)  # bring every file into the page cache, for every contender alike
    t_loop, _ = timed(lambda: hashlib_loop(files))
    cache_file = work / "cache.json"
    t_cold, cold = timed(lambda: fingerprint_model(work / "model", HashCache(cache_file)))
    warm_times = []
    for _ in range(5):
        t, warm = timed(lambda: fingerprint_model(work / "model", HashCache(cache_file)))
        warm_times.append(t)
    assert warm["sha256"] == cold["sha256"]
    t_warm = sorted(warm_times)[len(warm_times) // 2]
    env = {"ADAPTERHUB_CACHE": str(work), "PATH": ""}
    cli = [sys.executable, "-m", "adapterhub.cli", "--registry", str(work / "reg"), "--quiet", "base", "add", str(work / "model")]
    subprocess.run(cli, check=True, env=env)
    t_cli, _ = timed(lambda: subprocess.run(cli, check=True, env=env))
    print(f"{'plain hashlib loop (1 thread)':<34} {t_loop:7.2f} s  {size / t_loop:5.2f} GB/s")
    print(f"{'adapterhub cold (empty cache)':<34} {t_cold:7.2f} s  {size / t_cold:5.2f} GB/s  ({t_loop / t_cold:.2f}x hashlib)")
    print(f"{'adapterhub warm (median of 5)':<34} {t_warm * 1000:7.1f} ms  (target < 50 ms)")
    print(f"{'CLI base add, warm (whole process)':<34} {t_cli * 1000:7.1f} ms")
    print(f"work folder (delete when done): {work}")


if __name__ == "__main__":
    main()
