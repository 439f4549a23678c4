"""LoReFT vs LoRA on the same small completion task, both trained by `adapterhub train`.

Prints, for each: trainable parameters, validation loss at the start and the
end, test perplexity, tokens per second (mean over report windows after the
first, which includes compilation) and whole-process wall time; then the ratio
of LoReFT's tokens per second to LoRA's, and how far LoReFT's trained rotations
are from orthonormal rows (max |R Rᵀ − I|, in float64 on the host). Same model,
data, seed, iterations, batch size and learning rate for both; LoReFT edits the
last prompt token at every layer (l1, rank 4), LoRA adapts every linear layer
of every decoder layer (rank 8), mlx-lm's default targets.

    .venv/bin/python bench/loreft.py [--iters 100] [--repeats 1]
    .venv/bin/python bench/loreft.py --shape 0.5b      # Qwen2-0.5B's layer shapes, bfloat16: for a GPU
    .venv/bin/python bench/loreft.py --shape 1b        # Llama-3.2-1B's layer shapes, bfloat16: for a GPU

The default shape is small enough for a CPU. The larger ones keep a real model's
hidden size, depth and MLP width (the vocabulary stays the tiny tokenizer's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.tinymodel import write_dataset, write_model  # noqa: E402
from bench.train import ours_figures  # noqa: E402

# name -> (write_model arguments, dtype)
SHAPES = {
    "small": (dict(hidden_size=128, num_layers=4, intermediate_size=256, num_heads=4, num_kv_heads=4), "float32"),
    "0.5b": (dict(hidden_size=896, num_layers=24, intermediate_size=4864, num_heads=14, num_kv_heads=2), "bfloat16"),
    "1b": (dict(hidden_size=2048, num_layers=16, intermediate_size=8192, num_heads=32, num_kv_heads=8), "bfloat16"),
}


def rotation_error(adapter: Path) -> float:
    """max |R Rᵀ − I| over every rotation in an adapter file, in float64 on the host."""
    import mlx.core as mx
    import numpy as np

    worst = 0.0
    for name, value in mx.load(str(adapter)).items():
        if name.endswith(".rotate"):
            rows = np.array(value.astype(mx.float32), dtype=np.float64)
            worst = max(worst, float(np.abs(rows @ rows.T - np.eye(rows.shape[0])).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times (noisy machines)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-loreft-bench-"))
    env = dict(os.environ, ADAPTERHUB_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false")
    registry = str(work / "registry")
    subprocess.run([sys.executable, "-m", "adapterhub.cli", "--quiet", "--registry", registry, "init"], check=True, env=env)
    shape, dtype = SHAPES[args.shape]
    model = write_model(work / "model", dtype=dtype, **shape)
    data = write_dataset(work / "data", seed=1, style="colours", sizes=(512, 64, 64))
    it, layers = args.iters, shape["num_layers"]
    shared = ["--base", str(model), "--data", str(data), "--iters", str(it), "--batch-size", str(args.batch_size),
              "--learning-rate", "2e-3", "--seed", "0", "--val-batches", "16", "--steps-per-report", "10",
              "--steps-per-eval", str(it), "--save-every", str(it + 1)]
    runs = {
        f"LoRA rank 8, all linear, {layers} layers": ["--kind", "lora", "--rank", "8", "--num-layers", str(layers),
                                                      "--mask-prompt"],
        f"LoReFT rank 4, l1, {layers} layers": ["--kind", "loreft", "--rank", "4", "--layers", "all", "--positions", "l1"],
    }
    print(f"model: llama, {layers} layers, hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, {dtype}; "
          f"data: colours prompt/completion (512 train); {it} iterations, batch {args.batch_size}, lr 2e-3")
    print(f"{'adapter':<38} {'params':>10} {'val start':>10} {'val end':>9} {'test ppl':>9} {'tok/s':>8} {'wall s':>7}")
    speeds: dict[str, list[float]] = {label: [] for label in runs}
    error = None
    for repeat in range(args.repeats):
        for i, (label, options) in enumerate(runs.items()):
            name = f"bench-{i}-{repeat}"
            command = [sys.executable, "-m", "adapterhub.cli", "--registry", registry, "train", "--name", name,
                       *shared, *options]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
            speed = statistics.mean(ours_figures(done.stderr)["speeds"][1:])
            speeds[label].append(speed)
            shown = json.loads(subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", registry, "--json",
                                               "show", name], capture_output=True, text=True, env=env).stdout)
            val = shown["training"]["losses"]["val"]
            print(f"{label:<38} {shown['num_parameters']:>10,} {val[0][1]:>10.4f} {val[-1][1]:>9.4f} "
                  f"{shown['training']['test_perplexity']:>9.3f} {speed:>8.0f} {wall:>7.1f}", flush=True)
            if options[1] == "loreft":
                run_dir = Path(registry) / "runs" / shown["training"]["run_id"]
                error = max(error or 0.0, rotation_error(run_dir / "adapter" / "adapters.safetensors"))
    lora, reft = (statistics.median(v) for v in speeds.values())
    print(f"tokens/s LoReFT / LoRA: {reft:.0f} / {lora:.0f} = {reft / lora:.3f} (median of {args.repeats}; "
          "target >= 1)")
    print(f"LoReFT rotations after training: max |R Rᵀ − I| = {error:.2e} (float64 on the host; target <= 1e-5)")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
