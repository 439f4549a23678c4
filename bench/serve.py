"""`adapterhub serve` under load: requests spread over 1, 2 and 8 adapters of one base, against mlx_lm.server.

N concurrent clients on loopback send R completion requests each (greedy, a distinct prompt per request,
so no prompt cache helps either server); request i of client c asks for adapter (c + i) mod K. For
K = 1, 2 and 8 it prints generated tokens per second (all clients together, wall clock) and the p50 /
p95 request latency; then the same workload against `mlx_lm.server` started on the same base, where
each request names its adapter folder (`"adapters": PATH`, which mlx_lm.server loads by reloading the
model whenever it differs from the last request's). Both servers get one warm-up request per adapter
first. Everything is built in a temporary folder and both servers are stopped at the end.

    .venv/bin/python bench/serve.py [--clients 8] [--requests 4] [--max-tokens 32] [--shape tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.tinymodel import sentences, write_adapter, write_model  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=4, intermediate_size=128, num_heads=4, num_kv_heads=2),
    "small": dict(hidden_size=256, num_layers=8, intermediate_size=512, num_heads=8, num_kv_heads=4),
}
ADAPTERS = 8
START_TIMEOUT = 120  # seconds a server may take to start before the bench gives up


def build(root: Path, shape: str) -> tuple[Path, Path, list[Path]]:
    """A base, 8 rank-8 LoRA adapters on every layer, and a registry holding them as ad-0 ... ad-7."""
    from adapterhub.registry import Registry

    base = write_model(root / "base", seed=0, **SHAPES[shape])
    folders = [write_adapter(base, root / f"ad-{i}", rank=8, num_layers=SHAPES[shape]["num_layers"], seed=i)
               for i in range(ADAPTERS)]
    registry = Registry(root / "registry")
    registry.init()
    registry.add_base(base, name="bench-base")
    for i, folder in enumerate(folders):
        registry.import_adapter(folder, f"ad-{i}", base=base)
    return base, root / "registry", folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before it answered {url}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"no answer from {url} within {START_TIMEOUT} s")


def start_ours(registry: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "adapterhub.cli", "--registry", str(registry), "serve", "--port", str(port),
               "--max-adapters", str(ADAPTERS)]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for(f"http://127.0.0.1:{port}/health", process)
    return process, f"http://127.0.0.1:{port}/v1"


def start_mlx_lm(base: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(base), "--port", str(port),
               "--log-level", "WARNING"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for(f"http://127.0.0.1:{port}/v1/models", process)
    return process, f"http://127.0.0.1:{port}/v1"


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_load(url: str, request_for, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, `requests` requests each; tokens/s over the wall clock, latency percentiles."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    latencies, tokens, failures = [], [], []
    lock = threading.Lock()

    def one_client(c: int) -> None:
        for i in range(requests):
            model, extra = request_for(c, i)
            prompt = sentences(1, seed=1000 * c + i)[0]["text"]
            started = time.perf_counter()
            try:
                answer = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                   extra_body=extra)
            except Exception as e:  # noqa: BLE001 - counted and shown, the bench goes on
                with lock:
                    failures.append(str(e)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens.append(answer.usage.completion_tokens)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"requests": len(latencies), "failures": failures, "tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "p50_ms": percentile(0.50), "p95_ms": percentile(0.95)}


def line(label: str, adapters: int, figures: dict) -> str:
    failed = f", {len(figures['failures'])} failed" if figures["failures"] else ""
    return (f"{label:<17} {adapters} adapter(s): {figures['tokens_per_s']:8.1f} tok/s   p50 {figures['p50_ms']:7.0f} ms   "
            f"p95 {figures['p95_ms']:7.0f} ms   ({figures['requests']} requests, {figures['tokens']} tokens, "
            f"{figures['wall_s']:.1f} s{failed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--skip-mlx-lm", action="store_true", help="measure adapterhub serve only")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        os.environ["ADAPTERHUB_CACHE"] = str(root / "cache")
        base, registry, folders = build(root, args.shape)
        rows = []
        servers = [("adapterhub serve", lambda: start_ours(registry, root / "ours.log"),
                    lambda k: lambda c, i: (f"ad-{(c + i) % k}", None))]
        if not args.skip_mlx_lm:
            servers.append(("mlx_lm.server", lambda: start_mlx_lm(base, root / "mlx_lm.log"),
                            lambda k: lambda c, i: ("default_model", {"adapters": str(folders[(c + i) % k])})))
        for label, start, requests_for in servers:
            process, url = start()
            try:
                run_load(url, requests_for(ADAPTERS), ADAPTERS, 1, 4)  # warm-up: every adapter once
                for k in (1, 2, 8):
                    figures = run_load(url, requests_for(k), args.clients, args.requests, args.max_tokens)
                    rows.append((label, k, figures))
                    print(line(label, k, figures), flush=True)
            finally:
                stop(process)
        ours = {k: f["tokens_per_s"] for label, k, f in rows if label == "adapterhub serve"}
        theirs = {k: f["tokens_per_s"] for label, k, f in rows if label == "mlx_lm.server"}
        print(f"\nadapterhub serve, 8 adapters / 1 adapter: {ours[8] / ours[1]:.2f}x (target >= 0.8)")
        if theirs:
            for k in (1, 2, 8):
                print(f"adapterhub serve / mlx_lm.server, {k} adapter(s): {ours[k] / theirs[k]:.2f}x"
                      + ("  (target >= 3 at 8)" if k == 8 else ""))
        results = [{"server": label, "adapters": k, **{key: v for key, v in f.items() if key != "failures"}}
                   for label, k, f in rows]
        print(json.dumps({"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                          "shape": args.shape, "results": results}))


if __name__ == "__main__":
    main()
