"""Checkpoints of a run and their retention policy.

`step-0000100.safetensors` holds the adapter weights, with metadata (step,
losses, learning rate, config hash, base and dataset fingerprints, parent),
so it can be promoted to a version on its own; `step-0000100.state.safetensors`
beside it holds what exact resume needs: the optimizer state. (The data
position is the step: batches are replayed from the seed.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterHubError, NotFoundError
from ..safetensors_io import read_header
from ..schemas import validate
from ..files import temp_path_for, write_json
from ..records import TrainingRun

WEIGHTS = "step-{:07d}.safetensors"
STATE = "step-{:07d}.state.safetensors"
FORMAT = "adapterhub-checkpoint-1"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    metadata: dict[str, str]

    @property
    def val_loss(self) -> float | None:
        value = self.metadata.get("val_loss")
        loss = float(value) if value not in (None, "") else None
        return loss if loss is not None and math.isfinite(loss) else None  # a NaN must never rank as best

    @property
    def state_path(self) -> Path:
        return self.path.with_name(STATE.format(self.step))


def _save(path: Path, arrays: dict, metadata: dict[str, str]) -> None:
    """mx.save_safetensors to a temporary name, then an atomic rename."""
    import os

    import mlx.core as mx

    tmp = temp_path_for(path).with_suffix(".safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(run_dir: Path, step: int, adapter: dict, optimizer_state: dict, metadata: dict[str, str]) -> Checkpoint:
    """Write one checkpoint: state first, weights last, so a listed checkpoint is always whole."""
    metadata = {**{k: str(v) for k, v in metadata.items() if v is not None}, "step": str(step), "format": FORMAT}
    validate(metadata, "checkpoint", what=f"checkpoint {step} metadata")
    _save(run_dir / STATE.format(step), optimizer_state, {"step": str(step), "format": FORMAT})
    _save(run_dir / WEIGHTS.format(step), adapter, metadata)
    return Checkpoint(step, run_dir / WEIGHTS.format(step), metadata)


def listing(run_dir: Path) -> list[Checkpoint]:
    """Every whole checkpoint of a run, oldest first."""
    found = []
    for path in sorted(Path(run_dir).glob("step-*.safetensors")):
        if path.name.endswith(".state.safetensors"):
            continue
        step = int(path.stem.split("-")[1])
        if not path.with_name(STATE.format(step)).is_file():
            continue  # the weights are written last; without state it was never whole
        found.append(Checkpoint(step, path, read_header(path).metadata))
    return found


def find(run_dir: Path, step: int) -> Checkpoint:
    for checkpoint in listing(run_dir):
        if checkpoint.step == step:
            return checkpoint
    steps = ", ".join(str(c.step) for c in listing(run_dir)) or "none"
    raise NotFoundError(f"run has no checkpoint at step {step} (kept: {steps})", hint="run 'adapterhub checkpoints list RUN_ID'")


def check_policy(keep_last: int, keep_best: int, keep_every: int | None) -> None:
    """A negative count would slice from the wrong end and delete what it meant to keep."""
    from .config import range_problem

    problems = [problem for name, value in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every))
                if not (name == "keep_every" and value is None) and (problem := range_problem(name, value))]
    if problems:
        raise AdapterHubError("; ".join(problems), hint="give counts of 0 or more (0 turns a rule off)")


def retained(checkpoints: list[Checkpoint], keep_last: int, keep_best: int, keep_every: int | None) -> dict[int, list[str]]:
    """step -> the reasons it is kept; a step missing from the result is to be deleted.

    Only a checkpoint with a validation loss measured on its own weights can be among the best.
    """
    check_policy(keep_last, keep_best, keep_every)
    reasons: dict[int, list[str]] = {}
    for c in sorted(checkpoints, key=lambda c: c.step)[-keep_last:] if keep_last > 0 else []:
        reasons.setdefault(c.step, []).append("last")
    scored = sorted((c for c in checkpoints if c.val_loss is not None), key=lambda c: (c.val_loss, c.step))
    for c in scored[:keep_best] if keep_best > 0 else []:
        reasons.setdefault(c.step, []).append("best")
    if keep_every:
        for c in checkpoints:
            if c.step % keep_every == 0:
                reasons.setdefault(c.step, []).append(f"every-{keep_every}")
    return reasons


def prune(run_dir: Path, keep_last: int, keep_best: int, keep_every: int | None) -> list[int]:
    """Delete what falls out of the policy (weights first, so a half-pruned checkpoint is never listed)."""
    checkpoints = listing(run_dir)
    keep = retained(checkpoints, keep_last, keep_best, keep_every)  # refuses a bad policy before anything is deleted
    removed = []
    for c in checkpoints:
        if c.step not in keep:
            c.path.unlink(missing_ok=True)
            c.state_path.unlink(missing_ok=True)
            removed.append(c.step)
    return removed


def promote(registry, run_id: str, step: int, name: str):
    """Register the checkpoint of `step` as the next version of `name`, with the run's base, data, tags and parent.

    The run folder is an mlx-lm adapter folder: its adapter_config.json (resolved at the run's start:
    LoReFT's layers, the hidden size) and the checkpoint file, imported byte for byte, so the
    version's sha256 is the checkpoint file's and its metadata (losses, hashes) travels with it.
    """
    from .config import TrainConfig

    run = TrainingRun(registry.run(run_id))
    checkpoint = find(run.folder, step)
    config = TrainConfig(**run.config)
    if not (run.folder / "adapter_config.json").is_file():  # runs recorded before the trainer wrote it at start
        write_json(run.folder / "adapter_config.json", config.adapter_config())
    version, _ = registry.import_adapter(run.folder, name, base=config.base, dataset=config.data,
                                         checkpoint=str(checkpoint.path), tags=config.tags, parent=config.from_ref,
                                         description=f"step {step} of run {run_id}")
    return version
