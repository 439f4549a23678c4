"""Training options: mlx-lm's names and defaults, read from the CLI, a YAML file (as mlx-lm reads it), or both."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import AdapterHubError, IncompatibleError
from ..ranges import Range, problem
from . import optimizers
from .optimizers import normalized_config

MLX_LM_LEARNING_RATE = 1e-5
# mlx-lm's 1e-5 barely moves a LoReFT edit in a hundred steps; pyreft's examples train with 9e-4 to 4e-3.
LOREFT_LEARNING_RATE = 4e-3
# mlx-lm's default --num-layers: the last 16 decoder layers, or all of a model that has fewer.
DEFAULT_NUM_LAYERS = 16
ALL = -1  # --num-layers -1 / --val-batches -1: every layer / the whole validation set, as in mlx-lm


# Seeds go to numpy, which takes 0 <= seed + step < 2**32; both halves stay below 2**31.
_INT32 = 2**31 - 1
RANGES: dict[str, Range] = {
    "rank": Range(1, None),
    "scale": Range(None, None),
    "dropout": Range(0.0, 1.0, max_open=True),
    "num_layers": Range(1, None, also=ALL),
    "iters": Range(1, _INT32),
    "batch_size": Range(1, None),
    "learning_rate": Range(0.0, None),
    "max_seq_length": Range(1, None),
    "grad_accumulation_steps": Range(1, None),
    "seed": Range(0, _INT32),
    "val_batches": Range(1, None, also=ALL),
    "steps_per_eval": Range(1, None),
    "steps_per_report": Range(1, None),
    "save_every": Range(1, None),
    "keep_last": Range(0, None),
    "keep_best": Range(0, None),
    "keep_every": Range(0, None),
}
FLOAT_OPTIONS = frozenset({"scale", "dropout", "learning_rate"})


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def range_problem(name: str, value) -> str | None:
    """Why `value` is not allowed for the numeric option `name`, or None when it is."""
    return problem(option_name(name), value, RANGES[name], name in FLOAT_OPTIONS)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result (and so its config hash)."""

    base: str
    data: str
    name: str
    kind: str = "lora"
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    # None: mlx-lm's default (the last 16 layers, or all of a shallower model); the trainer records the number used.
    num_layers: int | None = None
    iters: int = 1000
    batch_size: int = 4
    # None: mlx-lm's 1e-5, or LOREFT_LEARNING_RATE for --kind loreft.
    learning_rate: float | None = None
    # mlx-lm's YAML shapes: {name, arguments, warmup, warmup_init} and {optimizer name: keyword arguments}.
    lr_schedule: dict | None = None
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    max_seq_length: int = 2048
    grad_accumulation_steps: int = 1
    mask_prompt: bool = False
    seed: int = 0
    val_batches: int = 25
    steps_per_eval: int = 200
    steps_per_report: int = 10
    save_every: int = 100
    keep_last: int = 3
    keep_best: int = 1
    keep_every: int | None = None
    from_ref: str | None = None
    tags: dict = field(default_factory=dict)
    # LoReFT only: decoder layers (`8;16` or `all`), prompt positions in pyreft's notation, and the edit's shape.
    layers: str | None = None
    positions: str = "f1+l1"
    share_weights: bool = False
    activation: str = "linear"
    # How the run is carried out, not what it learns: none of these enters the config hash.
    grad_checkpoint: bool = False
    report_to: str | None = None
    project_name: str | None = None

    def __post_init__(self):
        if self.learning_rate is None:
            default = LOREFT_LEARNING_RATE if self.kind == "loreft" else MLX_LM_LEARNING_RATE
            object.__setattr__(self, "learning_rate", default)
        object.__setattr__(self, "optimizer_config", normalized_config(self.optimizer, self.optimizer_config))

    def layers_to_train(self, model_layers: int) -> int:
        """The number of decoder layers LoRA/DoRA wraps on a model with `model_layers`, as mlx-lm counts them."""
        if self.num_layers is None:
            return min(DEFAULT_NUM_LAYERS, model_layers)
        if self.num_layers == ALL:
            return model_layers
        if self.num_layers > model_layers:
            # mlx-lm refuses an explicit count beyond the model rather than silently training fewer.
            raise IncompatibleError(f"--num-layers {self.num_layers} but the base has {model_layers} layers",
                                    hint=f"pass --num-layers {model_layers} or fewer (-1 for all)")
        return self.num_layers

    def to_dict(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        """Identity of what shapes the weights (retention options, tags and how the run is carried out do not)."""
        ignored = {"keep_last", "keep_best", "keep_every", "tags", "steps_per_report", "name", "grad_checkpoint",
                   "report_to", "project_name"}
        doc = {k: v for k, v in self.to_dict().items() if k not in ignored}
        if not doc["optimizer_config"]:
            del doc["optimizer_config"]  # runs recorded before optimizer_config existed keep their hash
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def adapter_config(self, loreft: dict | None = None) -> dict:
        """The adapter_config.json mlx-lm writes for the same options, so mlx_lm loads our output as is.

        A LoReFT adapter (`loreft`: its resolved parameters) is ours alone: mlx-lm cannot load it.
        """
        training = {
            "fine_tune_type": self.kind, "iters": self.iters, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "lr_schedule": self.lr_schedule, "optimizer": self.optimizer,
            "max_seq_length": self.max_seq_length, "grad_accumulation_steps": self.grad_accumulation_steps,
            "mask_prompt": self.mask_prompt, "seed": self.seed, "steps_per_eval": self.steps_per_eval,
            "val_batches": self.val_batches, "save_every": self.save_every,
            # Only when set, so an adapter trained without them keeps the adapter_config.json it always had.
            **({"optimizer_config": self.optimizer_config} if self.optimizer_config else {}),
            **({"grad_checkpoint": True} if self.grad_checkpoint else {}),
        }
        if self.kind == "loreft":
            return {**training, "loreft_parameters": loreft}
        return {**training, "num_layers": self.num_layers,
                "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}}

    def check(self) -> None:
        """Refuse options that cannot train, before any model loads or anything is written."""
        problems = []
        for name in RANGES:
            value = getattr(self, name)
            if value is None and name in ("num_layers", "keep_every"):
                continue  # mlx-lm's default layers / no keep-every rule
            problem = range_problem(name, value)
            if problem:
                problems.append(problem)
        for name in ("mask_prompt", "share_weights", "grad_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{option_name(name)} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise AdapterHubError("; ".join(problems), hint="fix the training options")
        if self.kind not in ("lora", "dora", "loreft"):
            problems.append(f"--kind {self.kind} is not trainable here (lora, dora or loreft)")
        if self.kind == "loreft":
            from ..loreft import ACTIVATIONS, parse_layers, parse_positions

            if not self.layers:
                problems.append("--kind loreft needs --layers (e.g. 8;16, or all)")
            elif str(self.layers).strip().lower() != "all":
                parse_layers(self.layers)
            parse_positions(self.positions)
            if self.activation not in ACTIVATIONS:
                problems.append(f"--activation {self.activation} is not one of {', '.join(ACTIVATIONS)}")
            if not self.mask_prompt:
                problems.append("LoReFT edits prompt positions and learns the completion: it needs prompt/completion data")
        problems.extend(optimizers.problems(self))
        if self.report_to not in (None, "", "wandb"):
            problems.append(f"--report-to {self.report_to} is not supported (wandb)")
        if self.save_every % self.grad_accumulation_steps:
            problems.append("--save-every must be a multiple of --grad-accumulation-steps, so checkpoints fall on updates")
        if problems:
            raise AdapterHubError("; ".join(problems), hint="fix the training options")


def from_yaml(path: Path) -> dict:
    """Options from a YAML file in mlx-lm's layout (lora_parameters nested, fine_tune_type for the kind)."""
    import yaml
    from mlx_lm.lora import yaml_loader  # mlx-lm's loader: it reads 1e-5 as a float, as YAML 1.1 does not

    try:
        doc = yaml.load(Path(path).read_text(), yaml_loader) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AdapterHubError(f"cannot read config {path}: {e}", hint="give a YAML file like mlx-lm's lora_config.yaml") from None
    if not isinstance(doc, dict):
        raise AdapterHubError(f"{path} is not a YAML mapping", hint="give a YAML file like mlx-lm's lora_config.yaml")
    options = {}
    renames = {"fine_tune_type": "kind", "model": "base", "adapter_path": None, "train": None, "test": None,
               "resume_adapter_file": None, "test_batches": None, "config": None}
    known = {f.name for f in fields(TrainConfig)}
    for key, value in doc.items():
        if key == "lora_parameters":
            if not isinstance(value, dict):
                raise AdapterHubError(f"{path}: lora_parameters must be a mapping (rank, scale, dropout), got {value!r}",
                                      hint="give a YAML file like mlx-lm's lora_config.yaml")
            options.update({k: value[k] for k in ("rank", "scale", "dropout") if k in value})
            continue
        key = renames.get(key, key)
        if key in known:
            options[key] = value
    return options


def merge(cli: dict, yaml_path: Path | None) -> TrainConfig:
    """CLI options beat the YAML file, which beats the defaults (mlx-lm's, but LoReFT's learning rate).

    The command line may give the schedule as `lr_schedule` (NAME or NAME:ARG,...), `warmup` and
    `warmup_init`; they become mlx-lm's lr_schedule mapping, over the file's.
    """
    cli = dict(cli)
    # A mapping (from Python) is mlx-lm's lr_schedule itself; text is the command line's NAME[:ARGS].
    names = ("lr_schedule", "warmup", "warmup_init") if not isinstance(cli.get("lr_schedule"), dict) else ("warmup", "warmup_init")
    schedule = {"lr_schedule": None, **{k: cli.pop(k, None) for k in names}}
    options = from_yaml(yaml_path) if yaml_path else {}
    options.update({k: v for k, v in cli.items() if v is not None})
    missing = [k for k in ("base", "data", "name") if not options.get(k)]
    if missing:
        raise AdapterHubError(f"missing {', '.join('--' + m for m in missing)}", hint="give them on the command line or in --config")
    if options.get("kind") == "loreft":
        options["mask_prompt"] = True  # the loss is on the completion, the edit on the prompt
    config = TrainConfig(**options)
    if any(v is not None for v in schedule.values()):
        config = replace(config, lr_schedule=optimizers.schedule_from_options(
            config.lr_schedule, schedule["lr_schedule"], schedule["warmup"], schedule["warmup_init"],
            config.learning_rate, config.iters))
    config.check()
    return config


def with_overrides(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)
