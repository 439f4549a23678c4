"""LoReFT vs LoRA on the same small completion task, both trained by `adapterhub train`.

Prints, for each: trainable parameters, validation loss at the start and the
end, test perplexity, tokens per second (mean over report windows after the
first, which includes compilation) and whole-process wall time. Same model,
data, seed, iterations, batch size and learning rate for both; LoReFT edits
the last prompt token at every layer (l1, rank 4), LoRA adapts every linear
layer of every decoder layer (rank 8), mlx-lm's default targets.

    .venv/bin/python bench/loreft.py [--iters 100]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-loreft-bench-"))
    env = dict(os.environ, ADAPTERHUB_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false")
    model = write_model(work / "model", hidden_size=128, num_layers=4, intermediate_size=256, num_heads=4, num_kv_heads=4)
    data = write_dataset(work / "data", seed=1, style="colours", sizes=(512, 64, 64))
    it = args.iters
    shared = ["--base", str(model), "--data", str(data), "--iters", str(it), "--batch-size", "4", "--learning-rate", "2e-3",
              "--seed", "0", "--val-batches", "16", "--steps-per-report", "10", "--steps-per-eval", str(it),
              "--save-every", str(it + 1)]
    runs = {
        "LoRA rank 8, all linear, 4 layers": ["--kind", "lora", "--rank", "8", "--num-layers", "4", "--mask-prompt"],
        "LoReFT rank 4, l1, 4 layers": ["--kind", "loreft", "--rank", "4", "--layers", "all", "--positions", "l1"],
    }
    print(f"model: llama, 4 layers, hidden 128; data: colours prompt/completion (512 train); {it} iterations, batch 4, lr 2e-3")
    print(f"{'adapter':<36} {'params':>8} {'val start':>10} {'val end':>9} {'test ppl':>9} {'tok/s':>7} {'wall s':>7}")
    for i, (label, options) in enumerate(runs.items()):
        command = [sys.executable, "-m", "adapterhub.cli", "--registry", str(work / "registry"), "train",
                   "--name", f"bench-{i}", *shared, *options]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
        speeds, _ = ours_figures(done.stderr)
        shown = json.loads(subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(work / "registry"),
                                           "--json", "show", f"bench-{i}"], capture_output=True, text=True, env=env).stdout)
        val = shown["training"]["losses"]["val"]
        print(f"{label:<36} {shown['num_parameters']:>8,} {val[0][1]:>10.4f} {val[-1][1]:>9.4f} "
              f"{shown['training']['test_perplexity']:>9.3f} {statistics.mean(speeds[1:]):>7.0f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
