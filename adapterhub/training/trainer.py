"""The training loop: mlx-lm's building blocks, our loop, so checkpoints and exact resume are ours.

Model loading, LoRA/DoRA layers, datasets, batching, the loss and the
compiled step are mlx-lm's. What we own: batches are drawn from a private
numpy state (mlx-lm's validation draws from the global one), every step
re-seeds MLX's random state from (seed, step), and checkpoints carry the
optimizer state, so a run resumed from step N continues exactly as if it had
never stopped.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from ..errors import AdapterHubError, IncompatibleError, NotFoundError
from ..fingerprint import fingerprint_dataset
from ..files import write_json
from ..records import ParentEdge, now
from . import checkpoints
from .callbacks import TrainingCallback, TrainReport
from .config import TrainConfig
from .data import DataError, validate as validate_data



@dataclass
class _Batches:
    """mlx-lm's iterate_batches on a private numpy random state, so evaluation cannot shift the order."""

    iterator: object
    state: tuple | None = None

    def __next__(self):
        import numpy as np

        outer = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        try:
            return next(self.iterator)
        finally:
            self.state = np.random.get_state()
            np.random.set_state(outer)


def _refuse_dora_on_experts(tensors: dict, first_layer: int) -> None:
    """mlx-lm wraps every linear and expert layer of the trained layers, and has no DoRA for experts: it would
    raise mid-build ("SwitchLinear doesn't support DoRA yet"). Refused here, from the weight header, before anything loads."""
    import re

    experts = sorted(name[: -len(".weight")] for name, (_, shape) in tensors.items()
                     if name.endswith(".weight") and len(shape) == 3
                     and (m := re.search(r"(?:^|\.)layers\.(\d+)\.", name)) and int(m.group(1)) >= first_layer)
    if experts:
        raise IncompatibleError("--kind dora: mlx-lm has no DoRA for the expert layers of a mixture of experts "
                                f"(SwitchLinear doesn't support DoRA yet), and the trained layers hold {len(experts)} "
                                f"({experts[0]}" + (", …)" if len(experts) > 1 else ")"),
                                hint="train --kind lora on this model")


def new_run_id(name: str) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in name.lower())[:40].strip("-")
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    from ..version import __version__

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "adapterhub": __version__}


class Trainer:
    """One training run, new or resumed."""

    def __init__(self, registry, config: TrainConfig, run_id: str | None = None, callback: TrainingCallback | None = None):
        self.registry = registry
        self.config = config
        self.run_id = run_id or new_run_id(config.name)
        self.run_dir = registry.root / "runs" / self.run_id
        self.callback = callback or TrainingCallback()

    # ---- set-up: everything checked before the run is recorded ----------------

    def prepare(self) -> None:
        """Every check that needs no model: a refused run loads nothing and writes nothing."""
        config = self.config
        config.check()  # again here: a library caller may build a TrainConfig without merge()
        self.examples = validate_data(Path(config.data), config.mask_prompt)
        for split, count in self.examples.items():
            # mlx-lm's iterate_batches refuses a split smaller than a batch: valid at the first evaluation,
            # test only after the last step, both long after the run was recorded.
            if count < config.batch_size:
                raise AdapterHubError(f"{split}.jsonl has {count} examples, fewer than --batch-size {config.batch_size}",
                                      hint=f"add examples to {split}.jsonl or lower --batch-size")
        from .. import naming

        naming.check_name(config.name, self.registry.policy, config.tags)
        self.base = self.registry.resolve_base(config.base)
        self.base_fp = self.base.fingerprint
        model_layers = (self.base_fp.get("config") or {}).get("num_hidden_layers")
        if isinstance(model_layers, int):  # the model checks its own layers again once loaded
            if config.kind == "loreft":
                from .. import loreft

                loreft.check_layers(loreft.parse_layers(config.layers, model_layers), model_layers)
            else:
                wrapped = config.layers_to_train(model_layers)
                if config.kind == "dora":
                    _refuse_dora_on_experts(self.base_fp.get("tensors") or {}, model_layers - wrapped)
        self.base_path = self.base.path
        self.dataset_fp = fingerprint_dataset(Path(config.data))
        self.parent = self.registry.resolve(config.from_ref) if config.from_ref else None
        if self.parent:
            recorded = self.parent.record.get("base")
            if recorded and recorded["structure_sha256"] != self.base_fp["structure_sha256"]:
                raise IncompatibleError(f"--from {self.parent.ref} was trained on base {recorded['name']}, "
                                        f"whose structure differs from {config.base}", hint="train from it on its own base")
            if self.parent.record["kind"] != config.kind or self.parent.record["rank"] != config.rank:
                raise IncompatibleError(
                    f"--from {self.parent.ref} is {self.parent.record['kind']} rank {self.parent.record['rank']}, "
                    f"this run is {config.kind} rank {config.rank}",
                    hint=f"pass --kind {self.parent.record['kind']} --rank {self.parent.record['rank']}")

    def build(self):
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx_lm import load
        from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
        from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
        from types import SimpleNamespace

        config = self.config
        mx.random.seed(config.seed)
        model, tokenizer = load(str(self.base_path))
        self.loreft_config = None
        if config.kind == "loreft":
            from .. import loreft

            self.loreft_config = loreft.LoReFTConfig(
                layers=loreft.parse_layers(config.layers, len(model.layers)), rank=config.rank, positions=config.positions,
                share_weights=config.share_weights, dropout=config.dropout, activation=config.activation,
                hidden_size=loreft.hidden_size_of(model))
            loreft.apply(model, self.loreft_config)
        else:
            # The run records the number of layers it wraps, not "default" or -1: the same adapter, the same config.
            config = self.config = replace(config, num_layers=config.layers_to_train(len(model.layers)))
            model.freeze()
            linear_to_lora_layers(model, config.num_layers, {"rank": config.rank, "scale": config.scale, "dropout": config.dropout},
                                  use_dora=config.kind == "dora")
        if self.parent:
            self._load_parent(model)
        try:
            train, valid, test = load_local_dataset(Path(config.data), tokenizer, SimpleNamespace(mask_prompt=config.mask_prompt))
            if len(train):
                train[0]  # mlx-lm tokenizes lazily: surface a data/tokenizer mismatch now, not mid-run
        except ValueError as e:
            raise DataError(f"{config.data} cannot be tokenized for this base: {e}".split("For information")[0].strip(),
                            hint="completions and chat data need a tokenizer with a chat template; use text data otherwise") from None
        learning_rate = build_schedule(config.lr_schedule) if config.lr_schedule else config.learning_rate
        optimizer = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[config.optimizer](learning_rate=learning_rate)
        self.test_set = CacheDataset(test) if len(test) else None
        return model, tokenizer, CacheDataset(train), CacheDataset(valid) if len(valid) else None, optimizer

    def _load_parent(self, model) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        weights = mx.load(str(self.registry.weights(self.parent)), format="safetensors")
        trainable = dict(tree_flatten(model.trainable_parameters()))
        problems = [f"{k} {list(v.shape)}" for k, v in weights.items() if k not in trainable or trainable[k].shape != v.shape]
        missing = sorted(set(trainable) - set(weights))
        if problems or missing:
            raise IncompatibleError(
                f"--from {self.parent.ref} does not match this run's layers: "
                + (f"{len(problems)} of its tensors have no place here (e.g. {problems[0]})" if problems
                   else f"{len(missing)} of this run's tensors are missing from it (e.g. {missing[0]})"),
                hint=f"use the parent's targets and layers: --num-layers {self.parent.record['num_layers']} --rank {self.parent.record['rank']}")
        model.load_weights(list(weights.items()), strict=False)

    # ---- the run --------------------------------------------------------------

    def run(self, resume: bool = False):
        """Train to the end and register the result; returns the new AdapterVersion."""
        if not resume:
            self.prepare()
        model, tokenizer, train_set, valid_set, optimizer = self.build()
        record = self._start_record(resume)
        try:
            version = self._loop(model, optimizer, train_set, valid_set, record)
        except KeyboardInterrupt:
            self.registry.update_run(self.run_id, status="interrupted", pid=None)
            raise
        except BaseException:
            self.registry.update_run(self.run_id, status="failed", pid=None, finished_at=now())
            raise
        return version

    def _start_record(self, resume: bool) -> dict:
        fields = {"status": "running", "pid": os.getpid(), "host": socket.gethostname()}
        if resume:
            return self.registry.update_run(self.run_id, **fields)
        self.run_dir.mkdir(parents=True, exist_ok=False)
        write_json(self.run_dir / "config.json", self.config.to_dict())
        write_json(self.run_dir / "adapter_config.json", self.adapter_config())  # what `checkpoints promote` registers with
        return self.registry.start_run({
            "id": self.run_id, "name": self.config.name, "step": 0, "iters": self.config.iters, "config": self.config.to_dict(),
            "config_sha256": self.config.sha256(), "dir": str(self.run_dir),
            "base": {k: self.base_fp.get(k) for k in ("sha256", "structure_sha256", "model_type")} | {"name": self._base_name()},
            "dataset": {"name": self.registry.dataset_name_for(self.dataset_fp, Path(self.config.data)),
                        "sha256": self.dataset_fp["sha256"], "examples": self.dataset_fp["examples"]},
            "parent": self.parent.ref if self.parent else None, "result": None, "losses": {"train": [], "val": []},
            "trained_tokens": 0, "train_seconds": 0.0, "started_at": now(), "finished_at": None, **fields,
        })

    def _base_name(self) -> str:
        from .. import naming

        return self.base.name or naming.suggest_name(self.base_path.resolve().name)

    def _loop(self, model, optimizer, train_set, valid_set, record: dict):
        import mlx.core as mx
        import mlx.nn as nn
        import numpy as np
        from mlx.utils import tree_map, tree_unflatten
        from mlx_lm.tuner.trainer import evaluate, iterate_batches

        from .. import loreft

        config = self.config
        start_step, losses = 0, record.get("losses") or {"train": [], "val": []}
        trained_tokens, train_seconds = record.get("trained_tokens", 0), record.get("train_seconds", 0.0)
        latest = checkpoints.listing(self.run_dir)[-1] if record["step"] else None
        if latest:
            model.load_weights(list(mx.load(str(latest.path)).items()), strict=False)
        # The optimizer state exists before the step is compiled: made lazily by the first update, it would
        # change the compiled step's inputs and have it traced twice.
        optimizer.init(model.trainable_parameters())
        if latest:
            optimizer.state = tree_unflatten(list(mx.load(str(latest.state_path)).items()))
            start_step = latest.step
            losses = {k: [p for p in v if p[0] <= start_step] for k, v in losses.items()}
            self.callback.on_resume(start_step)
        batches = _Batches(iterate_batches(train_set, config.batch_size, config.max_seq_length, loop=True, seed=config.seed))
        for _ in range(start_step):
            next(batches)  # the data position is the step: replay the order, skip what was trained

        loss_fn = self.loss_fn
        loss_value_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, optimizer.state, mx.random.state]
        retract = loreft.retract if self.loreft_config else None

        # mlx-lm's compiled step, for every kind. LoReFT's retraction (R back onto orthonormal rows) is part of
        # the update: array ops in the same compiled graph, so a step never waits on the host or the CPU stream.
        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, previous, do_update):
            (value, tokens), grad = loss_value_and_grad(model, *batch)
            if previous is not None:
                grad = tree_map(lambda x, y: x + y, grad, previous)
            if do_update:
                if config.grad_accumulation_steps > 1:
                    grad = tree_map(lambda x: x / config.grad_accumulation_steps, grad)
                optimizer.update(model, grad)
                if retract:
                    retract(model)
                grad = None
            return value, tokens, grad

        def validation_loss(at: int) -> float | None:
            if valid_set is None:
                return None
            np.random.seed(config.seed + at)  # evaluation order must not depend on when a run restarted
            value = evaluate(model=model, dataset=valid_set, loss=loss_fn, batch_size=config.batch_size,
                             num_batches=config.val_batches, max_seq_length=config.max_seq_length)
            model.train()
            return float(value)

        def record_val(it: int) -> float | None:
            val = validation_loss(it)
            if val is not None:
                losses["val"].append([it, val])
                self.callback.on_val_report(it, val)
            return val

        model.train()
        accumulated, window_loss, window_tokens, window_steps, window_time = None, 0.0, 0, 0, 0.0
        for it in range(start_step + 1, config.iters + 1):
            saving = it % config.save_every == 0 and it != config.iters
            due = it == 1 or it % config.steps_per_eval == 0 or it == config.iters  # mlx-lm's schedule
            # A checkpoint's validation loss is measured on the weights it saves, after this step's update:
            # at every checkpoint when --keep-best ranks them, else when mlx-lm's schedule falls on it.
            # Elsewhere validation runs before the step's update, as in mlx-lm. One value per step either way.
            after_update = saving and (config.keep_best > 0 or due)
            if due and not after_update:
                record_val(it)
            batch = next(batches)  # drawn before the clock starts, as mlx-lm times its steps
            tic = time.perf_counter()
            mx.random.seed(config.seed * 1_000_003 + it)  # dropout masks depend on the step alone
            value, tokens, accumulated = step(batch, accumulated, it % config.grad_accumulation_steps == 0)
            mx.eval(state, value, tokens, accumulated)
            elapsed = time.perf_counter() - tic
            window_loss += value.item()
            window_tokens += tokens.item()
            window_steps += 1
            window_time += elapsed
            if it % config.steps_per_report == 0 or it == config.iters or it % config.save_every == 0:
                train_loss = window_loss / window_steps
                losses["train"].append([it, train_loss])
                trained_tokens += window_tokens
                train_seconds += window_time
                self.callback.on_train_report(TrainReport(
                    it, config.iters, train_loss, window_tokens / window_time if window_time else 0.0,
                    float(optimizer.learning_rate)))
                window_loss, window_tokens, window_steps, window_time = 0.0, 0, 0, 0.0
            if saving:
                val = record_val(it) if after_update else None
                started = time.perf_counter()
                removed = self._checkpoint(it, model, optimizer, losses, val)
                # The run record is updated before the checkpoint is announced, so whoever reads
                # the announcement (a person, a script, a test) finds the record already there.
                self.registry.update_run(self.run_id, step=it, losses=losses, trained_tokens=trained_tokens,
                                         train_seconds=round(train_seconds, 3))
                self.callback.on_checkpoint(it, removed, time.perf_counter() - started)
        return self._finish(model, losses, trained_tokens, train_seconds)

    def _checkpoint(self, it: int, model, optimizer, losses: dict, val_loss: float | None) -> list:
        from mlx.utils import tree_flatten

        metadata = {
            "train_loss": losses["train"][-1][1], "val_loss": val_loss if val_loss is not None else "",
            "learning_rate": float(optimizer.learning_rate), "config_sha256": self.config.sha256(),
            "base_sha256": self.base_fp["sha256"], "dataset_sha256": self.dataset_fp["sha256"],
            "parent_ref": self.parent.ref if self.parent else "", "run_id": self.run_id,
        }
        checkpoints.save(self.run_dir, it, dict(tree_flatten(model.trainable_parameters())),
                         dict(tree_flatten(optimizer.state)), metadata)
        return checkpoints.prune(self.run_dir, self.config.keep_last, self.config.keep_best, self.config.keep_every)

    def adapter_config(self) -> dict:
        return self.config.adapter_config(self.loreft_config.to_dict() if self.loreft_config else None)

    @property
    def loss_fn(self):
        """mlx-lm's loss; LoReFT's sets each row's prompt positions first."""
        if self.loreft_config:
            from .. import loreft

            return loreft.loss
        from mlx_lm.tuner.trainer import default_loss

        return default_loss

    def _test_loss(self, model) -> dict:
        """Loss and perplexity on test.jsonl (up to --val-batches batches), as mlx_lm.lora --test reports them."""
        import math

        import numpy as np
        from mlx_lm.tuner.trainer import evaluate

        if self.test_set is None:
            return {}
        np.random.seed(self.config.seed)
        model.eval()
        value = float(evaluate(model=model, dataset=self.test_set, loss=self.loss_fn, batch_size=self.config.batch_size,
                               num_batches=self.config.val_batches, max_seq_length=self.config.max_seq_length))
        self.callback.on_test(value, math.exp(value))
        return {"test_loss": round(value, 6), "test_perplexity": round(math.exp(value), 4)}

    def _finish(self, model, losses: dict, trained_tokens: int, train_seconds: float):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        # The run folder keeps what mlx_lm.lora leaves in --adapter-path; the registry gets the same tensors directly.
        folder = self.run_dir / "adapter"
        folder.mkdir(exist_ok=True)
        tensors = dict(tree_flatten(model.trainable_parameters()))
        tmp = folder / ".adapters.tmp.safetensors"
        mx.save_safetensors(str(tmp), tensors)
        os.replace(tmp, folder / "adapters.safetensors")
        write_json(folder / "adapter_config.json", self.adapter_config())
        test = self._test_loss(model)
        started = datetime.fromisoformat(self.registry.run(self.run_id)["started_at"].replace("Z", "+00:00"))
        wall = (datetime.now(timezone.utc) - started).total_seconds()
        training = {"tool": "adapterhub", "hyperparameters": self.adapter_config(), "losses": losses, **test,
                    "trained_tokens": trained_tokens, "train_seconds": round(train_seconds, 3),
                    "wall_seconds": round(wall, 1), "run_id": self.run_id,
                    "versions": _versions(), "config_sha256": self.config.sha256()}
        parents = [ParentEdge(self.parent.ref, self.parent.sha256, "resumed-from").to_dict()] if self.parent else []
        version, _ = self.registry.add_version(
            self.config.name, tensors, self.adapter_config(), base=str(self.base_path), dataset=self.config.data,
            parents=parents, tags=self.config.tags, description=f"trained by adapterhub (run {self.run_id})",
            training=training)
        self.registry.update_run(self.run_id, status="finished", step=self.config.iters, result=version.ref, pid=None,
                                 losses=losses, trained_tokens=trained_tokens, train_seconds=round(train_seconds, 3),
                                 finished_at=now())
        self.callback.on_finish(version.ref)
        return version


def train(registry, config: TrainConfig, callback: TrainingCallback | None = None):
    """Train a new version; returns it."""
    return Trainer(registry, config, callback=callback).run()


def resume(registry, run_id: str, callback: TrainingCallback | None = None):
    """Continue an interrupted (or failed) run from its newest checkpoint; returns the new version."""
    record = registry.run(run_id)
    if record["status"] == "finished":
        raise AdapterHubError(f"run {run_id} already finished as {record['result']}", hint="nothing to resume")
    if registry.run_status(record) == "running":
        raise AdapterHubError(f"run {run_id} is still running (pid {record['pid']} on {record['host']})",
                              hint="wait for it, or stop it first")
    config = TrainConfig(**record["config"])
    trainer = Trainer(registry, config, run_id=run_id, callback=callback)
    trainer.prepare()
    if not Path(record["dir"]).is_dir():
        raise NotFoundError(f"run folder {record['dir']} is gone", hint="the run cannot be resumed; train again")
    return trainer.run(resume=True)
