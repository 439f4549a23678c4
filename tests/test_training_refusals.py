"""A refused `train` is refused before any model loads: exit 1, one line, and not one byte of the registry changed."""

import pytest
import yaml

from adapterhub.errors import AdapterHubError
from adapterhub.training import checkpoints
from adapterhub.training.config import RANGES, TrainConfig
from adapterhub.training.trainer import Trainer
from tests.conftest import assert_refused, snapshot

STORY = '{"text": "the cat sees a box ."}\n'
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]}\n'


def _config(**options):
    """Options as mlx-lm's YAML holds them: the values reach the library as they are, whatever the CLI's own types do."""
    lora = {k: options.pop(k) for k in ("rank", "scale", "dropout") if k in options}
    return {**options, **({"lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0, **lora}} if lora else {})}


def _data(**files):
    return {f"{split}.jsonl": text for split, text in files.items()}


# Each row: (extra arguments, the fragment the one error line must hold). A dict among the arguments is
# written as a YAML --config file; a `data` entry replaces the dataset with those files.
REFUSED = [
    # Retention counts: a negative one sliced from the wrong end and deleted checkpoints.
    ((_config(keep_last=-1),), "--keep-last must be at least 0 (got -1)"),
    ((_config(keep_best=-2),), "--keep-best must be at least 0 (got -2)"),
    ((_config(keep_every=-5),), "--keep-every must be at least 0 (got -5)"),
    # Counts and sizes.
    ((_config(iters=0),), "--iters must be at least 1"),
    ((_config(rank=0),), "--rank must be at least 1"),
    ((_config(batch_size=0),), "--batch-size must be at least 1"),
    ((_config(save_every=0),), "--save-every must be at least 1"),
    ((_config(steps_per_eval=0),), "--steps-per-eval must be at least 1"),
    ((_config(steps_per_report=-1),), "--steps-per-report must be at least 1"),
    ((_config(val_batches=0),), "--val-batches must be at least 1, or -1 for all"),
    ((_config(max_seq_length=0),), "--max-seq-length must be at least 1"),
    ((_config(grad_accumulation_steps=0),), "--grad-accumulation-steps must be at least 1"),
    ((_config(num_layers=0),), "--num-layers must be at least 1, or -1 for all (got 0)"),
    ((_config(num_layers=-2),), "--num-layers must be at least 1, or -1 for all (got -2)"),
    ((_config(seed=-1),), "--seed must be at least 0 (got -1)"),
    ((_config(seed=2**32),), "--seed must be at most 2147483647"),  # numpy takes seed + step below 2**32
    ((_config(iters=2.5),), "--iters must be a whole number, got 2.5"),
    ((_config(iters=True),), "--iters must be a whole number, got True"),  # bool is not a number
    ((_config(learning_rate="fast"),), "--learning-rate must be a number, got 'fast'"),
    # Rates that would make the run diverge: found only after the model loaded, leaving a failed run behind.
    ((_config(learning_rate=float("nan")),), "--learning-rate must be a finite number, got nan"),
    ((_config(learning_rate=float("inf")),), "--learning-rate must be a finite number, got inf"),
    ((_config(learning_rate=-1e-3),), "--learning-rate must be at least 0.0"),
    ((_config(scale=float("nan")),), "--scale must be a finite number, got nan"),
    ((_config(scale=float("-inf")),), "--scale must be a finite number"),
    ((_config(dropout=1.0),), "--dropout must be in [0.0, 1.0) (got 1.0)"),
    ((_config(dropout=-0.1),), "--dropout must be in [0.0, 1.0)"),
    ((_config(dropout=float("nan")),), "--dropout must be a finite number"),
    ((_config(lr_schedule={"name": "no_such_schedule", "arguments": [1e-3]}),), "is not one mlx-lm can build"),
    ((_config(lr_schedule={"name": "linear_schedule", "arguments": [1e-3, float("nan"), 10]}),), "must be finite"),
    (({"lora_parameters": 8},), "lora_parameters must be a mapping"),
    # Schedules, optimizers and trackers: mlx-lm would find these only when it builds the optimizer.
    ((_config(lr_schedule={"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": -1}),),
     "lr_schedule warmup must be a whole number of steps, 0 or more (got -1)"),
    ((_config(lr_schedule={"name": "cosine_decay", "arguments": [1e-3, 10], "warmup_init": float("nan")}),),
     "lr_schedule warmup_init must be a finite rate"),
    (("--warmup", "5"), "--warmup and --warmup-init warm up into a schedule, and none is given"),
    (("--lr-schedule", "exponential_decay"), "--lr-schedule exponential_decay needs its arguments"),
    (("--lr-schedule", "cosine_decay:fast,10"), "--lr-schedule cosine_decay:fast,10: the arguments must be numbers"),
    (("--lr-schedule", "no_such_schedule:1e-3"), "is not one mlx-lm can build"),
    ((_config(optimizer="adamw", optimizer_config={"adamw": {"weight_decy": 0.1}}),),
     "optimizer_config.adamw has weight_decy, which mlx.optimizers.AdamW does not take"),
    ((_config(optimizer_config={"adamx": {"eps": 1e-8}}),), "optimizer_config names 'adamx', not one of mlx-lm's optimizers"),
    ((_config(optimizer="sgd", optimizer_config={"sgd": {"momentum": float("nan")}}),),
     "optimizer_config.sgd.momentum must be a finite number, got nan"),
    ((_config(optimizer="muon", optimizer_config={"muon": 0.9}),), "optimizer_config.muon must be a mapping of keyword arguments"),
    ((_config(optimizer="rmsprop"),), "--optimizer rmsprop is not one of mlx-lm's (adam, adamw, muon, sgd, adafactor)"),
    ((_config(report_to="tensorboard"),), "--report-to tensorboard is not supported (wandb)"),
    ((_config(grad_checkpoint="yes"),), "--grad-checkpoint must be true or false, got 'yes'"),
    # Options that depend on the model or the data: checked from config.json and the files, before loading.
    (("--num-layers", "9"), "--num-layers 9 but the base has 4 layers"),
    (("--batch-size", "32"), "valid.jsonl has 16 examples, fewer than --batch-size 32"),
    (("--kind", "loreft", "--layers", "2;7", "--data", "COLOURS"), "--layers [7] beyond the model's 4 layers"),
    # Data that passed the line-by-line check and failed after the model loaded.
    (({"data": _data(train=CHAT + '{"messages": ["hi", "there"]}\n')},), "train.jsonl:2: messages[0] must be an object"),
    (({"data": _data(train=CHAT + '{"messages": [{"content": "hi"}]}\n')},), "train.jsonl:2: messages[0] has no string 'role'"),
    (({"data": _data(train='{"messages": [{"role": "user", "content": ["hi"]}]}\n')},),
     "train.jsonl:1: messages[0] has no string 'content'"),
    (({"data": _data(train=CHAT + '{"messages": [{"role": "user"}]}\n')},), "train.jsonl:2: messages[0] has no string 'content'"),
    (({"data": _data(train=STORY + "\n" + STORY)},), "train.jsonl:2: blank line"),
    (({"data": _data(train=STORY + STORY + "  \n")},), "train.jsonl:3: blank line"),
    (({"data": _data(train=STORY * 4, valid="")},), "valid.jsonl has no examples"),
    (({"data": _data(train=STORY * 4, test=STORY)},), "test.jsonl has 1 examples, fewer than --batch-size 4"),
]


def _expand(args, tmp_path, tiny_data, colours):
    """Rows name files by content: write them, and point the arguments at them."""
    out, data = [], tiny_data
    for arg in args:
        if isinstance(arg, dict) and "data" in arg:
            data = tmp_path / "data"
            data.mkdir()
            for name, text in arg["data"].items():
                (data / name).write_text(text)
        elif isinstance(arg, dict):
            path = tmp_path / "lora_config.yaml"
            path.write_text(yaml.safe_dump(arg))
            out += ["--config", path]
        elif arg == "COLOURS":
            out.append(colours)
        else:
            out.append(arg)
    if "--data" not in out:
        out = ["--data", data, *out]
    return out


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from adapterhub.tinymodel import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "colours", seed=3, style="colours")


@pytest.mark.parametrize("args,message", REFUSED, ids=[m for _, m in REFUSED])
def test_refused_train_changes_nothing(cli, registry, tiny_model, tiny_data, colours, tmp_path, args, message, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("mlx_lm.load", no_model)
    registry.add_base(tiny_model)  # a registry with something in it, so "unchanged" means something
    before = snapshot(registry.root)
    extra = _expand(args, tmp_path, tiny_data, colours)
    assert_refused(cli("train", "--base", tiny_model, "--name", "never", *extra), message, before, registry)
    assert registry.runs() == []


def _save(folder, step, val_loss):
    import mlx.core as mx

    checkpoints.save(folder, step, {"w": mx.zeros((2,))}, {"m": mx.zeros((2,))},
                     {"train_loss": 1.0, "val_loss": val_loss, "learning_rate": 1e-3, "config_sha256": "0" * 64,
                      "base_sha256": "0" * 64})


def test_every_numeric_option_has_a_range():
    numeric = {name for name, value in TrainConfig(base="b", data="d", name="n").to_dict().items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)} | {"num_layers", "keep_every"}
    assert numeric == set(RANGES)
    for name, allowed in RANGES.items():
        low, high = allowed[:2]  # (min, max) first: what click.IntRange / FloatRange take
        assert low is None or high is None or low < high, name


def test_the_library_refuses_before_writing_when_called_without_the_cli(registry, tiny_model, tiny_data):
    config = TrainConfig(base=str(tiny_model), data=str(tiny_data), name="diverges", num_layers=2, iters=4,
                         learning_rate=float("nan"))
    before = snapshot(registry.root)
    with pytest.raises(AdapterHubError, match="--learning-rate must be a finite number"):
        Trainer(registry, config).run()
    assert snapshot(registry.root) == before and registry.runs() == []


@pytest.mark.parametrize("policy,message", [
    ((-1, 1, None), "--keep-last must be at least 0"),
    ((2, -1, None), "--keep-best must be at least 0"),
    ((2, 1, -3), "--keep-every must be at least 0"),
    ((True, 1, None), "--keep-last must be a whole number"),
])
def test_retention_refuses_negative_counts_from_python(tmp_path, policy, message):
    for step in (2, 4, 6):
        _save(tmp_path, step, 1.0 / step)
    kept = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AdapterHubError, match=message):
        checkpoints.retained(checkpoints.listing(tmp_path), *policy)
    with pytest.raises(AdapterHubError, match=message):
        checkpoints.prune(tmp_path, *policy)
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_checkpoints_without_a_measured_loss_never_rank_best(tmp_path):
    for step, val in ((2, ""), (4, 0.5), (6, "nan"), (8, 0.9)):
        _save(tmp_path, step, val)
    found = checkpoints.listing(tmp_path)
    assert [c.val_loss for c in found] == [None, 0.5, None, 0.9]
    assert checkpoints.retained(found, 0, 2, None) == {4: ["best"], 8: ["best"]}


def test_report_to_wandb_without_wandb_is_refused_before_anything_loads(cli, registry, tiny_model, tiny_data, monkeypatch):
    from adapterhub.training import trackers

    monkeypatch.setattr(trackers, "installed", lambda package: False)
    monkeypatch.setattr("mlx_lm.load", lambda *_, **__: pytest.fail("the model was loaded before the options were checked"))
    before = snapshot(registry.root)
    assert_refused(cli("train", "--base", tiny_model, "--data", tiny_data, "--name", "never", "--report-to", "wandb"),
                   "--report-to wandb needs the wandb package, which is not installed here — pip install wandb", before, registry)
    assert registry.runs() == []
