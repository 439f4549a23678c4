"""Training options: mlx-lm's names and defaults, read from the CLI, a YAML file (as mlx-lm reads it), or both."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import AdapterHubError

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
    num_layers: int = 16
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    lr_schedule: dict | None = None
    optimizer: str = "adam"
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

    def to_dict(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        """Identity of what shapes the weights (retention options and tags do not)."""
        ignored = {"keep_last", "keep_best", "keep_every", "tags", "steps_per_report", "name"}
        doc = {k: v for k, v in self.to_dict().items() if k not in ignored}
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
        }
        if self.kind == "loreft":
            return {**training, "loreft_parameters": loreft}
        return {**training, "num_layers": self.num_layers,
                "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}}

    def check(self) -> None:
        problems = []
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None \
                    and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{f.name} must be a number, got {value!r}")
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
        if self.optimizer not in ("adam", "adamw", "sgd"):
            problems.append(f"--optimizer {self.optimizer} is not supported (adam, adamw, sgd)")
        for name in ("rank", "iters", "batch_size", "grad_accumulation_steps", "save_every", "max_seq_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
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
               "resume_adapter_file": None, "test_batches": None, "config": None, "grad_checkpoint": None}
    known = {f.name for f in fields(TrainConfig)}
    for key, value in doc.items():
        if key == "lora_parameters":
            options.update({k: value[k] for k in ("rank", "scale", "dropout") if k in value})
            continue
        key = renames.get(key, key)
        if key in known:
            options[key] = value
    return options


def merge(cli: dict, yaml_path: Path | None) -> TrainConfig:
    """CLI options beat the YAML file, which beats mlx-lm's defaults."""
    options = from_yaml(yaml_path) if yaml_path else {}
    options.update({k: v for k, v in cli.items() if v is not None})
    missing = [k for k in ("base", "data", "name") if not options.get(k)]
    if missing:
        raise AdapterHubError(f"missing {', '.join('--' + m for m in missing)}", hint="give them on the command line or in --config")
    if options.get("kind") == "loreft":
        options["mask_prompt"] = True  # the loss is on the completion, the edit on the prompt
    config = TrainConfig(**options)
    config.check()
    return config


def with_overrides(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)
