"""How catalogue operations scale: CLI wall time at 10,000 and 100,000 versions.

Fills registries through the library (Registry.register_records for bulk, so a
fill takes minutes, not hours), then times the CLI as a user runs it:
`show`, `list --base`, and `import` of a real adapter whose weights are already
in the hash cache, next to `python -c pass` (the interpreter's own start-up).

    .venv/bin/python bench/registry_scale.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.records import now  # noqa: E402
from adapterhub.registry import Registry  # noqa: E402
from adapterhub.tinymodel import write_dataset, write_model  # noqa: E402
from adapterhub.demo import train_with_mlx_lm  # noqa: E402

VERSIONS_PER_NAME = 20
NAMES_PER_BASE = 100
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def fake_sha(rng: random.Random) -> str:
    return hashlib.sha256(rng.randbytes(16)).hexdigest()


def record(name: str, version: int, base: dict, rng: random.Random) -> dict:
    weights, config = fake_sha(rng), fake_sha(rng)
    return {
        "name": name, "version": version, "sha256": weights, "kind": "lora", "rank": 16, "scale": 20.0, "dropout": 0.0,
        "targets": TARGETS, "layers": list(range(12, 28)), "num_layers": 16, "dtype": "BF16", "num_parameters": 4587520,
        "base": base, "dataset": None,
        "training": {"tool": "mlx_lm", "losses": None, "hyperparameters": {
            "iters": 1000, "batch_size": 4, "learning_rate": 1e-5, "optimizer": "adam", "seed": version,
            "num_layers": 16, "fine_tune_type": "lora", "lora_parameters": {"rank": 16, "scale": 20.0, "dropout": 0.0}}},
        "parents": [], "files": [{"name": "adapters.safetensors", "sha256": weights, "size": 18350080},
                                 {"name": "adapter_config.json", "sha256": config, "size": 812}],
        "tags": {"task": rng.choice(["sql", "chat", "code", "summary"]), "team": f"team-{rng.randrange(40)}"},
        "description": None, "source": None, "created_at": now(),
    }


def fill(root: Path, versions: int, rng: random.Random) -> tuple[str, str]:
    registry = Registry(root)
    registry.init()
    names = versions // VERSIONS_PER_NAME
    bases = max(1, names // NAMES_PER_BASE)
    base_refs = [{"name": f"base-{b}", "sha256": fake_sha(rng), "structure_sha256": fake_sha(rng), "model_type": "llama"}
                 for b in range(bases)]
    # Bases go in through the real catalogue table so `list --base NAME` resolves them.
    from adapterhub.store import open_db

    open_db(registry.catalog / "bases.json").insert_multiple(
        {**b, "config": {"model_type": "llama", "num_hidden_layers": 28, "hidden_size": 3072, "quantization": None},
         "files": [{"name": "model.safetensors", "sha256": b["sha256"], "size": 1}], "tensors": {}, "path": "/nowhere",
         "hf_repo": None, "created_at": now()} for b in base_refs)
    batch: list[dict] = []
    for n in range(names):
        for v in range(1, VERSIONS_PER_NAME + 1):
            batch.append(record(f"adapter-{n:06d}", v, base_refs[n % bases], rng))
        if len(batch) >= 20000:
            registry.register_records(batch)
            batch = []
    if batch:
        registry.register_records(batch)
    return f"adapter-{names // 2:06d}@{VERSIONS_PER_NAME // 2}", base_refs[bases // 2]["name"]


def cli_time(args: list[str], repeats: int = 5) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {done.stderr}")
        out = done.stdout
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="adapterhub-scale-"))
    os.environ["ADAPTERHUB_CACHE"] = str(work / "cache")
    model, data = write_model(work / "model"), write_dataset(work / "data")
    adapter = train_with_mlx_lm(model, data, work / "adapter", iters=2)
    cli = [sys.executable, "-m", "adapterhub.cli"]
    baseline, _ = cli_time([sys.executable, "-c", "pass"])
    print(f"python -c pass: {baseline * 1000:.0f} ms (median of 5)")
    print(f"{'versions':>9} {'fill s':>8} {'show ms':>8} {'list --base ms':>15} {'(rows)':>7} {'import ms':>10}")
    for size in (int(s) for s in args.sizes.split(",")):
        root = work / f"reg-{size}"
        start = time.perf_counter()
        ref, base = fill(root, size, rng)
        filled = time.perf_counter() - start
        reg = ["--registry", str(root)]
        show, _ = cli_time([*cli, *reg, "show", ref])
        listed, out = cli_time([*cli, *reg, "--json", "list", "--base", base])
        rows = out.count('"ref"')
        Registry(root).import_adapter(adapter, "warm-up")  # the adapter's weights are now hashed and stored
        times = []
        for i in range(5):
            t, _ = cli_time([*cli, *reg, "import", str(adapter), "--name", f"scale-import-{i}"], repeats=1)
            times.append(t)
        print(f"{size:>9,} {filled:>8.1f} {show * 1000:>8.0f} {listed * 1000:>15.0f} {rows:>7} {statistics.median(times) * 1000:>10.0f}")
    print(f"target: each CLI time under 500 ms at 100,000 versions; work folder {work}")


if __name__ == "__main__":
    main()
