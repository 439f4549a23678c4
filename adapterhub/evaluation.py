"""Evaluation: scores of a base model, an adapter version or a fused model on held-out data, recorded on
what was evaluated; versions side by side; and how faithfully a fused model reproduces base + adapter.

An operation (layer 5): records are read through the registry, models loaded with mlx-lm, results
recorded through `Registry.record_eval`. Datasets, batches and the loss are mlx-lm's own
(`load_local_dataset`, `iterate_batches`, `evaluate` with `default_loss`, or LoReFT's `loreft.loss`), so a
loss here is the loss `mlx_lm lora --test` reports for the same data and batch size. Prompt/completion
and chat data are scored on the completion alone (mlx-lm's `--mask-prompt`): an answer is what is scored,
not the question.

Usable without the CLI:

    result = evaluate(registry, "sql-lora@3", data="data/sql", metric="exact-match")
    result.scores          # {"test_exact_match": 0.94, "test_token_accuracy": 0.98}
    fidelity(registry, "fused/", "sql-lora@3", ["SELECT"])["max_logit_diff"]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from . import naming, ranges
from .errors import AdapterHubError, IncompatibleError, NotFoundError
from .fingerprint import fingerprint_dataset
from .records import CONFIG_FILE, LOWER_IS_BETTER, RECORD_FILE, WEIGHTS_FILE, AdapterVersion, EvalResult, now
from .safetensors_io import sha256_file
from .store import read_json

METRICS = ("loss", "exact-match")
SPLITS = ("train", "valid", "test")
SCORES = {"loss": ("loss", "perplexity"), "exact-match": ("exact_match", "token_accuracy")}
# mlx_lm lora's defaults, so a score here and `mlx_lm lora --test` agree unless asked otherwise.
BATCH_SIZE = 4
MAX_SEQ_LENGTH = 2048
# Fidelity: prompts fuse checks on (a glance), prompts `eval --against` checks on, greedy tokens per prompt.
FUSE_PROMPTS = 4
AGAINST_PROMPTS = 16
FIDELITY_TOKENS = 8
# The share of positions whose greedy token may differ from base + adapter before `eval --against` fails. A
# float fuse differs only by rounding (float32: about 1e-6 of the logits' size, no token moves; bfloat16 may
# flip a near tie); re-quantizing a fused 4-bit model moves logits by tenths and flips tokens. Tokens, not
# logits, because how far logits may move without harm depends on the dtype and the model.
DEFAULT_TOLERANCE = 0.01
BUILTIN_PROMPTS = (
    "The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
    "Water boils at a temperature of", "The three primary colours are", "Translate to French: good morning",
    "Q: What is 12 times 7?\nA:", "The most important rule of writing is",
)
SORT_FIELDS = ("name", "version", "created_at", "kind", "rank", "scale", "num_layers", "num_parameters", "base", "dataset")

# (description, total steps) -> a context manager yielding advance(n), as Registry's byte progress.
Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]


def _no_progress(description: str, total: int) -> ContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


# ---- what is evaluated ---------------------------------------------------------------------------------


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


def _base_path(base: str | Path, record: dict | None) -> Path:
    path = Path(base).expanduser()
    return path if path.is_dir() else Path(record["path"])


def _base_target(registry, base: str | Path) -> Target:
    fingerprint, record = registry.resolve_base(base)
    path = _base_path(base, record)
    name = record["name"] if record else naming.suggest_name(path.resolve().name)
    return Target("base", name, fingerprint["sha256"], {"name": name, "sha256": fingerprint["sha256"]}, path)


def _adapter_target(registry, ref: str, base: str | Path | None) -> Target:
    version = registry.resolve(ref)
    if base is None:
        recorded = version.record.get("base")
        if not recorded:
            raise AdapterHubError(f"{version.ref} records no base model", hint="pass --base PATH|NAME")
        known = registry.bases_by_sha().get(recorded["sha256"])
        if not known:
            raise NotFoundError(f"{version.ref}'s base {recorded['name']} ({recorded['sha256'][:12]}) is not registered here",
                                hint="pass --base PATH|NAME", kind="base", key=recorded["sha256"])
        base = known["path"]
    report = registry.check(version.ref, base)
    if not report.compatible:
        raise IncompatibleError(f"{version.ref} is not compatible with {base}: {report.problems[0]}",
                                hint=f"run 'adapterhub check {version.ref} --base {base}'", report=report)
    target = _base_target(registry, base)
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
    fingerprint, _ = registry.resolve_base(folder)
    if fingerprint["sha256"] != known["sha256"]:
        raise AdapterHubError(f"{folder}'s files are no longer the fused model {known['sha256'][:12]} "
                              f"(they hash to {fingerprint['sha256'][:12]})", hint=hint)
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
                  Path(base["path"]) if base else Path(folder), folder=Path(folder).expanduser().resolve(),
                  dataset_sha256=dataset)


def resolve_target(registry, target: str | Path | None, base: str | Path | None = None) -> Target:
    """`target` a version ref (on its own base, or `base`), a fused model folder of this registry, or None for
    `base` alone."""
    if target is None:
        if base is None:
            raise AdapterHubError("nothing to evaluate", hint="give a version ref or a fused model folder, or --base NAME for the base alone")
        return _base_target(registry, base)
    if Path(target).expanduser().is_dir():
        if base is not None:
            raise AdapterHubError(f"{target} is a model folder: it runs on no other base",
                                  hint="drop --base, or give a version ref to evaluate on --base")
        return _fused_target(registry, Path(target))
    return _adapter_target(registry, str(target), base)


# ---- the data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalData:
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


def _split_format(path: Path) -> tuple[str, int]:
    """The format of a split file (every line one JSON object of one of mlx-lm's formats) and its examples."""
    from .training.data import DataError

    kinds, count = set(), 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 ({e.reason})", hint="re-save the file as UTF-8") from None
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})", hint="fix or remove that line") from None
        kind = (("completions" if "prompt" in row and "completion" in row else "chat" if "messages" in row
                 else "text" if "text" in row else None) if isinstance(row, dict) else None)
        if kind is None:
            raise DataError(f"{path}:{number}: has none of 'text', 'prompt'+'completion' or 'messages'",
                            hint="use one of mlx-lm's data formats (see mlx-lm's LORA.md)")
        kinds.add(kind)
        count += 1
    if len(kinds) > 1:
        raise DataError(f"{path} mixes {' and '.join(sorted(kinds))} data", hint="use one format per dataset")
    if not count:
        raise DataError(f"{path} has no examples", hint="add examples, or pass another --split")
    return kinds.pop(), count


def _data_folder(registry, target: Target, data: str | Path | None) -> Path:
    if data is not None:
        return Path(data).expanduser()
    if not target.dataset_sha256:
        raise AdapterHubError(f"{target.label} records no dataset to evaluate on", hint="pass --data DIR")
    recorded = next((d for d in registry.datasets() if d["sha256"] == target.dataset_sha256), None)
    if not recorded or not Path(recorded["path"]).is_dir():
        raise NotFoundError(f"the dataset {target.label} was trained on ({target.dataset_sha256[:12]}) is not on this machine",
                            hint="pass --data DIR", kind="dataset", key=target.dataset_sha256)
    return Path(recorded["path"])


def check_data(registry, folder: Path, split: str, metrics: list[str], batch_size: int) -> EvalData:
    """Everything about the data that needs no model: a refused evaluation loads nothing and writes nothing."""
    from .training import data as training_data

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
        training_data.validate(folder)  # every line, as training would read it
    kind, examples = _split_format(path)
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


# ---- models --------------------------------------------------------------------------------------------


@contextmanager
def _adapter_folder(registry, version: AdapterVersion) -> Iterator[Path]:
    """The version's two stored files, hash-checked, in a folder mlx-lm's `load(adapter_path=)` reads."""
    with tempfile.TemporaryDirectory(prefix="adapterhub-eval-") as tmp:
        folder = Path(tmp)
        # Links, not copies: the blobs are read-only and were just re-hashed.
        os.symlink(registry.weights(version), folder / WEIGHTS_FILE)
        os.symlink(registry.objects.verified(version.file_sha(CONFIG_FILE), f"config of {version.ref}"), folder / CONFIG_FILE)
        yield folder


def load_target(registry, target: Target):
    """(model, tokenizer), in eval mode: mlx-lm's load, with the adapter applied as mlx-lm or LoReFT applies it."""
    from mlx_lm import load

    if target.kind == "fused":
        model, tokenizer = load(str(target.folder))
    elif target.kind == "base":
        model, tokenizer = load(str(target.base_path))
    elif target.version.kind == "loreft":
        from .generation import load_loreft

        model, tokenizer = load(str(target.base_path))
        load_loreft(registry, target.version, model)
    else:
        with _adapter_folder(registry, target.version) as folder:
            model, tokenizer = load(str(target.base_path), adapter_path=str(folder))
    model.eval()
    return model, tokenizer


def _loss_fn(target: Target):
    if target.version is not None and target.version.kind == "loreft":
        from . import loreft

        return loreft.loss
    from mlx_lm.tuner.trainer import default_loss

    return default_loss


class _Capture:
    """The model, keeping the logits of its last call: one forward gives both mlx-lm's loss and the argmax."""

    def __init__(self, model):
        self._model = model
        self.logits = None

    def __getattr__(self, key):
        return getattr(self._model, key)  # LoReFT's loss reaches the model's layers through here

    def __call__(self, *args, **kwargs):
        self.logits = self._model(*args, **kwargs)
        return self.logits


@contextmanager
def _seeded_numpy(seed: int = 0) -> Iterator[None]:
    """mlx-lm's iterate_batches shuffles with numpy's global state: a fixed order, and the caller's state kept."""
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _measure_loss(model, dataset, loss, batch_size: int, max_seq_length: int, advance) -> dict:
    from mlx_lm.tuner.trainer import evaluate

    counted = []

    def counting(model, batch, lengths):
        value, tokens = loss(model, batch, lengths)
        counted.append(tokens)
        return value, tokens

    with _seeded_numpy():
        value = float(evaluate(model=model, dataset=dataset, batch_size=batch_size, num_batches=-1,
                               max_seq_length=max_seq_length, loss=counting, progress_callback=lambda: advance(1)))
    tokens = int(sum(int(t.item()) for t in counted))
    return {"scores": _loss_scores(value), "value": value, "tokens": tokens, "examples": len(counted) * batch_size}


def _loss_scores(value: float) -> dict:
    if not math.isfinite(value):
        raise AdapterHubError(f"the loss is {value}: the model's outputs are not finite",
                              hint="check the weights ('adapterhub verify'); a NaN adapter cannot be scored")
    return {"loss": value, **({"perplexity": math.exp(value)} if value < 700 else {})}


def _measure_exact(model, dataset, loss, batch_size: int, max_seq_length: int, advance) -> dict:
    """Greedy exact-match and token accuracy of the completions, teacher-forced: greedy decoding reproduces a
    completion token for token exactly when, at every completion position, the argmax given the true prefix
    is the true next token. One forward per batch, on the batches the loss uses."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import iterate_batches

    capture = _Capture(model)
    hits, tokens, exact, rows = mx.array(0), mx.array(0), mx.array(0), 0
    with _seeded_numpy():
        for batch, lengths in iterate_batches(dataset, batch_size, max_seq_length):
            loss(capture, batch, lengths)
            targets = batch[:, 1:]
            steps = mx.arange(1, targets.shape[1] + 1)
            # default_loss's positions but its last: mlx-lm's loss also scores the padding after a sequence's
            # last token, which is no part of the completion (and a real model's token 0 is some word).
            mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
            right = mx.logical_and(mx.argmax(capture.logits, axis=-1) == targets, mask)
            scored = mask.sum(axis=1)
            hits = hits + right.sum()
            tokens = tokens + scored.sum()
            exact = exact + mx.logical_and(right.sum(axis=1) == scored, scored > 0).sum()
            mx.eval(hits, tokens, exact)
            rows += batch.shape[0]
            advance(1)
    hits, tokens, exact = int(hits.item()), int(tokens.item()), int(exact.item())
    return {"scores": {"exact_match": exact / rows, "token_accuracy": hits / tokens if tokens else 0.0},
            "value": exact / rows, "tokens": tokens, "examples": rows, "correct": exact}


def _dataset(data: EvalData, tokenizer):
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

    from .training.data import DataError

    try:
        splits = dict(zip(SPLITS, load_local_dataset(data.folder, tokenizer, SimpleNamespace(mask_prompt=data.completion_only))))
        dataset = CacheDataset(splits[data.split])
        dataset[0]  # mlx-lm tokenizes lazily: a data/tokenizer mismatch surfaces here, not mid-run
    except ValueError as e:
        raise DataError(f"{data.folder} cannot be tokenized for this model: {e}".split("For information")[0].strip(),
                        hint="completions and chat data need a tokenizer with a chat template; use text data otherwise") from None
    return dataset


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    from .version import __version__

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "adapterhub": __version__}


def _measure(registry, target: Target, data: EvalData, metrics: list[str], batch_size: int, max_seq_length: int,
             progress: Progress) -> list[EvalResult]:
    """Load `target` once and score it on `data` for each metric; records each result."""
    import mlx.core as mx

    model, tokenizer = load_target(registry, target)
    dataset = _dataset(data, tokenizer)
    loss = _loss_fn(target)
    results = []
    for metric in metrics:
        started = time.perf_counter()
        with progress(f"{metric} of {target.label}", data.examples // batch_size) as advance:
            measured = (_measure_loss if metric == "loss" else _measure_exact)(model, dataset, loss, batch_size,
                                                                                max_seq_length, advance)
        row = {
            "subject": target.subject(), "dataset": data.to_dict(), "split": data.split, "metric": metric,
            "value": measured["value"], "scores": measured["scores"], "examples": measured["examples"],
            "examples_in_split": data.examples, **({"correct": measured["correct"]} if "correct" in measured else {}),
            "tokens": measured["tokens"], "base": target.base,
            "settings": {"batch_size": batch_size, "max_seq_length": max_seq_length, "completion_only": data.completion_only},
            "versions": _versions(), "device": str(mx.default_device()),
            "seconds": round(time.perf_counter() - started, 3), "created_at": now(),
        }
        results.append(EvalResult.from_dict(registry.record_eval(row)))
    return results


def _newest(results: list[EvalResult], key: tuple) -> EvalResult | None:
    return next((r for r in reversed(results) if r.key == key), None)


def _key(target: Target, data: EvalData, metric: str, batch_size: int, max_seq_length: int) -> tuple:
    return (target.sha256, data.sha256, data.split, metric, batch_size, max_seq_length, data.completion_only,
            target.base["sha256"])


def _check_sizes(batch_size: int, max_seq_length: int) -> None:
    ranges.require("--batch-size", batch_size, ranges.COUNT, hint="pass e.g. --batch-size 4")
    ranges.require("--max-seq-length", max_seq_length, ranges.COUNT, hint="pass e.g. --max-seq-length 2048")


def evaluate_target(registry, target: Target, data: EvalData, metrics: list[str], batch_size: int = BATCH_SIZE,
                    max_seq_length: int = MAX_SEQ_LENGTH, force: bool = False,
                    progress: Progress = _no_progress) -> list[EvalResult]:
    """Each metric of `target` on `data`: the recorded result when there is one (unless `force`), else measured
    (the model loaded once for all that are missing) and recorded."""
    recorded = [] if force else target.recorded(registry)
    found = {m: _newest(recorded, _key(target, data, m, batch_size, max_seq_length)) for m in metrics}
    missing = [m for m in metrics if found[m] is None]
    measured = {r.metric: r for r in _measure(registry, target, data, missing, batch_size, max_seq_length, progress)} if missing else {}
    return [EvalResult(found[m].row, reused=True) if found[m] else measured[m] for m in metrics]


def evaluate(registry, target: str | Path | None = None, base: str | Path | None = None, data: str | Path | None = None,
             split: str = "test", metric: str = "loss", batch_size: int = BATCH_SIZE, max_seq_length: int = MAX_SEQ_LENGTH,
             force: bool = False, progress: Progress = _no_progress) -> EvalResult:
    """Score a version (on its base, or `base`), a fused model folder of this registry, or `base` alone on one
    split of `data` (default: the dataset it was trained on), and record the result on it.

    The same evaluation (same weights, base, data, split, metric and batching) is recorded once and reused
    unless `force`, which measures again and appends a new result.

    Raises:
        AdapterHubError: bad input (a missing split, text data for exact-match, a folder not fused here),
            before any model is loaded and before anything is written.
    """
    _check_sizes(batch_size, max_seq_length)
    subject = resolve_target(registry, target, base)
    checked = check_data(registry, _data_folder(registry, subject, data), split, [metric], batch_size)
    return evaluate_target(registry, subject, checked, [metric], batch_size, max_seq_length, force, progress)[0]


# ---- side by side --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Versions side by side: `columns` (what each is), `rows` (one value per column; `best` lists the columns
    holding the best value of a row that has a better direction)."""

    columns: list[dict]
    rows: list[dict]
    not_shared: int = 0  # measures recorded on some columns only
    computed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "not_shared": self.not_shared, "computed": self.computed}


def _final(losses: list | None) -> float | None:
    return losses[-1][1] if losses else None


def _column(target: Target) -> tuple[dict, list[tuple[str, object, str | None]]]:
    """A column's header and its property rows (name, value, better)."""
    if target.version is None:
        return ({"label": f"base:{target.label}", "kind": "base", "sha256": target.sha256},
                [("kind", "base", None), ("base", target.base["name"], None)])
    r = target.version.record
    training = r.get("training") or {}
    losses = training.get("losses") or {}
    hyper = training.get("hyperparameters") or {}
    parent = r["parents"][0]["ref"] if r["parents"] else None
    return ({"label": target.version.ref, "ref": target.version.ref, "kind": r["kind"], "sha256": r["sha256"]}, [
        ("kind", r["kind"], None), ("rank", r["rank"], None), ("scale", r["scale"], None),
        ("targets", list(r["targets"]), None), ("parameters", r.get("num_parameters"), None),
        ("base", target.base["name"], None), ("dataset", (r.get("dataset") or {}).get("name"), None),
        ("parent", parent, None), ("iters", hyper.get("iters"), None),
        ("train_loss", _final(losses.get("train")), "lower"), ("val_loss", _final(losses.get("val")), "lower"),
    ])


def _best(values: list, better: str | None) -> list[int]:
    numbers = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not better or not numbers:
        return []
    best = (min if better == "lower" else max)(v for _, v in numbers)
    marked = [i for i, v in numbers if v == best]
    return [] if len(marked) == len(values) > 1 else marked  # a row where all tie has no best


def compare(registry, refs: list[str], base: str | None = None, data: str | Path | None = None, split: str = "test",
            metrics: list[str] | None = None, batch_size: int = BATCH_SIZE, max_seq_length: int = MAX_SEQ_LENGTH,
            progress: Progress = _no_progress) -> Comparison:
    """Versions (and `base` alone) side by side, with every evaluation they all share.

    With `data`, each is first scored on it (recorded results reused): `metrics`, by default the loss, and
    exact-match too for prompt/completion or chat data.
    """
    _check_sizes(batch_size, max_seq_length)
    if metrics and data is None:
        raise AdapterHubError("--metric chooses what --data scores", hint="pass --data DIR, or drop --metric to see what is recorded")
    targets = [_adapter_target(registry, ref, None) for ref in refs] + ([_base_target(registry, base)] if base else [])
    if len(targets) < 2:
        raise AdapterHubError(f"compare needs two or more columns, got {len(targets)}",
                              hint="give two or more refs, or one and --base NAME")
    computed = []
    if data is not None:
        checked = check_data(registry, Path(data).expanduser(), split, metrics or ["loss"], batch_size)
        wanted = metrics or (["loss", "exact-match"] if checked.completion_only else ["loss"])
        for target in targets:
            for result in evaluate_target(registry, target, checked, wanted, batch_size, max_seq_length, progress=progress):
                computed.append({"label": target.label, "metric": result.metric, "reused": result.reused})
    columns, property_rows = [], {}
    for target in targets:
        header, props = _column(target)
        columns.append(header)
        for name, value, better in props:
            property_rows.setdefault(name, (better, {}))[1][len(columns) - 1] = value
    rows = [{"field": name, "values": [values.get(i) for i in range(len(columns))], "better": better}
            for name, (better, values) in property_rows.items()]
    # Newest result per measure and column, on the column's base; a row for each measure every column has.
    newest: list[dict[tuple, EvalResult]] = []
    for target in targets:
        per = {}
        for result in target.recorded(registry):
            if result.row["base"]["sha256"] == target.base["sha256"]:
                per[result.measure] = result
        newest.append(per)
    shared = set.intersection(*(set(n) for n in newest))
    every = set().union(*(set(n) for n in newest))
    for measure in sorted(shared, key=lambda m: (newest[0][m].row["dataset"]["name"], m[1], m[2])):
        sample = newest[0][measure]
        for score in SCORES[sample.metric]:
            values = [n[measure].row["scores"].get(score) for n in newest]
            rows.append({"field": f"{sample.split}_{score}", "dataset": sample.row["dataset"]["name"],
                         "dataset_sha256": sample.row["dataset"]["sha256"], "settings": sample.row["settings"],
                         "values": values, "better": "lower" if score in LOWER_IS_BETTER else "higher"})
    for row in rows:
        row["best"] = _best(row["values"], row["better"]) if len(columns) > 1 else []
    return Comparison(columns, rows, len(every - shared), computed)


# ---- list --sort ---------------------------------------------------------------------------------------


def parse_sort(key: str) -> tuple[str, bool]:
    """`FIELD`, `-FIELD` (descending) or `eval:SPLIT_SCORE` -> (key, descending).

    Raises:
        AdapterHubError: a field or score that is not one of those listed in the message.
    """
    descending = key.startswith("-")
    name = key[1:] if descending else key
    if name.startswith("eval:"):
        score = name[len("eval:"):]
        split, _, measure = score.partition("_")
        if split not in SPLITS or measure not in {s for names in SCORES.values() for s in names}:
            raise AdapterHubError(f"'{key}' names no recorded score",
                                  hint="sort by eval:test_loss, eval:test_perplexity, eval:test_exact_match or "
                                       "eval:test_token_accuracy (or the valid_ / train_ ones)")
        return name, descending
    if name not in SORT_FIELDS:
        raise AdapterHubError(f"'{key}' is not a field to sort by", hint=f"one of {', '.join(SORT_FIELDS)}, or eval:test_loss")
    return name, descending


def sort_versions(registry, versions: list[AdapterVersion], key: str) -> list[tuple[AdapterVersion, EvalResult | None]]:
    """`versions` in the order `key` (see parse_sort) asks for.

    By `eval:SCORE`: each version's newest recorded value of that score, best first (lowest loss, highest
    exact-match); versions without one come last. Returns (version, the result sorted by or None).
    """
    name, descending = parse_sort(key)
    if name.startswith("eval:"):
        score = name[len("eval:"):]
        lower = score.partition("_")[2] in LOWER_IS_BETTER
        found = []
        for version in versions:
            results = [EvalResult.from_dict(r) for r in registry.evaluations(version)]
            found.append((version, next((r for r in reversed(results) if score in r.scores), None)))
        have = sorted((p for p in found if p[1]), key=lambda p: p[1].scores[score], reverse=lower == descending)
        return have + [p for p in found if not p[1]]

    def value(version: AdapterVersion):
        r = version.record
        field_value = ((r.get(name) or {}).get("name") if name in ("base", "dataset") else r.get(name))
        # None last whichever the direction; ties by name and version.
        return (field_value is None, field_value if field_value is not None else 0)

    ordered = sorted(versions, key=lambda v: (v.name, v.version))
    ordered = sorted(ordered, key=value, reverse=descending)
    if descending:
        ordered = [v for v in ordered if value(v)[0] is False] + [v for v in ordered if value(v)[0]]
    return [(v, None) for v in ordered]


# ---- fidelity of a fused model -------------------------------------------------------------------------


def prompts_from(folder: Path, split: str | None = None, count: int = AGAINST_PROMPTS) -> list[str]:
    """Up to `count` prompts from a dataset split (the first that exists of test, valid, train when none is
    given): a completion's prompt, a chat's first message, or a text."""
    folder = Path(folder).expanduser()
    splits = [split] if split else ["test", "valid", "train"]
    path = next((folder / f"{s}.jsonl" for s in splits if (folder / f"{s}.jsonl").is_file()), None)
    if path is None:
        raise NotFoundError(f"{folder} has no {' or '.join(f'{s}.jsonl' for s in splits)}", hint="pass another --split",
                            kind="split", key=str(folder))
    _split_format(path)  # one format, every line an example: named by line when not
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            first = row["messages"][0] if isinstance(row.get("messages"), list) and row["messages"] else None
            text = row.get("prompt") if "prompt" in row else (
                first.get("content") if isinstance(first, dict) else None) if "messages" in row else row.get("text")
            if isinstance(text, str) and text.strip() and text not in prompts:
                prompts.append(text)
            if len(prompts) >= count:
                break
    return prompts or list(BUILTIN_PROMPTS[:count])


def default_prompts(registry, version: AdapterVersion, count: int = FUSE_PROMPTS) -> list[str]:
    """Prompts for a fidelity check of `version`: from the dataset it was trained on when that is on this
    machine, else built-in text."""
    recorded = (version.record.get("dataset") or {}).get("sha256")
    known = next((d for d in registry.datasets() if d["sha256"] == recorded), None) if recorded else None
    if known and Path(known["path"]).is_dir():
        try:
            return prompts_from(Path(known["path"]), None, count)
        except AdapterHubError:
            pass  # a dataset changed since training still leaves the built-in text
    return list(BUILTIN_PROMPTS[:count])


def _fidelity_base(registry, folder: Path, version: AdapterVersion, base: str | Path | None) -> Path:
    """The base to apply `version` to: `base`, else the base the folder says it was fused into (when
    registered here), else the version's own."""
    if base is not None:
        return _base_path(base, registry.resolve_base(base)[1])
    claimed = read_json(folder / RECORD_FILE)
    claimed_base = (claimed.get("base") or {}).get("sha256") if isinstance(claimed, dict) else None
    known = registry.bases_by_sha().get(claimed_base) if isinstance(claimed_base, str) else None
    if known:
        return Path(known["path"])
    return _adapter_target(registry, version.ref, None).base_path


def _greedy(model, tokens: list[int], count: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)
    out = []
    for _ in range(count):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def fidelity(registry, fused_dir: str | Path, ref: str, prompts: list[str] | None = None, base: str | Path | None = None,
             max_tokens: int = FIDELITY_TOKENS) -> dict:
    """How closely the model folder `fused_dir` reproduces base + `ref`: on each prompt and `max_tokens` greedy
    tokens of base + adapter after it, the largest logit difference and how often the two argmaxes agree.

    base + adapter runs first and its logits are kept, so the two models are never in memory together.
    `fused_dir` may be a staging folder that is not registered yet; it is loaded as a plain mlx-lm model.

    Args:
        prompts: texts to continue; default: a few from the version's dataset, or built-in text.
        base: the model the adapter is applied to; default: the base `fused_dir`'s adapterhub.json names (when
            registered here), else the version's own.

    Returns:
        {"fused", "against", "against_sha256", "base", "prompts", "positions", "max_logit_diff",
         "mean_logit_diff", "token_agreement", "same_continuations", "exact"}: `token_agreement` is the fraction of
        positions whose argmax agree, `same_continuations` the prompts whose greedy continuation is identical,
        `exact` both models give the same tokens everywhere with logits equal to float rounding.
    """
    import mlx.core as mx
    from mlx_lm import load

    folder = Path(fused_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise NotFoundError(f"{folder} is not a model folder (no config.json)", hint="give the folder fuse wrote",
                            kind="model", key=str(folder))
    ranges.require("--max-tokens", max_tokens, ranges.COUNT, hint="pass e.g. 8")
    version = registry.resolve(ref)
    if version.kind == "loreft":
        raise IncompatibleError(f"{version.ref} is a LoReFT adapter: it edits hidden states and is never fused, so no "
                                "fused model can stand for it", hint="compare a LoRA or DoRA version")
    base_path = _fidelity_base(registry, folder, version, base)
    reference = _adapter_target(registry, version.ref, str(base_path))
    prompts = list(prompts) if prompts else default_prompts(registry, version)
    model, tokenizer = load_target(registry, reference)
    sequences, expected = [], []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt)
        if not tokens:
            continue
        sequence = tokens + _greedy(model, tokens, max_tokens)
        logits = model(mx.array([sequence]))[0].astype(mx.float32)
        mx.eval(logits)
        sequences.append((sequence, len(tokens)))
        expected.append(logits)
    if not sequences:
        raise AdapterHubError("no prompt has a token to compare on", hint="give prompts with text in them")
    del model
    mx.clear_cache()
    fused, _ = load(str(folder))
    fused.eval()
    largest, total, count, agree, same = 0.0, 0.0, 0, 0, 0
    for (sequence, prompt_length), want in zip(sequences, expected):
        got = fused(mx.array([sequence]))[0].astype(mx.float32)
        difference = mx.abs(got - want)
        matches = mx.argmax(got, axis=-1) == mx.argmax(want, axis=-1)
        largest = max(largest, difference.max().item())
        total += difference.mean().item() * len(sequence)
        count += len(sequence)
        agree += int(matches.sum().item())
        # The continuation is greedy from the prompt's last position on: identical when every argmax from there agrees.
        same += bool(matches[prompt_length - 1:].all().item())
    scale = max(float(mx.abs(want).max().item()) for want in expected)
    return {
        "fused": str(folder), "against": version.ref, "against_sha256": version.sha256, "base": str(base_path),
        "prompts": len(sequences), "positions": count, "max_logit_diff": largest, "mean_logit_diff": total / count,
        "token_agreement": agree / count, "same_continuations": same,
        # The same tokens, and logits apart by no more than float32's rounding of another summation order
        # (W x + s B A x against (W + s B A) x), about 1e-5 of the logits' size after a few layers.
        "exact": agree == count and largest <= 1e-4 * max(scale, 1.0),
    }


def check_fidelity(registry, fused_dir: str | Path, ref: str, tolerance: float = DEFAULT_TOLERANCE,
                   data: str | Path | None = None, split: str | None = None, count: int = AGAINST_PROMPTS,
                   base: str | Path | None = None) -> dict:
    """`fidelity` on `count` prompts (from `data`, else the version's dataset, else built-in text), passed when
    at most `tolerance` (a share, 0 to 1) of the positions' greedy tokens differ: the report with `tolerance`,
    `disagreement` and `passed`."""
    ranges.require("--tolerance", tolerance, ranges.Range(0, 1), floating=True, hint="pass a share, e.g. --tolerance 0.01")
    ranges.require("--prompts", count, ranges.COUNT, hint="pass e.g. --prompts 16")
    if data is not None:
        prompts = prompts_from(Path(data), split, count)
    else:
        prompts = default_prompts(registry, registry.resolve(ref), count)
        if len(prompts) < count:
            prompts += [p for p in BUILTIN_PROMPTS if p not in prompts][: count - len(prompts)]
    report = fidelity(registry, fused_dir, ref, prompts, base)
    disagreement = 1.0 - report["token_agreement"]
    return {**report, "tolerance": tolerance, "disagreement": disagreement, "passed": disagreement <= tolerance}
