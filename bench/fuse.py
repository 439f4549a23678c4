"""Fuse speed and memory: adapterhub fuse vs mlx_lm fuse vs cp -r, measured in one run.

Generates random bf16 models with real shapes (Qwen2.5-0.5B-like and
Llama-3.2-3B-like, llama architecture, sharded as the Hub does at 5 GB) and a
rank-16 LoRA on q/k/v/o of every layer, then runs each contender in its own
process and reads its wall time and peak RSS. Also prints the restore data
size as a share of the fused model and whether the fused tensors are
bit-identical to mlx_lm's.

    .venv/bin/python bench/fuse.py [--models qwen-0.5b,llama-3b]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "qwen-0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256),
}
SHARD_BYTES = 5 * 10**9
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    head = c["hidden_size"] // c["num_attention_heads"]
    kv = head * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c["hidden_size"],), p + "post_attention_layernorm.weight": (c["hidden_size"],),
            p + "self_attn.q_proj.weight": (c["hidden_size"], c["hidden_size"]), p + "self_attn.k_proj.weight": (kv, c["hidden_size"]),
            p + "self_attn.v_proj.weight": (kv, c["hidden_size"]), p + "self_attn.o_proj.weight": (c["hidden_size"], c["hidden_size"]),
            p + "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
            p + "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
            p + "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"]),
        })
    return shapes


def bf16_pool(n: int, rng) -> np.ndarray:
    """Valid bf16 values (normal, std 0.02) as uint16 bits: the top half of float32."""
    return (rng.normal(0, 0.02, n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_model(folder: Path, config: dict, rng) -> None:
    folder.mkdir(parents=True)
    shapes = tensor_shapes(config)
    pool = bf16_pool(1 << 24, rng)
    shards, current, size = [], [], 0
    for name in sorted(shapes):
        nbytes = int(np.prod(shapes[name])) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                count = int(np.prod(shapes[name]))
                start = int(rng.integers(0, pool.size // 2))
                while count:
                    take = min(count, pool.size - start)
                    f.write(pool[start:start + take].tobytes())
                    count -= take
                    start = 0
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * 2 for s in shapes.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **config,
                                                    "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
                                                    "torch_dtype": "bfloat16", "max_position_embeddings": 4096}))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from adapterhub.tinymodel import write_tokenizer

    write_tokenizer(folder)


def write_adapter(folder: Path, config: dict, rng, rank: int = 16) -> None:
    import mlx.core as mx

    folder.mkdir(parents=True)
    shapes = tensor_shapes(config)
    weights = {}
    for i in range(config["num_hidden_layers"]):
        for t in TARGETS:
            out_dim, in_dim = shapes[f"model.layers.{i}.self_attn.{t}.weight"]
            weights[f"model.layers.{i}.self_attn.{t}.lora_a"] = mx.array(rng.uniform(-1, 1, (in_dim, rank)).astype(np.float32) / np.sqrt(in_dim))
            weights[f"model.layers.{i}.self_attn.{t}.lora_b"] = mx.array(rng.normal(0, 0.01, (rank, out_dim)).astype(np.float32))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": config["num_hidden_layers"],
        "lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": [f"self_attn.{t}" for t in TARGETS]}}))


def measure(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, read by GNU time.

    Not os.wait4 on our own child: a child forked from this (large) process keeps
    its parent's peak RSS across exec, which would inflate every figure.
    """
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "RSS_KB %M", *command], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    rss_kb = int(done.stderr.rsplit("RSS_KB ", 1)[1].split()[0])
    return wall, rss_kb / 1024


def bit_identical(ours: Path, theirs: Path) -> bool:
    import mlx.core as mx

    def tensors(folder):
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            found.update(mx.load(str(f)))
        return found

    a, b = tensors(ours), tensors(theirs)
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen-0.5b,llama-3b")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-fuse-bench-"))
    env = dict(os.environ, ADAPTERHUB_CACHE=str(work / "cache"), ADAPTERHUB_REGISTRY=str(work / "registry"))
    python, rng = sys.executable, np.random.default_rng(0)
    buffer = rng.bytes(256 << 20)
    start = time.perf_counter()
    hashlib.sha256(buffer).hexdigest()
    print(f"sha256 on this CPU: {0.25 / (time.perf_counter() - start):.2f} GB/s (hashing every written byte is part of our fuse)")
    print(f"{'model':<10} {'GB':>5} {'tool':<16} {'wall s':>7} {'peak RSS MB':>12} {'vs cp -r':>9}")
    for name in args.models.split(","):
        config = SHAPES[name]
        model, adapter = work / name, work / f"{name}-lora"
        write_model(model, config, rng)
        write_adapter(adapter, config, rng)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
        cli = [python, "-m", "adapterhub.cli", "--quiet"]
        subprocess.run([*cli, "import", str(adapter), "--name", f"{name}-lora", "--base", str(model)], check=True, env=env)
        results = {}
        results["cp -r"] = measure(["cp", "-r", str(model), str(work / f"{name}-cp")])
        results["adapterhub fuse"] = measure([*cli, "fuse", f"{name}-lora", "--base", str(model), "--out", str(work / f"{name}-ours")], env)
        results["mlx_lm fuse"] = measure([python, "-m", "mlx_lm", "fuse", "--model", str(model), "--adapter-path", str(adapter),
                                          "--save-path", str(work / f"{name}-mlx")], env)
        cp_wall = results["cp -r"][0]
        for tool, (wall, rss) in results.items():
            print(f"{name:<10} {size:>5.2f} {tool:<16} {wall:>7.2f} {rss:>12.0f} {wall / cp_wall:>8.2f}x")
        record = json.loads((work / f"{name}-ours" / "adapterhub.json").read_text())
        fused_size = sum(f["size"] for f in record["files"])
        largest = max(int(np.prod(s)) * 2 for s in tensor_shapes(config).values()) / 2**20
        print(f"{name:<10} restore data {record['restore']['size'] / 1e6:.1f} MB = {100 * record['restore']['size'] / fused_size:.2f} % "
              f"of the fused model; largest tensor {largest:.0f} MB; "
              f"bit-identical to mlx_lm: {bit_identical(work / f'{name}-ours', work / f'{name}-mlx')}")
        for suffix in ("-cp", "-mlx"):
            shutil.rmtree(work / f"{name}{suffix}")
    print(f"targets: fuse <= 1.5x cp -r; peak RSS < 1 GB + largest tensor; restore <= 5 %. Work folder: {work}")


if __name__ == "__main__":
    main()
