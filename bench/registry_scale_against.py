"""`show` and `list --base` of this checkout against another commit's, interleaved, at 10,000 and 100,000 versions.

A regression check for the catalogue's read path. Each checkout fills its own registry with its own
code (bench/registry_scale.py's `fill`: registries of different formats are not comparable), then
the two CLIs alternate run by run, so load on a shared machine falls on both alike. Byte-compile
both trees first where PYTHONDONTWRITEBYTECODE is set, or new modules are compiled on every run.

    git worktree add /tmp/old 7f173a7
    .venv/bin/python bench/registry_scale_against.py /tmp/old [--sizes 10000,100000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEW = Path(__file__).resolve().parent.parent
FILL = ("import sys, random; sys.path[:0] = ['bench', '.']; import registry_scale as b; from pathlib import Path; "
        "print(*b.fill(Path(sys.argv[1]), int(sys.argv[2]), random.Random(0)))")


def cli(tree: Path, registry: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry), *args], cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: adapterhub {' '.join(args)} failed: {done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="a checkout of the commit to compare with (git worktree add)")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": NEW}
    work = Path(tempfile.mkdtemp(prefix="adapterhub-scale-against-"))
    for size in (int(s) for s in args.sizes.split(",")):
        refs = {}
        for label, tree in trees.items():
            registry = work / f"{label}-{size}"
            filled = subprocess.run([sys.executable, "-c", FILL, str(registry), str(size)], cwd=tree, capture_output=True,
                                    text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
            if filled.returncode:
                raise SystemExit(filled.stderr)
            refs[label] = (registry, *filled.stdout.split())
            cli(tree, registry, "show", refs[label][1])  # a format upgrade, if any, happens here, untimed
        times = {(label, command): [] for label in trees for command in ("show", "list")}
        for _ in range(args.rounds):
            for label, tree in trees.items():
                registry, ref, base = refs[label]
                times[label, "show"].append(cli(tree, registry, "show", ref))
                times[label, "list"].append(cli(tree, registry, "--json", "list", "--base", base))
        print(f"{size:,} versions, median of {args.rounds} interleaved runs")
        for command in ("show", "list"):
            old, new = (statistics.median(times[label, command]) for label in ("old", "new"))
            print(f"  {command:5} old {old * 1000:6.0f} ms   new {new * 1000:6.0f} ms   new/old {new / old:.2f}")
    print(f"registries kept in {work}")


if __name__ == "__main__":
    main()
