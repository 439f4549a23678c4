"""The bundled trainer on a real tiny model: learning, chaining, retention, exact resume, refusals."""

import json
from pathlib import Path
import random
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from adapterhub.safetensors_io import read_header
from adapterhub.schemas import validate
from adapterhub.training import checkpoints
from adapterhub.training.config import TrainConfig
from tests.conftest import snapshot, subprocess_env


def options(model, data, *extra):
    return ["--base", model, "--data", data, "--num-layers", "2", "--learning-rate", "1e-3", "--val-batches", "2",
            "--steps-per-eval", "10", "--steps-per-report", "5", *extra]


def test_training_lowers_validation_loss_and_registers_the_version(cli, registry, tiny_model, tiny_data):
    code, out, err = cli("--json", "train", *options(tiny_model, tiny_data, "--name", "learner", "--iters", "30",
                                                    "--save-every", "10", "--tag", "task=stories"))
    assert code == 0, err
    version = json.loads(out)
    val = version["training"]["losses"]["val"]
    assert val[0][0] == 1 and val[-1][0] == 30 and val[-1][1] < val[0][1] * 0.8
    assert version["kind"] == "lora" and version["rank"] == 8 and version["tags"] == {"task": "stories"}
    assert version["dataset"]["examples"]["train"] == 64 and version["base"]["model_type"] == "llama"
    assert version["training"]["trained_tokens"] > 0 and set(version["training"]["versions"]) == {"mlx", "mlx_lm", "adapterhub"}
    run = registry.runs()[0]
    assert run["status"] == "finished" and run["result"] == "learner@1" and run["step"] == 30
    from mlx_lm import load

    cli("export", "learner", registry.root.parent / "exported")
    load(str(tiny_model), adapter_path=str(registry.root.parent / "exported"))  # plain mlx_lm loads it


def test_from_continues_from_the_parent_weights(cli, registry, tiny_model, tiny_data):
    assert cli("train", *options(tiny_model, tiny_data, "--name", "first", "--iters", "10", "--save-every", "10"))[0] == 0
    # A zero learning rate leaves the weights where they started: exactly the parent's.
    code, out, err = cli("--json", "train", *options(tiny_model, tiny_data, "--name", "second", "--iters", "4", "--from", "first",
                                                    "--optimizer", "sgd", "--learning-rate", "0", "--save-every", "2"))
    assert code == 0, err
    child, parent = json.loads(out), registry.resolve("first@1")
    assert child["parents"] == [{"ref": "first@1", "sha256": parent.sha256, "relation": "resumed-from"}]
    ours = mx.load(str(registry.objects.path(child["sha256"])), format="safetensors")
    theirs = mx.load(str(registry.objects.path(parent.sha256)), format="safetensors")
    assert ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    # A checkpoint's own lineage: its run's parent, base and dataset, from its metadata alone.
    checkpoint = next(Path(registry.runs()[-1]["dir"]).glob("step-0000002.safetensors"))
    code, out, err = cli("--json", "lineage", checkpoint)
    graph = json.loads(out)
    nodes = {n["id"]: n for n in graph["nodes"]}
    edges = {(e["relation"], nodes[e["parent"]]["sha256"]) for e in graph["edges"] if e["child"] == graph["root"]}
    assert code == 0 and nodes[graph["root"]]["kind"] == "checkpoint", err
    assert edges == {("resumed-from", parent.sha256), ("base", child["base"]["sha256"]), ("dataset", child["dataset"]["sha256"])}


def test_checkpoints_on_disk_follow_the_retention_policy(cli, registry, tiny_model, tiny_data):
    keep_last, keep_best, keep_every = 2, 1, 20
    code, _, err = cli("train", *options(tiny_model, tiny_data, "--name", "kept", "--iters", "42", "--save-every", "4",
                                        "--steps-per-eval", "4", "--keep-last", str(keep_last), "--keep-best", str(keep_best),
                                        "--keep-every", str(keep_every)))
    assert code == 0, err
    run = registry.runs()[0]
    saved_val = dict(run["losses"]["val"])
    steps = list(range(4, 42, 4))  # every save, the final step aside
    best = sorted(steps, key=lambda s: (saved_val[s], s))[:keep_best]
    expected = set(steps[-keep_last:]) | set(best) | {s for s in steps if s % keep_every == 0}
    folder = registry.root / "runs" / run["id"]
    on_disk = {int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("step-*.safetensors")}
    assert on_disk == expected
    assert len(list(folder.glob("step-*.state.safetensors"))) == len(expected)
    code, out, _ = cli("--json", "checkpoints", "list", run["id"])
    listed = {row["step"]: row["kept_because"] for row in json.loads(out)}
    assert set(listed) == expected and "best" in listed[best[0]] and "every-20" in listed[20]
    code, out, _ = cli("--json", "checkpoints", "prune", run["id"], "--keep-last", "1", "--keep-best", "0", "--keep-every", "0")
    assert code == 0 and {int(p.name[5:12]) for p in folder.glob("step-*[0-9].safetensors")} == {max(expected)}


def _validation_loss_of(checkpoint, tiny_model, tiny_data, seed: int) -> float:
    """The validation loss of a checkpoint's own weights, as the trainer measures it at that step."""
    from types import SimpleNamespace

    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import default_loss, evaluate
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(tiny_model))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    model.load_weights(list(mx.load(str(checkpoint.path)).items()), strict=False)
    _, valid, _ = load_local_dataset(Path(tiny_data), tokenizer, SimpleNamespace(mask_prompt=False))
    np.random.seed(seed + checkpoint.step)
    return float(evaluate(model=model, dataset=CacheDataset(valid), loss=default_loss, batch_size=4, num_batches=2))


def test_keep_best_ranks_checkpoints_by_their_own_validation_loss(cli, registry, tiny_model, tiny_data):
    # No --steps-per-eval: mlx-lm's 200 would leave every checkpoint with the loss measured at step 1.
    code, _, err = cli("train", "--base", tiny_model, "--data", tiny_data, "--name", "best", "--num-layers", "2",
                       "--learning-rate", "1e-3", "--val-batches", "2", "--iters", "24", "--save-every", "4",
                       "--keep-last", "1", "--keep-best", "1")
    assert code == 0, err
    run = registry.runs()[0]
    measured = dict(run["losses"]["val"])
    assert set(measured) == {1, 4, 8, 12, 16, 20, 24}  # mlx-lm's steps, and every checkpoint's
    folder = Path(run["dir"])
    kept = checkpoints.listing(folder)
    for checkpoint in kept:
        assert checkpoint.val_loss == measured[checkpoint.step]
        assert checkpoint.val_loss == pytest.approx(_validation_loss_of(checkpoint, tiny_model, tiny_data, seed=0), rel=1e-5)
    best = min((4, 8, 12, 16, 20), key=lambda s: (measured[s], s))
    assert {c.step for c in kept} == {20, best}
    assert measured[best] < measured[1]


def test_checkpoint_metadata_round_trips(cli, registry, tiny_model, tiny_data):
    cli("train", *options(tiny_model, tiny_data, "--name", "meta", "--iters", "10", "--save-every", "5"))
    run = registry.runs()[0]
    checkpoint = checkpoints.listing(registry.root / "runs" / run["id"])[0]
    metadata = read_header(checkpoint.path).metadata
    validate(metadata, "checkpoint")
    assert int(metadata["step"]) == checkpoint.step == 5
    assert metadata["config_sha256"] == TrainConfig(**run["config"]).sha256() == run["config_sha256"]
    assert metadata["base_sha256"] == registry.base("tiny-llama")["sha256"]
    assert metadata["dataset_sha256"] == registry.resolve("meta").record["dataset"]["sha256"]
    assert float(metadata["train_loss"]) == dict(run["losses"]["train"])[5]
    code, out, err = cli("--json", "checkpoints", "promote", run["id"], "5", "--name", "meta-step5")
    assert code == 0, err
    promoted = json.loads(out)
    weights = mx.load(str(registry.objects.path(promoted["sha256"])), format="safetensors")
    assert all(mx.array_equal(weights[k], v).item() for k, v in mx.load(str(checkpoint.path)).items())


def test_sigkill_at_a_random_step_then_resume_is_byte_identical(cli, registry, tiny_model, tiny_data, tmp_path):
    common = options(tiny_model, tiny_data, "--iters", "36", "--save-every", "3", "--dropout", "0.1", "--seed", "5")
    assert cli("train", *common, "--name", "straight")[0] == 0
    kill_after = random.Random().choice(range(6, 34, 3))
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry.root), "train",
                                 *map(str, common), "--name", "victim"], stdout=out, stderr=out, env=subprocess_env())
        deadline = time.monotonic() + 120
        while f"step {kill_after}: checkpoint" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, log.read_text()
    victim = next(r for r in registry.runs() if r["name"] == "victim")
    assert victim["status"] == "interrupted" and victim["step"] >= kill_after
    code, out, _ = cli("--json", "runs", "--status", "interrupted")
    assert [r["id"] for r in json.loads(out)] == [victim["id"]]
    code, _, err = cli("train", "--resume", victim["id"])
    assert code == 0, err
    straight = next(r for r in registry.runs() if r["name"] == "straight")
    first = (registry.root / "runs" / straight["id"] / "adapter" / "adapters.safetensors").read_bytes()
    second = (registry.root / "runs" / victim["id"] / "adapter" / "adapters.safetensors").read_bytes()
    assert first == second, f"killed after step {kill_after}"
    assert registry.resolve("victim").sha256 == registry.resolve("straight").sha256
    assert registry.run(victim["id"])["status"] == "finished"


def _bad_data(folder, text):
    folder.mkdir()
    (folder / "train.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize("text,message", [
    ('{"text": "fine"}\n{"text": oops}\n', "train.jsonl:2: not valid JSON"),
    ('{"text": "fine"}\n[1, 2]\n', "train.jsonl:2: a line must be a JSON object"),
    ('{"text": "fine"}\n{"body": "x"}\n', "train.jsonl:2: has none of 'text'"),
    ('{"text": "fine"}\n{"prompt": "a", "completion": "b"}\n', "train.jsonl:2: is completions data but earlier lines are text"),
    ('{"text": ""}\n', "train.jsonl:1: empty or non-string text"),
    ('', "has no examples"),
])
def test_bad_data_is_refused_before_loading_and_registers_nothing(cli, registry, tiny_model, tmp_path, text, message):
    data = _bad_data(tmp_path / "bad", text)
    before = snapshot(registry.root)
    code, _, err = cli("train", "--base", tiny_model, "--data", data, "--name", "never", "--iters", "2")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(registry.root) == before


def test_mismatched_from_is_refused_and_registers_nothing(cli, registry, tiny_model, tiny_data, lora_adapter):
    registry.import_adapter(lora_adapter, "parent", base=tiny_model)  # rank 8 on 2 layers
    before = snapshot(registry.root)
    code, _, err = cli("train", *options(tiny_model, tiny_data, "--name", "child", "--iters", "2", "--from", "parent", "--rank", "4"))
    assert code == 1 and "--from parent@1 is lora rank 8, this run is lora rank 4" in err
    code, _, err = cli("train", *options(tiny_model, tiny_data, "--name", "child", "--iters", "2", "--from", "parent",
                                         "--num-layers", "4"))
    assert code == 1 and "does not match this run's layers" in err
    code, _, err = cli("train", *options(tiny_model, tiny_data, "--name", "Bad Name", "--iters", "2"))
    assert code == 1 and "invalid name 'Bad Name'" in err
    assert {k: v for k, v in snapshot(registry.root).items() if not k.startswith("catalog/runs")} == before
    assert registry.runs() == []


def test_default_num_layers_is_mlx_lms_sixteen_or_all_of_a_shallower_model(cli, registry, tiny_model, tiny_data, tmp_path):
    config = tmp_path / "lora_config.yaml"
    config.write_text("val_batches: -1\n")  # mlx-lm's "the whole validation set"
    code, out, err = cli("--json", "train", "--base", tiny_model, "--data", tiny_data, "--name", "every-layer", "--iters", "2",
                         "--save-every", "2", "--config", config)
    assert code == 0, err
    version = json.loads(out)
    assert version["training"]["hyperparameters"]["val_batches"] == -1
    # The number actually wrapped is what the run and the adapter record, so mlx_lm loads it on any model.
    assert version["num_layers"] == 4 and version["layers"] == [0, 1, 2, 3]
    assert version["training"]["hyperparameters"]["num_layers"] == 4 and registry.runs()[0]["config"]["num_layers"] == 4
    config = TrainConfig(base="b", data="d", name="n")
    assert [config.layers_to_train(n) for n in (4, 16, 40)] == [4, 16, 16]
    assert TrainConfig(base="b", data="d", name="n", num_layers=-1).layers_to_train(40) == 40
    assert TrainConfig(base="b", data="d", name="n", num_layers=3).layers_to_train(40) == 3


def test_yaml_config_as_mlx_lm_reads_it_and_dora(cli, registry, tiny_model, tiny_data, tmp_path):
    config = tmp_path / "lora_config.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {tiny_data}\nfine_tune_type: dora\nnum_layers: 2\niters: 4\n"
                      "batch_size: 2\nlearning_rate: 1e-4\nval_batches: 1\nsave_every: 2\n"
                      "lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n")
    code, out, err = cli("--json", "train", "--config", config, "--name", "from-yaml", "--iters", "3")
    assert code == 0, err
    version = json.loads(out)
    assert version["kind"] == "dora" and version["rank"] == 4 and version["scale"] == 10.0
    hyper = version["training"]["hyperparameters"]
    assert hyper["iters"] == 3 and hyper["batch_size"] == 2  # the command line beats the file
    assert version["training"]["wall_seconds"] >= version["training"]["train_seconds"] > 0


def test_generate_applies_the_registered_adapter(cli, registry, tiny_model, lora_adapter):
    from mlx_lm import generate, load

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    code, out, err = cli("generate", "stories", "--prompt", "the dog", "--max-tokens", "8")
    assert code == 0, err
    model, tokenizer = load(str(tiny_model), adapter_path=str(lora_adapter))
    # As mlx_lm.generate's command line: the prompt goes in as a user turn of the tokenizer's chat template.
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "the dog"}], tokenize=False, add_generation_prompt=True)
    assert chat != "the dog"
    assert out.strip() == generate(model, tokenizer, prompt=chat, max_tokens=8).strip()
    code, out, err = cli("generate", "stories", "--prompt", "the dog", "--max-tokens", "8", "--ignore-chat-template")
    assert out.strip() == generate(model, tokenizer, prompt="the dog", max_tokens=8).strip()
    narrow = __import__("adapterhub.tinymodel", fromlist=["write_model"]).write_model(
        registry.root.parent / "narrow", hidden_size=32, intermediate_size=64)
    code, _, err = cli("generate", "stories", "--base", narrow, "--prompt", "the dog")
    assert code == 1 and "is not compatible with" in err


def test_qlora_on_a_quantized_base(cli, registry, tiny_model_4bit, tiny_data):
    code, out, err = cli("--json", "train", *options(tiny_model_4bit, tiny_data, "--name", "qlora", "--iters", "12",
                                                    "--save-every", "6"))
    assert code == 0, err
    version = json.loads(out)
    val = version["training"]["losses"]["val"]
    assert val[-1][1] < val[0][1]
    assert registry.base(version["base"]["sha256"])["config"]["quantization"]["bits"] == 4


# ---- mlx-lm's other options: schedules, optimizers, gradient checkpointing, memory, trackers -----------------


def _mlx_lms_optimizer(tiny_model, tmp_path, monkeypatch, **options):
    """The optimizer mlx_lm.lora's own train_model builds for `options` (its defaults otherwise), and its LoRA model,
    caught as train_model hands them to the training loop."""
    import types

    import mlx_lm.lora as lora
    from mlx_lm import load

    caught = {}
    monkeypatch.setattr(lora, "train", lambda **kwargs: caught.update(kwargs))
    model, _ = load(str(tiny_model))
    args = types.SimpleNamespace(**{**lora.CONFIG_DEFAULTS, "num_layers": 2, "adapter_path": str(tmp_path / "mlx-lm"),
                                    **options})
    lora.train_model(args, model, [], [])
    return caught["optimizer"], caught["model"].trainable_parameters()


def _trajectory(optimizer, parameters, steps: int = 8):
    """Parameters and learning rates after each of `steps` updates with the same pseudo-random gradients."""
    from mlx.utils import tree_map

    rates = []
    for step in range(steps):
        mx.random.seed(100 + step)
        gradients = tree_map(lambda p: mx.random.normal(p.shape) * 1e-2, parameters)
        parameters = optimizer.apply_gradients(gradients, parameters)
        mx.eval(parameters, optimizer.state)
        rates.append(optimizer.learning_rate.item())
    return parameters, rates


SCHEDULE = {"name": "cosine_decay", "arguments": [1e-3, 7], "warmup": 3, "warmup_init": 1e-6}


@pytest.mark.parametrize("cli_options,yaml_text,mlx_lm_options", [
    # The schedule from the command line and as mlx-lm's YAML reads it: the same mapping, the same rates.
    ({"lr_schedule": "cosine_decay", "warmup": 3, "warmup_init": 1e-6, "learning_rate": 1e-3, "iters": 10}, None,
     {"lr_schedule": SCHEDULE}),
    ({}, "iters: 10\nlr_schedule:\n  name: linear_schedule\n  arguments: [2e-3, 1e-5, 6]\n  warmup: 2\n",
     {"lr_schedule": {"name": "linear_schedule", "arguments": [2e-3, 1e-5, 6], "warmup": 2}}),
    ({"lr_schedule": "exponential_decay:1e-3,0.9"}, None,
     {"lr_schedule": {"name": "exponential_decay", "arguments": [1e-3, 0.9]}}),
    ({"lr_schedule": "step_decay:1e-3,0.5,2"}, None,
     {"lr_schedule": {"name": "step_decay", "arguments": [1e-3, 0.5, 2]}}),
    ({"optimizer": "adam", "learning_rate": 1e-3}, None, {"optimizer": "adam", "learning_rate": 1e-3}),
    ({"optimizer": "adamw", "learning_rate": 1e-3}, "optimizer_config:\n  adamw:\n    weight_decay: 0.05\n    betas: [0.8, 0.99]\n",
     {"optimizer": "adamw", "learning_rate": 1e-3, "optimizer_config": {"adamw": {"weight_decay": 0.05, "betas": [0.8, 0.99]}}}),
    ({"optimizer": "muon", "learning_rate": 1e-3}, "optimizer_config:\n  muon:\n    momentum: 0.9\n    nesterov: false\n",
     {"optimizer": "muon", "learning_rate": 1e-3, "optimizer_config": {"muon": {"momentum": 0.9, "nesterov": False}}}),
    ({"optimizer": "sgd", "learning_rate": 1e-2}, "optimizer_config:\n  sgd:\n    momentum: 0.9\n    nesterov: true\n",
     {"optimizer": "sgd", "learning_rate": 1e-2, "optimizer_config": {"sgd": {"momentum": 0.9, "nesterov": True}}}),
    ({"optimizer": "adafactor", "learning_rate": 1e-3},
     "optimizer_config:\n  adafactor:\n    relative_step: false\n    scale_parameter: false\n    beta_1: 0.9\n",
     {"optimizer": "adafactor", "learning_rate": 1e-3,
      "optimizer_config": {"adafactor": {"relative_step": False, "scale_parameter": False, "beta_1": 0.9}}}),
    ({"optimizer": "adafactor", "lr_schedule": "cosine_decay", "warmup": 2, "iters": 10}, None,
     {"optimizer": "adafactor", "lr_schedule": {"name": "cosine_decay", "arguments": [1e-5, 8], "warmup": 2}}),
], ids=["cosine-cli", "linear-yaml", "exponential", "step", "adam", "adamw", "muon", "sgd", "adafactor", "adafactor-cosine"])
def test_schedules_and_optimizers_update_as_mlx_lms(tiny_model, tmp_path, monkeypatch, cli_options, yaml_text, mlx_lm_options):
    from adapterhub.training import optimizers
    from adapterhub.training.config import merge

    config_file = None
    if yaml_text:
        config_file = tmp_path / "lora_config.yaml"
        config_file.write_text(yaml_text)
    config = merge({"base": "b", "data": "d", "name": "n", **cli_options}, config_file)
    if "lr_schedule" in mlx_lm_options:
        assert config.lr_schedule == mlx_lm_options["lr_schedule"]  # mlx-lm's mapping, whichever way it was given
    theirs, parameters = _mlx_lms_optimizer(tiny_model, tmp_path, monkeypatch, **mlx_lm_options)
    ours = optimizers.build(config)
    assert type(ours) is type(theirs)
    our_parameters, our_rates = _trajectory(ours, parameters)
    their_parameters, their_rates = _trajectory(theirs, parameters)
    assert our_rates == their_rates
    from mlx.utils import tree_flatten

    theirs_flat = dict(tree_flatten(their_parameters))
    assert all(mx.array_equal(v, theirs_flat[k]).item() for k, v in tree_flatten(our_parameters))


def test_a_run_reports_the_schedules_rates_and_peak_memory(registry, tiny_model, tiny_data, tmp_path, monkeypatch):
    from adapterhub.training.callbacks import TrainingCallback
    from adapterhub.training.config import merge
    from adapterhub.training.trainer import Trainer

    reports = []

    class Reports(TrainingCallback):
        def on_train_report(self, report):
            reports.append(report)

    config = merge({"base": str(tiny_model), "data": str(tiny_data), "name": "scheduled", "num_layers": 2, "iters": 6,
                    "steps_per_report": 1, "save_every": 3, "val_batches": 1, "optimizer": "adafactor",
                    "lr_schedule": "cosine_decay", "warmup": 2, "warmup_init": 1e-6, "learning_rate": 1e-3}, None)
    version = Trainer(registry, config, callback=Reports()).run()
    theirs, parameters = _mlx_lms_optimizer(tiny_model, tmp_path, monkeypatch, optimizer="adafactor",
                                            lr_schedule={"name": "cosine_decay", "arguments": [1e-3, 4], "warmup": 2,
                                                         "warmup_init": 1e-6})
    assert [r.learning_rate for r in reports] == _trajectory(theirs, parameters, steps=6)[1]
    run = registry.run(version.record["training"]["run_id"])
    assert [s for s, _ in run["peak_memory"]] == [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert [p for _, p in run["peak_memory"]] == [r.peak_memory for r in reports] and min(r.peak_memory for r in reports) > 0
    assert version.record["training"]["peak_memory_bytes"] == max(r.peak_memory for r in reports)
    assert version.record["training"]["hyperparameters"]["lr_schedule"] == {
        "name": "cosine_decay", "arguments": [1e-3, 4], "warmup": 2, "warmup_init": 1e-6}


def _long_rows(folder: Path, rows: int = 4, repeats: int = 40) -> Path:
    """Text rows of ~240 tokens each: long enough that a layer's stored activations dominate memory."""
    folder.mkdir()
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": " ".join(["the cat sees a box ."] * repeats)}) + "\n" for _ in range(rows)))
    return folder


def test_grad_checkpoint_trains_the_same_adapter_in_less_memory(cli, registry, tiny_model, tmp_path):
    data = _long_rows(tmp_path / "long")
    common = ["--base", tiny_model, "--data", data, "--num-layers", "4", "--iters", "2", "--save-every", "2",
              "--val-batches", "1", "--max-seq-length", "512", "--learning-rate", "1e-3"]
    code, _, err = cli("train", *common, "--name", "stored")
    assert code == 0 and "peak memory" in err, err
    code, _, err = cli("train", *common, "--name", "recomputed", "--grad-checkpoint")
    assert code == 0, err
    runs = {r["name"]: r for r in registry.runs()}
    peak = {name: max(p for _, p in runs[name]["peak_memory"]) for name in runs}
    assert peak["recomputed"] < 0.8 * peak["stored"], peak  # measured: 30 MB against 54 MB
    assert runs["recomputed"]["config_sha256"] == runs["stored"]["config_sha256"]  # how it ran, not what it learned
    assert registry.resolve("recomputed").record["training"]["hyperparameters"]["grad_checkpoint"] is True
    stored, recomputed = (mx.load(str(registry.weights(registry.resolve(n))), format="safetensors") for n in ("stored", "recomputed"))
    for k in stored:
        assert mx.allclose(stored[k], recomputed[k], rtol=1e-5, atol=1e-7).item(), k
    # Only this model's layers were checkpointed: a model loaded afterwards keeps its layer class.
    from mlx_lm import load

    from mlx_lm.models.llama import TransformerBlock

    model, _ = load(str(tiny_model))
    assert all(type(layer) is TransformerBlock for layer in model.layers)


def test_report_to_wandb_logs_each_report_when_asked(cli, registry, tiny_model, tiny_data, monkeypatch):
    import types

    from adapterhub.training import trackers

    calls = {"init": [], "log": [], "summary": {}, "finished": False}

    class Run:
        summary = calls["summary"]

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    fake.log = lambda data, step=None: calls["log"].append((step, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(trackers, "installed", lambda package: True)
    code, _, err = cli("train", *options(tiny_model, tiny_data, "--name", "tracked", "--iters", "10", "--save-every", "5",
                                         "--report-to", "wandb", "--project-name", "stories"))
    assert code == 0, err
    run_id = registry.runs()[0]["id"]
    assert [(c["project"], c["name"]) for c in calls["init"]] == [("stories", run_id)]
    assert calls["init"][0]["config"]["report_to"] == "wandb"
    train_steps = [step for step, data in calls["log"] if "train_loss" in data]
    assert train_steps == [5, 10] and all("peak_memory_gb" in d for _, d in calls["log"] if "train_loss" in d)
    assert [step for step, data in calls["log"] if "val_loss" in data] == [1, 5, 10]
    assert calls["summary"]["version"] == "tracked@1" and calls["finished"]
