"""Data-parallel training under `mlx.launch --backend ring` on 127.0.0.1: two real processes, one registry.

Tolerance: two ring processes and one process compute the same gradient with float32 sums in
another order (within each rank, then across ranks). Measured on the tiny llama, largest
difference of any adapter element against one process:
- after one Adam step: 1.2e-8; after 12 SGD steps with momentum 0.9 at lr 1e-2: 4.5e-8 (elements
  up to 0.19), losses within 1.5e-7 relative; two Adam updates with accumulation 2: 7.7e-7;
- after 12 Adam steps at lr 1e-3: 1.2e-4. Adam divides each gradient element by its running RMS:
  an element whose gradient nearly cancels, where the two orders of summation differ by 1e-10,
  still moves by a fraction of the learning rate, in a direction the rounding picks.
So the equivalence tests use SGD (and few Adam updates) and allow rtol=1e-5, atol=1e-6.
"""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from adapterhub.registry import Registry
from adapterhub.training import distributed
from adapterhub.training.config import TrainConfig
from adapterhub.training.trainer import train
from tests.conftest import snapshot, subprocess_env

LAUNCH = Path(sys.executable).parent / "mlx.launch"
# Ranks other than 0 must never open the registry: this entry point makes opening it an error there.
ENTRY = """
import os, sys
if os.environ.get("RANK_FOLDERS"):
    os.chdir(os.path.join(os.environ["RANK_FOLDERS"], "rank" + os.environ["MLX_RANK"]))
if os.environ.get("MLX_RANK", "0") != "0":
    import adapterhub.registry

    def refuse(*args, **kwargs):
        raise AssertionError("rank " + os.environ["MLX_RANK"] + " opened the registry")
    adapterhub.registry.Registry.__init__ = refuse
if os.environ.get("STEP_DELAY"):  # a run slow enough to be killed mid-way, however fast the machine
    import time
    from adapterhub.training import steps

    draw = steps.Batches.__next__
    steps.Batches.__next__ = lambda self: time.sleep(float(os.environ["STEP_DELAY"])) or draw(self)
from adapterhub.cli import main
sys.argv[0] = "adapterhub"
main()
"""
OPTIONS = {"num_layers": 2, "learning_rate": 1e-2, "val_batches": 2, "steps_per_eval": 4, "steps_per_report": 2,
           "iters": 12, "save_every": 4, "seed": 3, "batch_size": 4, "optimizer": "sgd"}
# Momentum gives the optimizer a state to checkpoint, share and resume; SGD keeps the comparison about the sums
# (Adam's step, near sign(g) for small gradients, can turn a 1e-8 difference into 1e-4 within a few steps).
YAML = "optimizer_config:\n  sgd:\n    momentum: 0.9\n"


def _flags(options: dict) -> list[str]:
    return [item for k, v in options.items() for item in ("--" + k.replace("_", "-"), str(v))]


def _ports() -> int:
    """A first port with the next one free too: the ring backend listens on port + rank (other jobs share this host)."""
    for _ in range(100):
        first = random.randrange(20000, 60000)
        try:
            for port in (first, first + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no two free ports")


def _command(entry: Path, registry: Path, *args) -> list[str]:
    return [str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(_ports()), "--",
            sys.executable, str(entry), "--registry", str(registry), *map(str, args)]


def launch(entry: Path, registry: Path, *args, env: dict | None = None, timeout: float = 300) -> str:
    """Run `adapterhub ARGS` on two ring ranks; returns their output (mlx.launch itself always exits 0)."""
    done = subprocess.run(_command(entry, registry, *args), capture_output=True, text=True, timeout=timeout,
                          env={**subprocess_env(), **(env or {})})
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("entry") / "rank_entry.py"
    path.write_text(ENTRY)
    return path


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory, tiny_model, tiny_data, entry):
    """A registry with `two@1`, trained by two ring processes, its run uninterrupted."""
    root = tmp_path_factory.mktemp("ring") / "registry"
    Registry(root).init()
    (root.parent / "sgd.yaml").write_text(YAML)
    out = launch(entry, root, "train", "--base", tiny_model, "--data", tiny_data, "--name", "two", *_flags(OPTIONS),
                 "--config", root.parent / "sgd.yaml")
    assert "trained two@1" in out, out
    return Registry(root), out


def _weights(registry: Registry, ref: str) -> dict:
    return mx.load(str(registry.weights(registry.resolve(ref))), format="safetensors")


def test_two_ring_processes_train_the_adapter_one_process_trains(ring_run, tiny_model, tiny_data):
    registry, out = ring_run
    assert out.count("trained two@1") == 1 and "Traceback" not in out, out  # rank 0 alone reports
    assert "peak memory" in out
    one = train(registry, TrainConfig(base=str(tiny_model), data=str(tiny_data), name="one",
                                      optimizer_config={"sgd": {"momentum": 0.9}}, **OPTIONS))
    two = registry.resolve("two@1")
    ours, theirs = _weights(registry, "two@1"), _weights(registry, "one@1")
    assert ours.keys() == theirs.keys()
    worst = max(mx.abs(ours[k] - theirs[k]).max().item() for k in ours)
    for k in ours:
        np.testing.assert_allclose(np.array(ours[k]), np.array(theirs[k]), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{k}: largest difference of any tensor {worst:.2e}")
    # One version, written by rank 0: ENTRY makes opening the registry an error on rank 1.
    assert [v.ref for v in registry.list(name_glob="two")] == ["two@1"]
    runs = {r["name"]: r for r in registry.runs()}
    assert (runs["two"]["processes"], runs["two"]["backend"]) == (2, "ring")
    assert (runs["one"]["processes"], runs["one"]["backend"]) == (1, None)
    assert two.record["training"]["processes"] == 2 and one.record["training"]["processes"] == 1
    # The same run record apart from who ran it, when and under which name.
    apart = {"id", "name", "dir", "pid", "host", "started_at", "finished_at", "result", "train_seconds", "processes",
             "backend", "peak_memory", "losses", "config"}
    assert {k: v for k, v in runs["two"].items() if k not in apart} == {k: v for k, v in runs["one"].items() if k not in apart}
    assert {**runs["two"]["config"], "name": "one"} == runs["one"]["config"]
    for split in ("train", "val"):
        steps = [s for s, _ in runs["one"]["losses"][split]]
        assert [s for s, _ in runs["two"]["losses"][split]] == steps
        np.testing.assert_allclose([v for _, v in runs["two"]["losses"][split]],
                                   [v for _, v in runs["one"]["losses"][split]], rtol=1e-5)
    assert runs["two"]["trained_tokens"] == runs["one"]["trained_tokens"] > 0
    assert [s for s, _ in runs["two"]["peak_memory"]] == [s for s, _ in runs["one"]["losses"]["train"]]
    assert all(peak > 0 for _, peak in runs["two"]["peak_memory"])
    assert registry.verify().ok


def test_gradient_accumulation_across_ranks_matches_one_process(tmp_path, tiny_model, tiny_data, entry):
    # Each micro-batch's mean loss counts alike, as in one process: ranks exchange its token count at every
    # micro-step and the gradients at the update (the path where one all-reduce per step cannot do).
    root = tmp_path / "registry"
    Registry(root).init()
    options = {**OPTIONS, "optimizer": "adam", "learning_rate": 1e-3, "iters": 4, "save_every": 4, "grad_accumulation_steps": 2}
    out = launch(entry, root, "train", "--base", tiny_model, "--data", tiny_data, "--name", "accumulated", *_flags(options))
    assert "trained accumulated@1" in out, out
    registry = Registry(root)
    train(registry, TrainConfig(base=str(tiny_model), data=str(tiny_data), name="one", **options))
    ours, theirs = _weights(registry, "accumulated@1"), _weights(registry, "one@1")
    for k in ours:  # two Adam updates: measured 7.7e-7 at most
        np.testing.assert_allclose(np.array(ours[k]), np.array(theirs[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    runs = {r["name"]: r for r in registry.runs()}
    assert runs["accumulated"]["trained_tokens"] == runs["one"]["trained_tokens"]


def _copy_with(folder: Path, dest: Path, change=None) -> Path:
    shutil.copytree(folder, dest)
    if change:
        path = dest / "train.jsonl"
        path.write_text(change(path.read_text()))
    return dest


@pytest.mark.parametrize("case", ["batch size", "data"])
def test_ranks_refuse_together_before_anything_is_written(tmp_path, tiny_model, tiny_data, entry, case):
    root = tmp_path / "registry"
    Registry(root).init()
    Registry(root).add_base(tiny_model)
    before = snapshot(root)
    args = ["train", "--base", tiny_model, "--name", "never", *_flags({**OPTIONS, "iters": 2})]
    env = None
    if case == "batch size":
        args += ["--data", tiny_data, "--batch-size", "3"]
        expected = "error: --batch-size 3 does not divide among 2 processes"
    else:
        # Two hosts with the same paths but different files: each rank runs in its own folder.
        _copy_with(tiny_data, tmp_path / "ranks" / "rank0" / "data")
        _copy_with(tiny_data, tmp_path / "ranks" / "rank1" / "data", lambda text: text.replace("the", "a", 1))
        args += ["--data", "data"]
        env = {"RANK_FOLDERS": str(tmp_path / "ranks")}
        expected = "error: rank 1 on "
    out = launch(entry, root, *args, env=env)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), out
    if case == "data":
        assert "its data differs from rank 0's" in errors[0] and "give every host the same files" in errors[0]
    # Each rank exits 1, unless mlx.launch, seeing the other's exit first, terminates it (-15): either way none goes on.
    assert all(re.search(rf"Node with rank {rank} exited with code (1|-15) ", out) for rank in (0, 1)), out
    assert "Traceback" not in out
    assert snapshot(root) == before


def test_sigkill_of_the_launcher_then_resume_under_mlx_launch_equals_the_uninterrupted_run(
        ring_run, tiny_model, tiny_data, entry, tmp_path):
    registry, _ = ring_run
    log = tmp_path / "log.txt"
    command = _command(entry, registry.root, "train", "--base", tiny_model, "--data", tiny_data, "--name", "victim",
                       *_flags(OPTIONS), "--config", registry.root.parent / "sgd.yaml")
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=out, env={**subprocess_env(), "STEP_DELAY": "0.3"})
        deadline = time.monotonic() + 240
        while "step 4: checkpoint" not in log.read_text() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        launcher.send_signal(signal.SIGKILL)  # the launcher alone: its two ranks are orphaned, and notice
        assert launcher.wait() == -signal.SIGKILL, log.read_text()
    victim = next(r for r in registry.runs() if r["name"] == "victim")
    deadline = time.monotonic() + 120
    while registry.run_status(registry.run(victim["id"])) == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = registry.run(victim["id"])
    assert victim["status"] == "interrupted" and victim["step"] == 4, (victim, log.read_text())
    assert registry.list(name_glob="victim") == []
    out = launch(entry, registry.root, "train", "--resume", victim["id"])
    assert "resumed at step 4" in out and "trained victim@1" in out, out
    straight = Path(next(r for r in registry.runs() if r["name"] == "two")["dir"]) / "adapter" / "adapters.safetensors"
    resumed = Path(victim["dir"]) / "adapter" / "adapters.safetensors"
    assert resumed.read_bytes() == straight.read_bytes()
    assert registry.resolve("victim@1").sha256 == registry.resolve("two@1").sha256
    assert registry.run(victim["id"])["status"] == "finished"


# ---- the agreement logic alone, on a scripted world (no processes) ----------------------------------


class Scripted(distributed.World):
    """A world whose all-gathers answer with the other ranks' scripted documents."""

    def __new__(cls, rank, others):
        world = super().__new__(cls)
        object.__setattr__(world, "others", others)
        return world

    def __init__(self, rank, others):
        super().__init__(None, rank, 1 + len(others), "ring", os.getppid())

    def gather(self, doc):
        rows = list(self.others.pop(0))
        rows.insert(self.rank, doc)
        return rows


def test_a_refusal_on_any_rank_is_raised_on_every_rank_with_its_message():
    from adapterhub.errors import AdapterHubError

    own = AdapterHubError("--name is bad", hint="rename it")
    with pytest.raises(AdapterHubError, match="--name is bad — rename it") as raised:
        distributed.refuse_together(Scripted(0, [[{"host": "b", "error": None}]]), own)
    assert raised.value is own  # rank 0 keeps its own error, so the CLI prints it as it would without mlx.launch
    with pytest.raises(distributed.PeerRefusal, match="^--name is bad — rename it$"):
        distributed.refuse_together(Scripted(1, [[{"host": "a", "error": "--name is bad — rename it"}]]), None)
    with pytest.raises(distributed.PeerRefusal, match="^rank 1 on b: no such folder$"):
        distributed.refuse_together(Scripted(0, [[{"host": "b", "error": "no such folder"}]]), None)
    distributed.refuse_together(Scripted(0, [[{"host": "b", "error": None}]]), None)  # nobody failed: nothing raised


def test_ranks_with_different_base_data_or_versions_are_refused():
    mine = {"base": "a" * 64, "data": "b" * 64, "versions": {"mlx": "1"}}
    for theirs, message in [({**mine, "base": "c" * 64}, "rank 1 on h1: its base model differs from rank 0's on "),
                            ({**mine, "data": "d" * 64}, "rank 1 on h1: its data differs from rank 0's on "),
                            ({**mine, "versions": {"mlx": "2"}}, "rank 1 on h1 runs mlx 2, rank 0 on ")]:
        with pytest.raises(distributed.PeerRefusal, match=message):
            distributed.check_same_inputs(Scripted(0, [[{**theirs, "host": "h1"}]]), mine)
    distributed.check_same_inputs(Scripted(0, [[{**mine, "host": "h1"}]]), mine)


def test_one_process_keeps_the_seeds_and_the_path_it_always_had():
    world = distributed.init()
    assert (world.size, world.rank, world.backend, world.distributed, world.writes) == (1, 0, None, False, True)
    from adapterhub.training.trainer import step_seed

    assert step_seed(5, 7, world) == 5 * 1_000_003 + 7
    assert not world.launcher_gone()
    tree = {"w": mx.array([1.0, -0.0])}
    assert world.share_tree(tree) is tree and world.maximum(3) == 3
