"""Evaluation: scores of a base model, an adapter version or a fused model on held-out data, recorded on
what was evaluated and reused; versions side by side; `list --sort eval:SCORE`.

An operation (layer 5), in four modules: `eval_settings` (metrics and defaults), `eval_inputs` (what is
evaluated and on which data, checked before anything loads), `eval_scoring` (mlx-lm's loss and greedy
exact-match on a loaded model) and this one, which decides what to measure and what to reuse. `fidelity`
checks a fused model folder against base + adapter.

Usable without the CLI:

    result = evaluate(registry, "sql-lora@3", data="data/sql", metric="exact-match")
    result.scores          # {"test_exact_match": 0.94, "test_token_accuracy": 0.98}
    compare(registry, ["sql-lora@2", "sql-lora@3"]).rows
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import ranges
from .errors import AdapterHubError
from .eval_inputs import EvalData, Target, adapter_target, base_target, check_data, data_folder, resolve_target
from .eval_scoring import Progress, no_progress, record_scores
from .eval_settings import BATCH_SIZE, MAX_SEQ_LENGTH, SCORES, SPLITS
from .records import LOWER_IS_BETTER, AdapterVersion, EvalResult

SORT_FIELDS = ("name", "version", "created_at", "kind", "rank", "scale", "num_layers", "num_parameters", "base", "dataset")


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
                    progress: Progress = no_progress) -> list[EvalResult]:
    """Each metric of `target` on `data`: the recorded result when there is one (unless `force`), else measured
    (the model loaded once for all that are missing) and recorded."""
    recorded = [] if force else target.recorded(registry)
    found = {m: _newest(recorded, _key(target, data, m, batch_size, max_seq_length)) for m in metrics}
    missing = [m for m in metrics if found[m] is None]
    measured = ({r.metric: r for r in record_scores(registry, target, data, missing, batch_size, max_seq_length, progress)}
                if missing else {})
    return [EvalResult(found[m].row, reused=True) if found[m] else measured[m] for m in metrics]


def evaluate(registry, target: str | Path | None = None, base: str | Path | None = None, data: str | Path | None = None,
             split: str = "test", metric: str = "loss", batch_size: int = BATCH_SIZE, max_seq_length: int = MAX_SEQ_LENGTH,
             force: bool = False, progress: Progress = no_progress) -> EvalResult:
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
    checked = check_data(registry, data_folder(registry, subject, data), split, [metric], batch_size)
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
            progress: Progress = no_progress) -> Comparison:
    """Versions (and `base` alone) side by side, with every evaluation they all share.

    With `data`, each is first scored on it (recorded results reused): `metrics`, by default the loss, and
    exact-match too for prompt/completion or chat data.
    """
    _check_sizes(batch_size, max_seq_length)
    if metrics and data is None:
        raise AdapterHubError("--metric chooses what --data scores", hint="pass --data DIR, or drop --metric to see what is recorded")
    targets = [adapter_target(registry, ref, None) for ref in refs] + ([base_target(registry, base)] if base else [])
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
