"""Training speed: adapterhub train vs mlx_lm lora on the same model, data, seed and options.

Prints tokens per second of each (the mean over report windows, the first,
which includes compilation, left out), their ratio, the cost of checkpointing
at --save-every 50 (whole-process wall time against a run that never saves),
and both runs' final validation loss.

    .venv/bin/python bench/train.py [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.tinymodel import write_dataset, write_model  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start, ANSI.sub("", done.stdout + done.stderr)


def mlx_lm_figures(output: str) -> tuple[list[float], float]:
    speeds = [float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+[\d.]+\s*[▼▲=]?\s+([\d.]+)\s+[\d.]+k?\s*$", output, re.M)]
    vals = [float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+val\s+([\d.]+)", output, re.M)]
    return speeds, vals[-1]


def ours_figures(output: str) -> tuple[list[float], float]:
    speeds = [float(m.group(1)) for m in re.finditer(r"train loss [\d.]+, ([\d.]+) tok/s", output)]
    vals = [float(m.group(1)) for m in re.finditer(r"validation loss ([\d.]+)", output)]
    return speeds, vals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-train-bench-"))
    env = dict(os.environ, ADAPTERHUB_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "adapterhub.cli", "--quiet", "--registry", str(work / "registry"), "init"],
                   check=True, env=env)
    model = write_model(work / "model", hidden_size=256, num_layers=4, intermediate_size=512, num_heads=4, num_kv_heads=4)
    data = write_dataset(work / "data", seed=1, sizes=(512, 64, 64))
    it = args.iters
    shared = ["--batch-size", "4", "--num-layers", "4", "--learning-rate", "1e-4", "--seed", "0", "--val-batches", "8",
              "--steps-per-report", "10", "--steps-per-eval", str(it)]
    upstream_wall, upstream_out = run([sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data",
                                       str(data), "--iters", str(it), "--save-every", str(it + 1),
                                       "--adapter-path", str(work / "upstream"), *shared], env)
    ours = [sys.executable, "-m", "adapterhub.cli", "--registry", str(work / "registry"), "train", "--base", str(model),
            "--data", str(data), "--iters", str(it), *shared]
    no_save_wall, no_save_out = run([*ours, "--name", "no-checkpoints", "--save-every", str(it + 1)], env)
    save_wall, save_out = run([*ours, "--name", "checkpoints", "--save-every", "50"], env)
    up_speeds, up_val = mlx_lm_figures(upstream_out)
    our_speeds, our_val = ours_figures(no_save_out)
    up, mine = statistics.mean(up_speeds[1:]), statistics.mean(our_speeds[1:])
    print(f"model: llama, 4 layers, hidden 256; {it} iterations, batch 4, rank 8 on all 4 layers, seed 0")
    print(f"{'tool':<28} {'tok/s':>8} {'final val loss':>15} {'process wall s':>15}")
    print(f"{'mlx_lm lora':<28} {up:>8.0f} {up_val:>15.4f} {upstream_wall:>15.2f}")
    print(f"{'adapterhub train':<28} {mine:>8.0f} {our_val:>15.4f} {no_save_wall:>15.2f}")
    print(f"{'adapterhub, --save-every 50':<28} {statistics.mean(ours_figures(save_out)[0][1:]):>8.0f} "
          f"{ours_figures(save_out)[1]:>15.4f} {save_wall:>15.2f}")
    print(f"tokens/s ratio adapterhub / mlx_lm: {mine / up:.3f} (target >= 0.97)")
    saving = sum(float(m.group(1)) for m in re.finditer(r"checkpoint saved in ([\d.]+) s", save_out))
    train_seconds = json.loads(subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(work / "registry"),
                                               "--json", "show", "checkpoints"], capture_output=True, text=True,
                                              env=env).stdout)["training"]["train_seconds"]
    print(f"checkpoint cost at --save-every 50: {saving:.3f} s of saving for {train_seconds:.1f} s of training "
          f"= {100 * saving / train_seconds:.2f} % (target <= 3 %)")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
