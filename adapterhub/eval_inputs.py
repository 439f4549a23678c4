"""What an evaluation runs: the model (a base alone, an adapter version on a base, a fused model folder of this
registry) and the data, resolved and checked before any model is loaded, so a refused evaluation loads
nothing and writes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import naming
from .bases import local_folder
from .errors import AdapterHubError, IncompatibleError, NotFoundError
from .eval_settings import METRICS, SPLITS
from .fingerprint import fingerprint_dataset
from .records import RECORD_FILE, AdapterVersion, EvalResult
from .safetensors_io import sha256_file
from .files import read_json
from .training.data import DataError, check_split, validate


@dataclass(frozen=True)
class Target:
    """What an evaluation loads: a base alone, an adapter version on a base, or a fused model folder."""

    kind: str  # base | adapter | fused
    label: str
    sha256: str
    base: dict  # {name, sha256} of the model it runs on
    base_path: Path
    version: AdapterVersion | None = None
    folder: Path | None = None
    dataset_sha256: str | None = None  # what it was trained on: the default --data

    def subject(self) -> dict:
        if self.kind == "adapter":
            return {"kind": "adapter", "sha256": self.sha256, "ref": self.version.ref}
        if self.kind == "fused":
            return {"kind": "fused", "sha256": self.sha256, "path": str(self.folder)}
        return {"kind": "base", "sha256": self.sha256, "name": self.label}

    def recorded(self, registry) -> list[EvalResult]:
        return [EvalResult.from_dict(r) for r in registry.evaluations(self.version or self.sha256)]


def base_target(registry, base: str | Path) -> Target:
    resolved = registry.resolve_base(base, need_files=True)
    name = resolved.name or naming.suggest_name(resolved.path.resolve().name)
    return Target("base", name, resolved.sha256, {"name": name, "sha256": resolved.sha256}, resolved.path)


def adapter_target(registry, ref: str, base: str | Path | None, allow_different_weights: bool = False) -> Target:
    version = registry.resolve(ref)
    if base is None:
        recorded = version.record.get("base")
        if not recorded:
            raise AdapterHubError(f"{version.ref} records no base model", hint="pass --base PATH|NAME")
        known = registry.bases_by_sha().get(recorded["sha256"])
        if not known:
            raise NotFoundError(f"{version.ref}'s base {recorded['name']} ({recorded['sha256'][:12]}) is not registered here",
                                hint="pass --base PATH|NAME", kind="base", key=recorded["sha256"])
        base = known["name"]
    report = registry.check(version.ref, base, allow_different_weights)
    if not report.compatible:
        raise IncompatibleError(f"{version.ref} is not compatible with {base}: {report.problems[0]}",
                                hint=f"run 'adapterhub check {version.ref} --base {base}'", report=report)
    target = base_target(registry, base)
    dataset = version.record.get("dataset")
    return Target("adapter", version.ref, version.sha256, target.base, target.base_path, version=version,
                  dataset_sha256=dataset["sha256"] if dataset else None)


def fused_record(registry, folder: Path) -> dict:
    """The catalogue's record of a fused model folder of this registry, once the folder's files are proven to
    be the ones fuse wrote.

    Raises:
        AdapterHubError: the folder was not written by this registry's `fuse`, or changed since.
    """
    folder = Path(folder).expanduser()
    hint = f"compare it with base + adapter instead: 'adapterhub eval {folder} --against REF'"
    claimed = read_json(folder / RECORD_FILE)
    if not isinstance(claimed, dict) or "adapters" not in claimed or not isinstance(claimed.get("sha256"), str):
        raise AdapterHubError(f"{folder} is not a fused model: it has no {RECORD_FILE} naming the adapters fused into it",
                              hint=hint)
    known = registry.fused(claimed["sha256"])
    if not known:
        raise AdapterHubError(f"{folder} is not a fused model of the registry at {registry.root} "
                              f"({claimed['sha256'][:12]} is not in its catalogue)", hint=hint)
    now_sha = registry.resolve_base(folder).sha256
    if now_sha != known["sha256"]:
        raise AdapterHubError(f"{folder}'s files are no longer the fused model {known['sha256'][:12]} "
                              f"(they hash to {now_sha[:12]})", hint=hint)
    return known


def _fused_target(registry, folder: Path) -> Target:
    record = fused_record(registry, folder)
    base = registry.bases_by_sha().get(record["base"]["sha256"])
    dataset = None
    for adapter in record["adapters"]:
        version = registry.find(adapter["ref"])
        if version and version.sha256 == adapter["sha256"] and version.record.get("dataset"):
            dataset = version.record["dataset"]["sha256"]
            break
    return Target("fused", str(Path(folder).expanduser().resolve()), record["sha256"],
                  {"name": record["base"]["name"], "sha256": record["base"]["sha256"]},
                  local_folder(base) or Path(folder), folder=Path(folder).expanduser().resolve(),
                  dataset_sha256=dataset)


def resolve_target(registry, target: str | Path | None, base: str | Path | None = None) -> Target:
    """`target` a version ref (on its own base, or `base`), a fused model folder of this registry, or None for
    `base` alone."""
    if target is None:
        if base is None:
            raise AdapterHubError("nothing to evaluate", hint="give a version ref or a fused model folder, or --base NAME for the base alone")
        return base_target(registry, base)
    if Path(target).expanduser().is_dir():
        if base is not None:
            raise AdapterHubError(f"{target} is a model folder: it runs on no other base",
                                  hint="drop --base, or give a version ref to evaluate on --base")
        return _fused_target(registry, Path(target))
    return adapter_target(registry, str(target), base)


# ---- the data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalData:
    """One split of a dataset, checked: what a result records as the data it was scored on."""

    folder: Path
    split: str
    format: str  # text | completions | chat
    examples: int
    name: str
    sha256: str
    split_sha256: str

    @property
    def completion_only(self) -> bool:
        return self.format != "text"

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "split_sha256": self.split_sha256, "format": self.format}


def data_folder(registry, target: Target, data: str | Path | None) -> Path:
    if data is not None:
        return Path(data).expanduser()
    if not target.dataset_sha256:
        raise AdapterHubError(f"{target.label} records no dataset to evaluate on", hint="pass --data DIR")
    recorded = next((d for d in registry.datasets() if d["sha256"] == target.dataset_sha256), None)
    folder = local_folder(recorded)
    if not folder:
        raise NotFoundError(f"the dataset {target.label} was trained on ({target.dataset_sha256[:12]}) is not on this machine",
                            hint="pass --data DIR", kind="dataset", key=target.dataset_sha256)
    return folder


def check_data(registry, folder: Path, split: str, metrics: list[str], batch_size: int) -> EvalData:
    """Everything about the data that needs no model: a refused evaluation loads nothing and writes nothing."""
    if split not in SPLITS:
        raise AdapterHubError(f"--split {split!r} is not one of {', '.join(SPLITS)}", hint="mlx-lm reads train, valid and test")
    for metric in metrics:
        if metric not in METRICS:
            raise AdapterHubError(f"--metric {metric!r} is not one of {', '.join(METRICS)}", hint="use --metric loss or exact-match")
    if not folder.is_dir():
        raise NotFoundError(f"data folder {folder} does not exist", hint="give a folder with test.jsonl (and valid.jsonl)",
                            kind="dataset", key=folder)
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        present = [s for s in SPLITS if (folder / f"{s}.jsonl").is_file()]
        raise NotFoundError(f"{folder} has no {split}.jsonl" + (f" (it has {', '.join(present)})" if present else ""),
                            hint=f"pass --split {present[-1]}" if present else "add the split's .jsonl file",
                            kind="split", key=str(path))
    if (folder / "train.jsonl").is_file():
        validate(folder)  # every line, as training would read it
    kind, examples = check_split(path)
    if not examples:
        raise DataError(f"{path} has no examples", hint="add examples, or pass another --split")
    if "exact-match" in metrics and kind == "text":
        raise AdapterHubError(f"{path} is text data: exact-match scores a completion against its prompt",
                              hint="use --metric loss, or prompt/completion or chat data")
    if examples < batch_size:
        # mlx-lm's iterate_batches refuses a split smaller than one batch.
        raise AdapterHubError(f"{path} has {examples} examples, fewer than --batch-size {batch_size}",
                              hint=f"pass --batch-size {examples} or lower")
    fingerprint = fingerprint_dataset(folder)
    return EvalData(folder, split, kind, examples, registry.dataset_name_for(fingerprint, folder), fingerprint["sha256"],
                    sha256_file(path))
