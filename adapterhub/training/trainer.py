"""The training loop: mlx-lm's building blocks, our loop, so checkpoints and exact resume are ours.

Model loading, LoRA/DoRA layers, datasets, batching, the loss and the compiled step are
mlx-lm's. What we own: batches are drawn from a private numpy state (mlx-lm's validation draws
from the global one), every step re-seeds MLX's random state from (seed, step), and checkpoints
carry the optimizer state, so a run resumed from step N continues exactly as if it had never
stopped.

Under mlx.launch the same loop runs on every rank (distributed.py): rank 0 plans, checks and
writes; every rank trains its slice of each global batch; the data position and the seeds are
global, so exact resume holds there too.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ..errors import AdapterHubError, IncompatibleError
from ..fingerprint import fingerprint_dataset, fingerprint_model
from ..files import write_json
from ..records import ParentEdge, now
from . import checkpoints, distributed, optimizers, preflight, trackers
from .callbacks import Fanout, TrainingCallback, TrainReport
from .config import TrainConfig
from .data import DataError
from .steps import Batches, checkpoint_gradients, compile_step


def new_run_id(name: str) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in name.lower())[:40].strip("-")
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    from ..version import __version__

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "adapterhub": __version__}


def step_seed(seed: int, step: int, world) -> int:
    """MLX's seed for one step on one rank: dropout masks depend on the step alone, and on the rank, so ranks
    draw different masks. With one process these are the seeds runs always had, so older runs resume exactly."""
    return (seed * 1_000_003 + step) * world.size + world.rank


class Trainer:
    """One training run, new or resumed, in this process (one rank of several under mlx.launch)."""

    def __init__(self, registry, config: TrainConfig | None, run_id: str | None = None,
                 callback: TrainingCallback | None = None, world: distributed.World | None = None):
        self.registry = registry  # used by rank 0 alone: the other ranks may have no registry at all
        self.config = config
        self.world = world or distributed.init()
        self.run_id = run_id or new_run_id(config.name)
        # Only rank 0 reports, as only rank 0 writes: N copies of each report line would say nothing more.
        self.callback = (callback or TrainingCallback()) if self.world.writes else TrainingCallback()
        self.parent, self.latest, self.start_step = None, None, 0

    @property
    def run_dir(self) -> Path:
        return self.registry.root / "runs" / self.run_id

    # ---- set-up: everything checked before the run is recorded ----------------

    def prepare(self) -> None:
        """Every check that needs no model: a refused run loads nothing and writes nothing."""
        checked = preflight.check(self.registry, self.config, self.world.size)
        self.base, self.base_fp, self.base_path = checked.base, checked.base.fingerprint, checked.base.path
        self.dataset_fp, self.parent = checked.dataset_fp, checked.parent

    def _plan(self, resume: bool) -> dict:
        """Rank 0: every check, then what the other ranks need to follow it."""
        if resume:
            record = preflight.resumable(self.registry, self.run_id)
            self.config = TrainConfig(**record["config"])
        self.prepare()
        if resume:
            kept = checkpoints.listing(self.run_dir) if record["step"] else []
            self.latest = kept[-1] if kept else None
            self.start_step = self.latest.step if self.latest else 0
        return {"config": self.config.to_dict(), "run_id": self.run_id, "base": str(self.base_path),
                "start_step": self.start_step}

    def _follow(self, plan: dict) -> None:
        """Ranks other than 0: rank 0's plan, which must be what this rank was asked to run."""
        asked, self.config = self.config, TrainConfig(**plan["config"])
        self.run_id, self.base_path, self.start_step = plan["run_id"], Path(plan["base"]), plan["start_step"]
        # Compared as rank 0 sent it, through JSON, where a tuple of the library's caller is a list.
        ours, theirs = json.loads(json.dumps(asked.to_dict())) if asked else None, self.config.to_dict()
        if ours is not None and ours != theirs:
            differing = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise AdapterHubError(f"its training options differ from rank 0's ({', '.join(differing)})",
                                  hint="launch every rank with the same command line and --config file")

    def _agree(self, resume: bool) -> None:
        """Rank 0 plans; every rank checks its own base and data against rank 0's; all go on, or all refuse."""
        world, error, plan = self.world, None, None
        if world.writes:
            try:
                plan = self._plan(resume)
            except BaseException as e:  # the other ranks wait for the plan: they must hear about any failure
                error = e
        distributed.refuse_together(world, error)
        if not world.distributed:
            return
        plan, mine = world.share(plan), None
        try:
            if not world.writes:
                self._follow(plan)
            mine = {"base": fingerprint_model(self.base_path)["sha256"],
                    "data": fingerprint_dataset(Path(self.config.data))["sha256"], "versions": _versions()}
        except BaseException as e:
            error = e
        distributed.refuse_together(world, error)
        distributed.check_same_inputs(world, mine)

    def build(self):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from types import SimpleNamespace

        config = self.config
        mx.random.seed(config.seed)
        model, tokenizer = load(str(self.base_path))
        if config.grad_checkpoint:
            checkpoint_gradients(model)
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
        self.test_set = CacheDataset(test) if len(test) else None
        return model, tokenizer, CacheDataset(train), CacheDataset(valid) if len(valid) else None, optimizers.build(config)

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

    def _together(self, work):
        """`work()`'s result; when it fails on any rank, every rank stops, so none waits in a collective for it."""
        result, error = None, None
        try:
            result = work()
        except BaseException as e:
            error = e
        distributed.refuse_together(self.world, error)
        return result

    def _set_up(self):
        """The model, data and optimizer (every rank), rank 0's trackers."""
        built = self.build()
        if self.world.writes:
            found = trackers.callbacks_for(self.config, self.run_id)
            self.callback = Fanout(self.callback, *found) if found else self.callback
        return built

    # ---- the run --------------------------------------------------------------

    def run(self, resume: bool = False):
        """Train to the end and register the result; returns the new AdapterVersion (None on ranks other than 0)."""
        self._agree(resume)
        model, tokenizer, train_set, valid_set, optimizer = self._together(self._set_up)
        record = self._together(lambda: self._start_record(resume) if self.world.writes else None)
        try:
            version = self._loop(model, optimizer, train_set, valid_set, record)
        except (KeyboardInterrupt, BrokenPipeError):
            # Ctrl-C, a killed mlx.launch, or a closed pipe to whoever watched: stopped from outside, resumable.
            self._record_end(status="interrupted", pid=None)
            raise
        except BaseException:
            self._record_end(status="failed", pid=None, finished_at=now())
            raise
        return version

    def _record_end(self, **fields) -> None:
        if self.world.writes:
            self.registry.update_run(self.run_id, **fields)

    def _start_record(self, resume: bool) -> dict:
        fields = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                  "processes": self.world.size, "backend": self.world.backend}
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
            "peak_memory": [], "trained_tokens": 0, "train_seconds": 0.0, "started_at": now(), "finished_at": None, **fields,
        })

    def _base_name(self) -> str:
        from .. import naming

        return self.base.name or naming.suggest_name(self.base_path.resolve().name)

    def _restore(self, model, optimizer, record: dict | None) -> dict:
        """Weights and optimizer state at the start step, the same on every rank; returns what the record held."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        progress = {"losses": {"train": [], "val": []}, "peak_memory": [], "trained_tokens": 0, "train_seconds": 0.0}
        if record:
            progress.update({k: record.get(k) or progress[k] for k in progress})
        if self.latest:
            model.load_weights(list(mx.load(str(self.latest.path)).items()), strict=False)
        # The optimizer state exists before the step is compiled: made lazily by the first update, it would
        # change the compiled step's inputs and have it traced twice.
        optimizer.init(model.trainable_parameters())
        if self.latest:
            optimizer.state = tree_unflatten(list(mx.load(str(self.latest.state_path)).items()))
        if self.world.distributed:
            # Only rank 0 read the registry (a parent's weights, a checkpoint): every rank starts from its arrays.
            model.load_weights(list(tree_flatten(self.world.share_tree(model.trainable_parameters()))), strict=False)
            optimizer.state = self.world.share_tree(optimizer.state)
        if self.start_step:
            progress["losses"] = {k: [p for p in v if p[0] <= self.start_step] for k, v in progress["losses"].items()}
            progress["peak_memory"] = [p for p in progress["peak_memory"] if p[0] <= self.start_step]
            self.callback.on_resume(self.start_step)
        return progress

    def _loop(self, model, optimizer, train_set, valid_set, record: dict | None):
        import mlx.core as mx
        import numpy as np
        from mlx_lm.tuner.trainer import evaluate, iterate_batches

        from .. import loreft

        config, world = self.config, self.world
        progress = self._restore(model, optimizer, record)
        losses, peaks = progress["losses"], progress["peak_memory"]
        trained_tokens, train_seconds = progress["trained_tokens"], progress["train_seconds"]
        batches = Batches(iterate_batches(train_set, config.batch_size, config.max_seq_length, loop=True, seed=config.seed,
                                          comm_group=world.group if world.distributed else None))
        for _ in range(self.start_step):
            next(batches)  # the data position is the step: replay the order, skip what was trained
        loss_fn = self.loss_fn
        state, step = compile_step(model, optimizer, loss_fn, config, world, loreft.retract if self.loreft_config else None)

        def record_val(at: int) -> float | None:
            if valid_set is None:
                return None
            np.random.seed(config.seed + at)  # evaluation order must not depend on when a run restarted
            val = float(evaluate(model=model, dataset=valid_set, loss=loss_fn, batch_size=config.batch_size,
                                 num_batches=config.val_batches, max_seq_length=config.max_seq_length))
            model.train()
            losses["val"].append([at, val])
            self.callback.on_val_report(at, val)
            return val

        model.train()
        mx.reset_peak_memory()
        accumulated, window_loss, window_tokens, window_steps, window_time = None, 0.0, 0, 0, 0.0
        for it in range(self.start_step + 1, config.iters + 1):
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
            mx.random.seed(step_seed(config.seed, it, world))
            stop = mx.array(float(world.launcher_gone()))
            value, tokens, stop, accumulated = step(batch, accumulated, it % config.grad_accumulation_steps == 0, stop)
            mx.eval(state, value, tokens, stop, accumulated)
            if stop.item():
                raise distributed.LauncherGone(f"mlx.launch is gone: stopped at step {it}")
            elapsed = time.perf_counter() - tic
            window_loss += value.item()
            window_tokens += round(tokens.item())
            window_steps += 1
            window_time += elapsed
            if it % config.steps_per_report == 0 or it == config.iters or it % config.save_every == 0:
                train_loss = window_loss / window_steps
                peak = world.maximum(mx.get_peak_memory())
                mx.reset_peak_memory()
                losses["train"].append([it, train_loss])
                peaks.append([it, peak])
                trained_tokens += window_tokens
                train_seconds += window_time
                self.callback.on_train_report(TrainReport(
                    it, config.iters, train_loss, window_tokens / window_time if window_time else 0.0,
                    float(optimizer.learning_rate), peak))
                window_loss, window_tokens, window_steps, window_time = 0.0, 0, 0, 0.0
            if saving:
                val = record_val(it) if after_update else None
                if world.writes:
                    started = time.perf_counter()
                    removed = self._checkpoint(it, model, optimizer, losses, val)
                    # The run record is updated before the checkpoint is announced, so whoever reads
                    # the announcement (a person, a script, a test) finds the record already there.
                    self.registry.update_run(self.run_id, step=it, losses=losses, peak_memory=peaks,
                                             trained_tokens=trained_tokens, train_seconds=round(train_seconds, 3))
                    self.callback.on_checkpoint(it, removed, time.perf_counter() - started)
        return self._finish(model, losses, peaks, trained_tokens, train_seconds)

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

    def _finish(self, model, losses: dict, peaks: list, trained_tokens: int, train_seconds: float):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        test = self._test_loss(model)  # on every rank: each evaluates its slice of the test batches
        if not self.world.writes:
            return None
        # The run folder keeps what mlx_lm.lora leaves in --adapter-path; the registry gets the same tensors directly.
        folder = self.run_dir / "adapter"
        folder.mkdir(exist_ok=True)
        tensors = dict(tree_flatten(model.trainable_parameters()))
        tmp = folder / ".adapters.tmp.safetensors"
        mx.save_safetensors(str(tmp), tensors)
        os.replace(tmp, folder / "adapters.safetensors")
        write_json(folder / "adapter_config.json", self.adapter_config())
        started = datetime.fromisoformat(self.registry.run(self.run_id)["started_at"].replace("Z", "+00:00"))
        wall = (datetime.now(timezone.utc) - started).total_seconds()
        training = {"tool": "adapterhub", "hyperparameters": self.adapter_config(), "losses": losses, **test,
                    "trained_tokens": trained_tokens, "train_seconds": round(train_seconds, 3),
                    "wall_seconds": round(wall, 1), "run_id": self.run_id, "processes": self.world.size,
                    "backend": self.world.backend, "peak_memory_bytes": max((p for _, p in peaks), default=0),
                    "versions": _versions(), "config_sha256": self.config.sha256()}
        parents = [ParentEdge(self.parent.ref, self.parent.sha256, "resumed-from").to_dict()] if self.parent else []
        version, _ = self.registry.add_version(
            self.config.name, tensors, self.adapter_config(), base=str(self.base_path), dataset=self.config.data,
            parents=parents, tags=self.config.tags, description=f"trained by adapterhub (run {self.run_id})",
            training=training)
        self.registry.update_run(self.run_id, status="finished", step=self.config.iters, result=version.ref, pid=None,
                                 losses=losses, peak_memory=peaks, trained_tokens=trained_tokens,
                                 train_seconds=round(train_seconds, 3), finished_at=now())
        self.callback.on_finish(version.ref)
        return version


def train(registry, config: TrainConfig, callback: TrainingCallback | None = None, world: distributed.World | None = None):
    """Train a new version; returns it (None on ranks other than 0 under mlx.launch)."""
    return Trainer(registry, config, callback=callback, world=world).run()


def resume(registry, run_id: str, callback: TrainingCallback | None = None, world: distributed.World | None = None):
    """Continue an interrupted (or failed) run from its newest checkpoint; returns the new version.

    Under mlx.launch rank 0 reads the run from its registry; the other ranks need only the run id.
    """
    return Trainer(registry, None, run_id=run_id, callback=callback, world=world).run(resume=True)
