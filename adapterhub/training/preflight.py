"""Every check a run passes before any model loads: a refused run loads nothing and writes nothing.

Under mlx.launch these run on rank 0 alone (it holds the registry); the other ranks check only
that their own files hash as rank 0's do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterHubError, IncompatibleError, NotFoundError
from ..fingerprint import fingerprint_dataset
from . import trackers
from .data import validate as validate_data


@dataclass(frozen=True)
class Checked:
    """What the checks resolved, for the run to use: the base, the data's fingerprint, the parent version."""

    base: object  # registry.ResolvedBase
    dataset_fp: dict
    parent: object | None  # records.AdapterVersion
    examples: dict


def _refuse_dora_on_experts(tensors: dict, first_layer: int) -> None:
    """mlx-lm wraps every linear and expert layer of the trained layers, and has no DoRA for experts: it would
    raise mid-build ("SwitchLinear doesn't support DoRA yet"). Refused here, from the weight header, before anything loads."""
    experts = sorted(name[: -len(".weight")] for name, (_, shape) in tensors.items()
                     if name.endswith(".weight") and len(shape) == 3
                     and (m := re.search(r"(?:^|\.)layers\.(\d+)\.", name)) and int(m.group(1)) >= first_layer)
    if experts:
        raise IncompatibleError("--kind dora: mlx-lm has no DoRA for the expert layers of a mixture of experts "
                                f"(SwitchLinear doesn't support DoRA yet), and the trained layers hold {len(experts)} "
                                f"({experts[0]}" + (", …)" if len(experts) > 1 else ")"),
                                hint="train --kind lora on this model")


def check(registry, config, processes: int = 1) -> Checked:
    """Options, data, name, base and parent of a run that `processes` processes will train."""
    config.check()  # again here: a library caller may build a TrainConfig without merge()
    if config.batch_size % processes:
        raise AdapterHubError(f"--batch-size {config.batch_size} does not divide among {processes} processes, "
                              "and each takes an equal slice of every batch",
                              hint=f"give a multiple of {processes}, or launch a number of processes that divides it")
    trackers.check_available(config.report_to)
    examples = validate_data(Path(config.data), config.mask_prompt)
    for split, count in examples.items():
        # mlx-lm's iterate_batches refuses a split smaller than a batch: valid at the first evaluation,
        # test only after the last step, both long after the run was recorded.
        if count < config.batch_size:
            raise AdapterHubError(f"{split}.jsonl has {count} examples, fewer than --batch-size {config.batch_size}",
                                  hint=f"add examples to {split}.jsonl or lower --batch-size")
    from .. import naming

    naming.check_name(config.name, registry.policy, config.tags)
    base = registry.resolve_base(config.base, need_files=True)
    base_fp = base.fingerprint
    model_layers = (base_fp.get("config") or {}).get("num_hidden_layers")
    if isinstance(model_layers, int):  # the model checks its own layers again once loaded
        if config.kind == "loreft":
            from .. import loreft

            loreft.check_layers(loreft.parse_layers(config.layers, model_layers), model_layers)
        else:
            wrapped = config.layers_to_train(model_layers)
            if config.kind == "dora":
                _refuse_dora_on_experts(base_fp.get("tensors") or {}, model_layers - wrapped)
    dataset_fp = fingerprint_dataset(Path(config.data))
    parent = registry.resolve(config.from_ref) if config.from_ref else None
    if parent:
        recorded = parent.record.get("base")
        if recorded and recorded["structure_sha256"] != base_fp["structure_sha256"]:
            raise IncompatibleError(f"--from {parent.ref} was trained on base {recorded['name']}, "
                                    f"whose structure differs from {config.base}", hint="train from it on its own base")
        if parent.record["kind"] != config.kind or parent.record["rank"] != config.rank:
            raise IncompatibleError(
                f"--from {parent.ref} is {parent.record['kind']} rank {parent.record['rank']}, "
                f"this run is {config.kind} rank {config.rank}",
                hint=f"pass --kind {parent.record['kind']} --rank {parent.record['rank']}")
    return Checked(base, dataset_fp, parent, examples)


def resumable(registry, run_id: str) -> dict:
    """The record of a run that can be resumed: interrupted or failed, its process gone, its folder there."""
    record = registry.run(run_id)
    if record["status"] == "finished":
        raise AdapterHubError(f"run {run_id} already finished as {record['result']}", hint="nothing to resume")
    if registry.run_status(record) == "running":
        raise AdapterHubError(f"run {run_id} is still running (pid {record['pid']} on {record['host']})",
                              hint="wait for it, or stop it first")
    if not Path(record["dir"]).is_dir():
        raise NotFoundError(f"run folder {record['dir']} is gone", hint="the run cannot be resumed; train again")
    return record
