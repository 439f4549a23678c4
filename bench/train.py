"""Training speed and memory: adapterhub train vs mlx_lm lora on the same model, data, seed and options.

Prints, for each tool, tokens per second (the mean over report windows, the first, which includes
compilation, left out), the final validation loss, the peak memory MLX reports, and the process wall
time; the cost of checkpointing at --save-every 50 (whole-process wall time against a run that never
saves); with --processes N, the same for N ring processes on this machine under mlx.launch, both
tools launched the same way; and the peak memory with and without --grad-checkpoint on long
sequences, for both tools.

    .venv/bin/python bench/train.py [--iters 100] [--processes 2] [--long-iters 4]

mlx_lm lora prints no memory figure: it runs here with a reporting callback that prints the
`peak_memory` mlx-lm hands its callbacks (the process's peak since start, in GB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.tinymodel import write_dataset, write_model  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
# mlx_lm lora with a callback that prints the peak memory mlx-lm measures, and nothing else changed.
MLX_LM_WITH_MEMORY = """
import sys
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

class PeakMemory(TrainingCallback):
    def on_train_loss_report(self, info):
        print(f"peak_memory_gb {info['peak_memory']}", flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: PeakMemory()
sys.argv[0] = "mlx_lm.lora"
lora.main()
"""


def run(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    output = ANSI.sub("", done.stdout + done.stderr)
    # mlx.launch exits 0 whatever its ranks do: a rank's failure shows in its output.
    if done.returncode != 0 or "Traceback" in output or re.search(r"exited with code (?!0 )", output):
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return time.perf_counter() - start, output


def free_port() -> int:
    """A first port for the ring backend with the next few free as well (it listens on port + rank)."""
    while True:
        first = random.randrange(20000, 60000)
        try:
            for port in range(first, first + 8):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def launched(processes: int, command: list[str]) -> list[str]:
    if processes == 1:
        return command
    return [LAUNCH, "--backend", "ring", "-n", str(processes), "--starting-port", str(free_port()), "--", *command]


def mlx_lm_figures(output: str) -> dict:
    speeds = [float(m.group(1).replace(",", ""))
              for m in re.finditer(r"^\s*\d+\s+[\d.]+\s*[▼▲=]?\s+([\d,.]+)\s+[\d.]+k?\s*$", output, re.M)]
    vals = [float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+val\s+([\d.]+)", output, re.M)]
    peaks = [float(m.group(1)) * 1e9 for m in re.finditer(r"peak_memory_gb ([\d.e+-]+)", output)]
    return {"speeds": speeds, "val": vals[-1] if vals else float("nan"), "peak": max(peaks, default=0.0)}


def ours_figures(output: str, show: dict | None = None) -> dict:
    speeds = [float(m.group(1)) for m in re.finditer(r"train loss [\d.]+, ([\d.]+) tok/s", output)]
    vals = [float(m.group(1)) for m in re.finditer(r"validation loss ([\d.]+)", output)]
    peak = show["training"]["peak_memory_bytes"] if show else 0
    return {"speeds": speeds, "val": vals[-1] if vals else float("nan"), "peak": peak}


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.env = dict(os.environ, ADAPTERHUB_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false",
                        PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        self.registry = work / "registry"
        subprocess.run([sys.executable, "-m", "adapterhub.cli", "--quiet", "--registry", str(self.registry), "init"],
                       check=True, env=self.env)
        self.runs = 0

    def mlx_lm(self, model: Path, data: Path, options: list[str], processes: int = 1) -> dict:
        self.runs += 1
        wall, out = run(launched(processes, [sys.executable, "-c", MLX_LM_WITH_MEMORY, "--model", str(model), "--train",
                                             "--data", str(data), "--adapter-path", str(self.work / f"mlx-lm-{self.runs}"),
                                             *options]), self.env)
        return {**mlx_lm_figures(out), "wall": wall}

    def ours(self, model: Path, data: Path, options: list[str], name: str, processes: int = 1) -> dict:
        wall, out = run(launched(processes, [sys.executable, "-m", "adapterhub.cli", "--registry", str(self.registry),
                                             "train", "--base", str(model), "--data", str(data), "--name", name,
                                             *options]), self.env)
        show = json.loads(subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(self.registry), "--json",
                                          "show", name], capture_output=True, text=True, env=self.env).stdout)
        return {**ours_figures(out, show), "wall": wall, "output": out, "show": show}


def speed(figures: dict) -> float:
    speeds = figures["speeds"][1:] or figures["speeds"]
    return statistics.mean(speeds) if speeds else float("nan")


def mb(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1, help="Also train with this many ring processes (mlx.launch).")
    parser.add_argument("--long-iters", type=int, default=4, help="Steps of the long-sequence --grad-checkpoint runs (0: skip).")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-train-bench-"))
    bench = Bench(work)
    model = write_model(work / "model", hidden_size=256, num_layers=4, intermediate_size=512, num_heads=4, num_kv_heads=4)
    data = write_dataset(work / "data", seed=1, sizes=(512, 64, 64))
    it = args.iters
    shared = ["--batch-size", "4", "--num-layers", "4", "--learning-rate", "1e-4", "--seed", "0", "--val-batches", "8",
              "--steps-per-report", "10", "--steps-per-eval", str(it), "--iters", str(it)]
    rows = [("mlx_lm lora", 1, bench.mlx_lm(model, data, [*shared, "--save-every", str(it + 1)])),
            ("adapterhub train", 1, bench.ours(model, data, [*shared, "--save-every", str(it + 1)], "no-checkpoints"))]
    saving = bench.ours(model, data, [*shared, "--save-every", "50"], "checkpoints")
    rows.append(("adapterhub, --save-every 50", 1, saving))
    if args.processes > 1:
        n = args.processes
        rows += [(f"mlx_lm lora, ring x{n}", n, bench.mlx_lm(model, data, [*shared, "--save-every", str(it + 1)], n)),
                 (f"adapterhub train, ring x{n}", n,
                  bench.ours(model, data, [*shared, "--save-every", str(it + 1)], f"ring-{n}", n))]
    print(f"model: llama, 4 layers, hidden 256; {it} iterations, global batch 4, rank 8 on all 4 layers, seed 0")
    print(f"{'tool':<30} {'procs':>5} {'tok/s':>8} {'final val loss':>15} {'peak memory':>12} {'process wall s':>15}")
    for label, processes, figures in rows:
        print(f"{label:<30} {processes:>5} {speed(figures):>8.0f} {figures['val']:>15.4f} {mb(figures['peak']):>12} "
              f"{figures['wall']:>15.2f}")
    by_label = {label: figures for label, _, figures in rows}
    print(f"tokens/s ratio adapterhub / mlx_lm, 1 process: "
          f"{speed(by_label['adapterhub train']) / speed(by_label['mlx_lm lora']):.3f} (target >= 0.97)")
    if args.processes > 1:
        n = args.processes
        ours_n, theirs_n = by_label[f"adapterhub train, ring x{n}"], by_label[f"mlx_lm lora, ring x{n}"]
        print(f"tokens/s ratio adapterhub / mlx_lm, ring x{n}: {speed(ours_n) / speed(theirs_n):.3f}; "
              f"ring x{n} / 1 process: adapterhub {speed(ours_n) / speed(by_label['adapterhub train']):.2f}, "
              f"mlx_lm {speed(theirs_n) / speed(by_label['mlx_lm lora']):.2f} (one machine: the overhead, not a speed-up)")
    saved = sum(float(m.group(1)) for m in re.finditer(r"checkpoint saved in ([\d.]+) s", saving["output"]))
    train_seconds = saving["show"]["training"]["train_seconds"]
    print(f"checkpoint cost at --save-every 50: {saved:.3f} s of saving for {train_seconds:.1f} s of training "
          f"= {100 * saved / train_seconds:.2f} % (target <= 3 %)")
    if args.long_iters:
        long_sequences(bench, args.long_iters)
    print(f"work folder: {work}")


def long_sequences(bench: Bench, iters: int) -> None:
    """Peak memory with and without --grad-checkpoint, where stored activations dominate: ~1000-token rows."""
    work = bench.work
    model = write_model(work / "long-model", hidden_size=256, num_layers=4, intermediate_size=512, num_heads=4, num_kv_heads=4)
    data = work / "long-data"
    data.mkdir()
    row = json.dumps({"text": " ".join(["the cat sees a box ."] * 170)}) + "\n"
    for split, count in (("train", 16), ("valid", 4)):
        (data / f"{split}.jsonl").write_text(row * count)
    options = ["--batch-size", "4", "--num-layers", "4", "--iters", str(iters), "--steps-per-report", "1",
               "--steps-per-eval", str(iters), "--val-batches", "1", "--max-seq-length", "1100", "--save-every", str(iters + 1)]
    figures = {("mlx_lm lora", flag): bench.mlx_lm(model, data, [*options, *([flag] if flag else [])])
               for flag in ("", "--grad-checkpoint")}
    figures |= {("adapterhub train", flag): bench.ours(model, data, [*options, *([flag] if flag else [])],
                                                      "long" + flag.replace("--", "-"))
                for flag in ("", "--grad-checkpoint")}
    print(f"long sequences (~1020 tokens, batch 4, {iters} steps): peak memory")
    print(f"{'tool':<20} {'stored':>12} {'--grad-checkpoint':>18} {'ratio':>7} {'tok/s stored':>13} {'tok/s recomputed':>17}")
    for tool in ("mlx_lm lora", "adapterhub train"):
        stored, recomputed = figures[tool, ""], figures[tool, "--grad-checkpoint"]
        print(f"{tool:<20} {mb(stored['peak']):>12} {mb(recomputed['peak']):>18} {recomputed['peak'] / stored['peak']:>7.2f} "
              f"{speed(stored):>13.0f} {speed(recomputed):>17.0f}")


if __name__ == "__main__":
    main()
