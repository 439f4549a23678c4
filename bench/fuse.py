"""Fuse speed and memory: adapterhub fuse vs mlx_lm fuse vs cp -r, measured in one run.

Generates random bf16 models with real shapes (Qwen2.5-0.5B-like and
Llama-3.2-3B-like, llama architecture, sharded as the Hub does at 5 GB) and a
rank-16 LoRA on q/k/v/o of every layer, then runs each contender in its own
process and reads its wall time and peak RSS (GNU time). Also prints the
restore data size as a share of the fused model, whether the fused tensors
are bit-identical to mlx_lm's, and where our fuse spent its time
(ADAPTERHUB_PROFILE=1).

Fairness. The page cache makes a copy-vs-fuse comparison depend on what ran
before, so every run starts from the same state: the previous output is
deleted, `sync` flushes what is still dirty (no contender pays for another's
writeback), and the base model is read through once (every contender reads
it from the cache). The contenders run in a rotated order in each of
--repeats rounds, and the table shows each one's median. `cp -r` leaves its
copy in the page cache for the kernel to write later, while fuse fsyncs every
file it writes before registering it; `cp -r + sync` is the like-for-like
durable copy, shown beside it (the targets are against plain `cp -r`).

    .venv/bin/python bench/fuse.py [--models qwen-0.5b,llama-3b] [--repeats 3]

Needs about 4x the largest model free on the temporary folder's disk; the work
folder is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "qwen-0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256),
}
SHARD_BYTES = 5 * 10**9
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONTENDERS = ("cp -r", "cp -r + sync", "adapterhub fuse", "mlx_lm fuse")


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


def settle(model: Path) -> None:
    """The same start for every run: nothing dirty left to write back, the base model in the page cache."""
    subprocess.run(["sync"], check=True)
    buffer = bytearray(64 << 20)
    for f in sorted(model.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as src:
                while src.readinto(buffer):
                    pass


def measure(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stderr of one command, the RSS read by GNU time.

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
    return wall, rss_kb / 1024, done.stderr


def hash_seconds(path: Path) -> float:
    buffer = memoryview(bytearray(8 << 20))
    digest = hashlib.sha256()
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return time.perf_counter() - start


def bit_identical(ours: Path, theirs: Path) -> bool:
    """Every tensor of mlx_lm's output equal, bit for bit, to ours: read one at a time, so memory stays small."""
    from adapterhub.safetensors_io import read_bits, read_header

    def index(folder):
        return {name: h for f in sorted(folder.glob("*.safetensors")) for h in [read_header(f)] for name in h.tensors}

    a, b = index(ours), index(theirs)
    return a.keys() == b.keys() and all(
        a[k].tensors[k].dtype == b[k].tensors[k].dtype and np.array_equal(read_bits(a[k], k), read_bits(b[k], k)) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen-0.5b,llama-3b")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every contender; the median is shown")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-fuse-bench-"))
    env = dict(os.environ, ADAPTERHUB_CACHE=str(work / "cache"), ADAPTERHUB_REGISTRY=str(work / "registry"),
               PYTHONPATH=str(ROOT))
    python, rng = sys.executable, np.random.default_rng(0)
    cli = [python, "-m", "adapterhub.cli", "--quiet"]
    try:
        subprocess.run([*cli, "init"], check=True, env=env)
        buffer = rng.bytes(256 << 20)
        start = time.perf_counter()
        hashlib.sha256(buffer).hexdigest()
        print(f"sha256 on this CPU: {0.25 / (time.perf_counter() - start):.2f} GB/s; {os.cpu_count()} cores; "
              f"median of {args.repeats} rounds, contenders rotated")
        print(f"{'model':<10} {'GB':>5} {'tool':<16} {'wall s':>7} {'peak RSS MB':>12} {'vs cp -r':>9}  rounds (s)")
        verdicts = []
        for name in args.models.split(","):
            verdicts.append(bench_model(name, work, env, cli, python, rng, args.repeats))
        print("targets: fuse <= 2.0x cp -r and faster than mlx_lm fuse; peak RSS <= 1 GB + largest tensor; "
              "restore data <= 5 %; bit-identical to mlx_lm")
        for line in verdicts:
            print(line)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench_model(name: str, work: Path, env: dict, cli: list[str], python: str, rng, repeats: int) -> str:
    config = SHAPES[name]
    model, adapter = work / name, work / f"{name}-lora"
    write_model(model, config, rng)
    write_adapter(adapter, config, rng)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
    # Registers the base and fills the hash cache, as a user's earlier import would have.
    subprocess.run([*cli, "import", str(adapter), "--name", f"{name}-lora", "--base", str(model)], check=True, env=env)
    runs = {tool: [] for tool in CONTENDERS}
    profiles, outputs = [], {}
    for round_ in range(repeats):
        order = CONTENDERS[round_ % len(CONTENDERS):] + CONTENDERS[:round_ % len(CONTENDERS)]
        for tool in order:
            if tool in outputs:
                shutil.rmtree(outputs[tool])
            # A new folder each round: the registry protects the folder it recorded the last fused model in.
            out = outputs[tool] = work / f"{name}-{CONTENDERS.index(tool)}-{round_}"
            command = {
                "cp -r": ["cp", "-r", str(model), str(out)],
                "cp -r + sync": ["sh", "-c", f"cp -r '{model}' '{out}' && sync"],
                "adapterhub fuse": [*cli, "fuse", f"{name}-lora", "--base", str(model), "--out", str(out), "--no-fidelity"],
                "mlx_lm fuse": [python, "-m", "mlx_lm", "fuse", "--model", str(model), "--adapter-path", str(adapter),
                                "--save-path", str(out)],
            }[tool]
            settle(model)
            wall, rss, stderr = measure(command, dict(env, ADAPTERHUB_PROFILE="1"))
            runs[tool].append((wall, rss))
            if tool == "adapterhub fuse":
                profiles.append(next((line for line in stderr.splitlines() if line.startswith("profile")), ""))
    cp_wall = statistics.median(w for w, _ in runs["cp -r"])
    medians = {}
    for tool in CONTENDERS:
        wall = statistics.median(w for w, _ in runs[tool])
        rss = max(r for _, r in runs[tool])
        medians[tool] = (wall, rss)
        rounds = " ".join(f"{w:.1f}" for w, _ in runs[tool])
        print(f"{name:<10} {size:>5.2f} {tool:<16} {wall:>7.2f} {rss:>12.0f} {wall / cp_wall:>8.2f}x  {rounds}")
    for line in profiles:
        print(f"{name:<10} {line}")
    record = json.loads((outputs["adapterhub fuse"] / "adapterhub.json").read_text())
    fused_size = sum(f["size"] for f in record["files"])
    largest = max(int(np.prod(s)) * 2 for s in tensor_shapes(config).values()) / 2**20
    restore = record["restore"]["size"] / fused_size
    identical = bit_identical(outputs["adapterhub fuse"], outputs["mlx_lm fuse"])
    ours, theirs = medians["adapterhub fuse"], medians["mlx_lm fuse"]
    print(f"{name:<10} restore data {record['restore']['size'] / 1e6:.1f} MB = {100 * restore:.2f} % of the fused model; "
          f"largest tensor {largest:.0f} MB; bit-identical to mlx_lm: {identical}")
    # sha256 is sequential within a file: hashing the largest shard, from the page cache, on one core,
    # bounds any fuse that hashes what it writes (fuse's records and the Hub identify files by it).
    floor = hash_seconds(max(model.glob("*.safetensors"), key=lambda p: p.stat().st_size))
    print(f"{name:<10} floor: sha256 of the largest shard alone takes {floor:.2f} s = {floor / cp_wall:.2f}x cp -r")
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(model)
    checks = {"fuse <= 2.0x cp -r": ours[0] <= 2.0 * cp_wall, "faster than mlx_lm": ours[0] < theirs[0],
              "RSS <= 1 GB + largest tensor": ours[1] <= 1024 + largest, "restore <= 5 %": restore <= 0.05,
              "bit-identical": identical}
    return (f"{name:<10} fuse {ours[0] / cp_wall:.2f}x cp -r, {ours[0] / theirs[0]:.2f}x mlx_lm, "
            f"RSS {ours[1]:.0f} MB of {1024 + largest:.0f} allowed: "
            + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))


if __name__ == "__main__":
    main()
