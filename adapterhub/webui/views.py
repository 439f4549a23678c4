"""What each page of the web page shows, as plain dicts: read from the registry, never written to it.

One function per page; the Starlette app (app.py) turns them into JSON, the page's script into HTML.
Nothing a request sends becomes a filesystem path: versions are named by refs, bases, datasets and
fused models by their sha256, runs by their id, and only what the registry records is opened.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import AdapterHubError, NotFoundError
from ..lineage import Lineage, Walker, descendants, walk_up
from ..records import AdapterVersion, EvalResult
from ..registry import Registry
from .catalogue import CatalogueView, QueryError
from .graph import layout

MAX_COMPARE = 8


def _finite(value):
    """A loss as JSON can carry it: NaN and infinity (a diverged step) become null, as JSON has neither."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def loss_points(losses: dict | None) -> list[dict]:
    """{"train": [[step, loss], ...], "val": [...]} -> [{split, step, loss}], the rows a loss chart draws."""
    points = []
    for split in ("train", "val"):
        for pair in (losses or {}).get(split) or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int):
                points.append({"split": split, "step": pair[0], "loss": _finite(pair[1])})
    return points


def flatten(doc: dict, prefix: str = "") -> dict[str, object]:
    """Nested hyper-parameters as one level of dotted keys (lora_parameters.rank), so versions line up row by row."""
    flat: dict[str, object] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---- runs ------------------------------------------------------------------------------------------


def _run_or_none(registry: Registry, run_id: str | None) -> dict | None:
    if not run_id:
        return None
    try:
        return registry.run(run_id)
    except NotFoundError:
        return None  # the run was recorded in another registry (a pulled version): the version's own losses remain


def checkpoints_kept(run: dict) -> list[dict]:
    """The run's checkpoints on disk and why each is kept (last / best / every-N), as `checkpoints list` says."""
    from ..training import checkpoints

    folder = Path(run.get("dir") or "")
    config = run.get("config") or {}
    if not run.get("dir") or not folder.is_dir():
        return []
    found = checkpoints.listing(folder)
    why = checkpoints.retained(found, config.get("keep_last", 3), config.get("keep_best", 1), config.get("keep_every"))
    return [{"step": c.step, "train_loss": _finite(float(c.metadata.get("train_loss") or "nan")),
             "val_loss": c.val_loss, "kept_because": why.get(c.step, []), "file": c.path.name} for c in found]


def _run_summary(registry: Registry, run: dict) -> dict:
    status = registry.run_status(run)
    return {"id": run["id"], "name": run["name"], "status": status, "step": run.get("step") or 0, "iters": run["iters"],
            "progress": min(1.0, (run.get("step") or 0) / run["iters"]) if run.get("iters") else None,
            "started_at": run["started_at"], "finished_at": run.get("finished_at"), "result": run.get("result"),
            "base": run.get("base"), "dataset": run.get("dataset"),
            "parent": run.get("parent"), "trained_tokens": run.get("trained_tokens"),
            "train_seconds": run.get("train_seconds")}


def runs_view(registry: Registry, status: str | None = None) -> dict:
    if status not in (None, "running", "interrupted", "finished", "failed"):
        raise QueryError(f"status '{status}' is none of running, interrupted, finished, failed", hint="pick one from the list")
    runs = [_run_summary(registry, r) for r in registry.runs(status)]
    return {"runs": list(reversed(runs))}  # newest first: the one a person just started is on top


def run_view(registry: Registry, run_id: str) -> dict:
    run = registry.run(run_id)
    return {"run": _run_summary(registry, run), "config": flatten(run.get("config") or {}),
            "losses": loss_points(run.get("losses")), "checkpoints": checkpoints_kept(run)}


# ---- versions --------------------------------------------------------------------------------------


def _ancestors(registry: Registry, version: AdapterVersion) -> Lineage:
    # From the version itself, not its ref as text: lineage.ancestors() would read a folder of that name.
    walker = Walker(registry)
    return walk_up(walker, walker.adapter(version))


def version_view(registry: Registry, catalogue: CatalogueView, ref: str) -> dict:
    """Everything `show` knows, plus the run's loss curves and checkpoints, children, siblings and lineage."""
    version = registry.resolve(ref)
    record = version.to_dict()
    training = record.get("training") or {}
    run = _run_or_none(registry, training.get("run_id"))
    # The run record's curve is the one a running or resumed run keeps writing; the version's copy is the same at the end.
    losses = loss_points(run.get("losses")) if run and run.get("losses") else loss_points(training.get("losses"))
    return {
        "version": record, "evaluations": registry.evaluations(version),
        "hyperparameters": flatten(training.get("hyperparameters") or {}),
        "training": {k: v for k, v in training.items() if k not in ("hyperparameters", "losses")},
        "losses": losses, "run": _run_summary(registry, run) if run else None,
        "checkpoints": checkpoints_kept(run) if run else [],
        "children": catalogue.children(version),
        "versions": [{"ref": v.ref, "created_at": v.record["created_at"], "sha256": v.sha256}
                     for v in catalogue.versions(version.name)],
        "lineage": layout(_ancestors(registry, version)),
    }


def descendants_view(registry: Registry, ref: str) -> dict:
    """What was made from a version (chained, stacked, fused, promoted), directly or not: `lineage REF --descendants`.

    A page of its own request: it reads every record, about a second at 10,000 versions.
    """
    return layout(descendants(registry, target=registry.resolve(ref).ref))


def base_view(registry: Registry, catalogue: CatalogueView, name_or_sha: str) -> dict:
    base = registry.base(name_or_sha)
    on_base = sorted(catalogue.on_base(base["sha256"]), key=lambda v: (v.name, v.version))
    return {"base": {k: v for k, v in base.items() if k != "tensors"} | {"num_tensors": len(base.get("tensors") or {})},
            "versions": [v.ref for v in on_base]}


def find_dataset(registry: Registry, key: str) -> dict:
    """A registered dataset by its sha256 or name."""
    found = next((d for d in registry.datasets() if key in (d["sha256"], d["name"])), None)
    if found is None:
        raise NotFoundError(f"no dataset '{key}' in this registry", hint="follow a dataset link from a version",
                            kind="dataset", key=key)
    return found


def find_fused(registry: Registry, sha256: str) -> dict:
    """A fused model this registry made, by its sha256."""
    record = registry.fused(sha256)
    if record is None:
        raise NotFoundError(f"no fused model with sha256 {sha256[:12]} in this registry",
                            hint="follow a fused-model link from a lineage graph", kind="fused", key=sha256)
    return record


def dataset_view(registry: Registry, key: str) -> dict:
    dataset = find_dataset(registry, key)
    # Everything trained on it, directly or through a chain: `adapterhub lineage --dataset SHA --descendants`.
    return {"dataset": dataset, "lineage": layout(descendants(registry, dataset=dataset["sha256"]))}


def fused_view(registry: Registry, sha256: str) -> dict:
    record = find_fused(registry, sha256)
    walker = Walker(registry)
    return {"fused": record, "evaluations": registry.evaluations(sha256),
            "lineage": layout(walk_up(walker, walker.fused(sha256, record=record)))}


# ---- compare ---------------------------------------------------------------------------------------


def _differs(values: list) -> bool:
    return any(v != values[0] for v in values[1:])


def _best(values: list, better: str | None) -> list[int]:
    numbers = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not better or len(numbers) < 2:
        return []
    best = (min if better == "lower" else max)(v for _, v in numbers)
    marked = [i for i, v in numbers if v == best]
    return [] if len(marked) == len(values) else marked  # a row where all tie has no best


def compare_view(registry: Registry, refs: list[str]) -> dict:
    """Versions side by side from their records: properties, hyper-parameters, shared evaluations, loss curves.

    Not `evaluation.compare`: it checks each version against its base folder (re-hashing the weights,
    fingerprinting the base), which a read-only page cannot ask of a registry whose bases may live
    elsewhere. The evaluation rows follow its rules: a row per measure (data, split, metric, batching)
    that every version has, its newest value, the best marked.
    """
    refs = [r for r in refs if r]
    if not 2 <= len(refs) <= MAX_COMPARE:
        raise QueryError(f"compare needs 2 to {MAX_COMPARE} versions, got {len(refs)}",
                         hint="tick two or more versions in the catalogue, or add refs here")
    versions = [registry.resolve(ref) for ref in refs]
    records = [v.record for v in versions]

    def row(section: str, field: str, values: list, better: str | None = None, **extra) -> dict:
        return {"section": section, "field": field, "values": values, "differs": _differs(values),
                "best": _best(values, better), **extra}

    rows = [row("version", field, [get(r) for r in records]) for field, get in (
        ("kind", lambda r: r["kind"]), ("rank", lambda r: r["rank"]), ("scale", lambda r: r["scale"]),
        ("targets", lambda r: ", ".join(r["targets"])), ("layers", lambda r: r["num_layers"]),
        ("parameters", lambda r: r.get("num_parameters")), ("base", lambda r: (r.get("base") or {}).get("name")),
        ("dataset", lambda r: (r.get("dataset") or {}).get("name")),
        ("parents", lambda r: ", ".join(f"{p['relation']} {p['ref']}" for p in r["parents"]) or None),
        ("created", lambda r: r["created_at"]))]
    hyper = [flatten((r.get("training") or {}).get("hyperparameters") or {}) for r in records]
    for field in sorted(set().union(*hyper)):
        rows.append(row("hyper-parameters", field, [h.get(field) for h in hyper]))
    curves = [loss_points((r.get("training") or {}).get("losses")) for r in records]
    for split in ("train", "val"):
        finals = [next((p["loss"] for p in reversed(c) if p["split"] == split), None) for c in curves]
        if any(v is not None for v in finals):
            rows.append(row("training", f"final {split} loss", finals, "lower"))
    newest: list[dict[tuple, EvalResult]] = []
    for version in versions:
        per = {}
        for result in map(EvalResult.from_dict, registry.evaluations(version)):
            per[result.measure] = result
        newest.append(per)
    shared = set.intersection(*(set(n) for n in newest))
    for measure in sorted(shared, key=lambda m: (newest[0][m].row["dataset"]["name"], m[1], m[2])):
        sample = newest[0][measure]
        for score, value in sample.row["scores"].items():
            values = [n[measure].row["scores"].get(score) for n in newest]
            rows.append(row("evaluations", f"{sample.split}_{score}", values,
                            "lower" if score in ("loss", "perplexity") else "higher",
                            dataset=sample.row["dataset"]["name"]))
    return {"columns": [{"ref": v.ref, "sha256": v.sha256, "kind": v.kind} for v in versions], "rows": rows,
            "not_shared": len(set().union(*(set(n) for n in newest)) - shared),
            "losses": [{**p, "ref": v.ref} for v, c in zip(versions, curves) for p in c]}


# ---- audit -----------------------------------------------------------------------------------------


def audit_target(registry: Registry, target: str) -> str:
    """What `audit` is run on for a node the page names: `adapter:REF` or `fused:SHA256` of this registry.

    The audit takes a ref or a folder; a folder comes from the registry's own record, never from the request.
    """
    kind, _, key = target.partition(":")
    if kind == "adapter" and key:
        return registry.resolve(key).ref
    if kind == "fused" and key:
        return find_fused(registry, key)["path"]
    raise QueryError(f"cannot audit '{target}'", hint="audit adapter:NAME@VERSION or fused:SHA256")


def audit_view(registry: Registry, target: str) -> dict:
    """`adapterhub audit` on a node: every file along its lineage re-hashed; each node ok, changed, missing or unchecked."""
    from ..audit import audit

    report = audit(registry, audit_target(registry, target))
    statuses = {f.node.id: f.status for f in report.findings}
    return {**report.to_dict(), "target": target, "lineage": layout(report.lineage, statuses)}


def error_payload(error: AdapterHubError) -> dict:
    return {"error": error.message, "hint": error.hint}
