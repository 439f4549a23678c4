"""Hugging Face model cards for adapter versions and fused models.

The front matter carries what the Hub indexes (`base_model`, `base_model_relation`,
`library_name`, `datasets`, `tags`, `license`); the body carries what a person
auditing the model needs: the fingerprints, the hyper-parameters, the loss curve
and the lineage. Values are written as JSON strings, which YAML reads as is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .lineage import Node, Walker, ancestors, folder_record, to_tree, walk_up
from .records import RECORD_FILE, AdapterVersion, EvalResult
from .registry import Registry
from .files import read_json

LOSS_ROWS = 12  # a loss curve in a card is a glance, not the log


def _yaml(front: dict) -> str:
    lines = ["---"]
    for key, value in front.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def base_license(base: dict | None) -> str | None:
    """The license the base model's own card declares, when its folder is here to read."""
    readme = Path(base["path"]) / "README.md" if base and base.get("path") else None
    if not readme or not readme.is_file():
        return None
    match = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    found = re.search(r"^license:\s*[\"']?([^\s\"']+)", match.group(1), re.M) if match else None
    return found.group(1) if found else None


# A folder in a Hugging Face cache names its repo: .../models--OWNER--NAME/snapshots/<commit>.
_HF_CACHE_FOLDER = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/")


def _base_id(registry: Registry, ref: dict | None) -> tuple[str | None, str | None, dict | None]:
    """(the base's Hub repo id or None, the name to show, its registered row).

    Only a Hub id goes into `base_model`: the Hub links (and validates) it as a model repo, which
    a local base name is not.
    """
    record = next((b for b in registry.bases() if ref and b["sha256"] == ref["sha256"]), None)
    hub_id = (record or {}).get("hf_repo")
    if hub_id is None and record and record.get("path"):
        found = _HF_CACHE_FOLDER.search(record["path"].replace("\\", "/") + "/")
        hub_id = f"{found.group(1)}/{found.group(2)}" if found else None
    return hub_id, hub_id or (ref or {}).get("name"), record


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _losses(training: dict | None) -> str:
    losses = (training or {}).get("losses") or {}
    train = dict((int(s), v) for s, v in losses.get("train", []))
    val = dict((int(s), v) for s, v in losses.get("val", []))
    steps = sorted(set(train) | set(val))
    if not steps:
        return "No losses were recorded."
    if len(steps) > LOSS_ROWS:
        every = (len(steps) - 1) / (LOSS_ROWS - 1)
        steps = sorted({steps[round(i * every)] for i in range(LOSS_ROWS)})
    fmt = lambda x: f"{x:.4f}" if x is not None else ""  # noqa: E731
    return "\n".join(["| step | train loss | validation loss |", "|---:|---:|---:|"]
                     + [f"| {s} | {fmt(train.get(s))} | {fmt(val.get(s))} |" for s in steps])


SCORE_NAMES = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match", "token_accuracy": "token accuracy"}


def _newest_evaluations(rows: list[dict]) -> list[EvalResult]:
    """The newest result of each measurement: one repeated with --force is reported once, as measured last."""
    newest = {}
    for result in map(EvalResult.from_dict, rows):
        newest[result.key] = result
    return list(newest.values())


def model_index(name: str, rows: list[dict]) -> list[dict]:
    """Recorded evaluations as the Hub's `model-index` results (one per dataset split and metric)."""
    results = [{
        "task": {"type": "text-generation"},
        "dataset": {"name": r.row["dataset"]["name"], "type": r.row["dataset"]["name"], "split": r.split,
                    "revision": r.row["dataset"]["sha256"]},
        "metrics": [{"type": score, "value": value, "name": f"{r.split} {SCORE_NAMES.get(score, score)}"}
                    for score, value in r.row["scores"].items()],
    } for r in _newest_evaluations(rows)]
    return [{"name": name, "results": results}] if results else []


def _evaluations(rows: list[dict]) -> str:
    results = _newest_evaluations(rows)
    if not results:
        return "Not evaluated yet: `adapterhub eval` records scores here."
    return "\n".join(["| dataset | split | metric | value | examples | base | measured |", "|---|---|---|---:|---:|---|---|"] + [
        f"| {r.row['dataset']['name']} `{r.row['dataset']['sha256'][:12]}` | {r.split} | {SCORE_NAMES.get(score, score)} | "
        f"{value:.4f} | {r.row['examples']} | {r.row['base']['name']} | {r.row['created_at']} |"
        for r in results for score, value in r.row["scores"].items()])


def adapter_card(registry: Registry, version: AdapterVersion, library: str = "mlx") -> str:
    r = version.record
    hub_id, base_id, base_record = _base_id(registry, r.get("base"))
    evaluations = registry.evaluations(version)
    front = {
        "base_model": hub_id, "base_model_relation": "adapter" if hub_id else None, "library_name": library,
        "datasets": [r["dataset"]["name"]] if r.get("dataset") else [],
        "tags": ["adapterhub", "mlx", r["kind"]] + (["peft"] if library == "peft" else [])
                + [f"{k}:{v}" for k, v in sorted(r["tags"].items())],
        "license": base_license(base_record),
        "model-index": model_index(version.name, evaluations),
    }
    training = r.get("training") or {}
    hyper = training.get("hyperparameters") or {}
    base = r.get("base")
    data = r.get("dataset")
    body = [
        f"# {version.ref}", "",
        r.get("description") or f"A {r['kind'].upper()} adapter for {base_id or 'an unrecorded base model'}, catalogued by adapterhub.",
        "", "## Metadata", "",
        _table([("sha256", f"`{r['sha256']}`"), ("kind", r["kind"]), ("rank", r["rank"]), ("scale", f"{r['scale']:g}"),
                ("targets", ", ".join(f"`{t}`" for t in r["targets"])), ("layers", f"{r['num_layers']}"),
                ("parameters", f"{r.get('num_parameters', 0):,} ({r.get('dtype', '?')})"),
                ("base model", f"{base['name']} `{base['sha256']}`" if base else "not recorded"),
                ("dataset", f"{data['name']} `{data['sha256']}` {json.dumps(data['examples'])}" if data else "not recorded"),
                ("trained with", training.get("tool", "not recorded")), ("created", r["created_at"])]),
        "", "## Hyper-parameters", "",
        "\n".join(["| name | value |", "|---|---|"] + [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(hyper.items())])
        if hyper else "Not recorded.",
        "", "## Loss", "", _losses(training),
        "", "## Evaluation", "", _evaluations(evaluations),
        "", "## Lineage", "", "```text", to_tree(ancestors(registry, version.ref)), "```",
        "", "Re-check every hash above with `adapterhub audit " + version.ref + "`.", "",
    ]
    return _yaml(front) + "\n" + "\n".join(body)


def fused_card(registry: Registry, record: dict, folder: Path) -> str:
    """The card fuse writes into the fused folder (the record may not be registered yet)."""
    hub_id, base_id, base_record = _base_id(registry, record["base"])
    walker = Walker(registry)
    root = Node(f"fused:{record['sha256']}", "fused", str(Path(folder).resolve()), record["sha256"], True, record)
    lineage = walk_up(walker, root)
    datasets = sorted({n.label for n in lineage.nodes.values() if n.kind == "dataset"})
    evaluations = registry.evaluations(record["sha256"]) if registry.initialized else []
    front = {"base_model": hub_id, "base_model_relation": "merge" if hub_id else None, "library_name": "mlx",
             "datasets": datasets,
             "tags": ["adapterhub", "mlx", "merge"], "license": base_license(base_record),
             "model-index": model_index(Path(folder).name, evaluations)}
    adapters = "\n".join(f"- `{a['ref']}` (sha256 `{a['sha256']}`)" for a in record["adapters"])
    body = [
        f"# {Path(folder).name}", "",
        f"{base_id} (sha256 `{record['base']['sha256']}`) with these adapters fused into its weights:", "", adapters, "",
        *(["## Evaluation", "", _evaluations(evaluations), ""] if evaluations else []),
        "## Lineage", "", "```text", to_tree(lineage), "```", "",
        "`adapterhub.json` records the base fingerprint, the adapters and the restore data: "
        "`adapterhub audit .` re-checks every hash, `adapterhub unfuse . --out DIR` gives the base back.", "",
    ]
    return _yaml(front) + "\n" + "\n".join(body)


def card(registry: Registry, target: str) -> str:
    """The card for a version ref, or for a fused model folder."""
    path = Path(target).expanduser()
    if path.is_dir():
        record = read_json(path / RECORD_FILE)
        if isinstance(record, dict) and "adapters" in record:
            # The folder's record is untrusted text: the registry's copy, or a checked one, goes into the card.
            return fused_card(registry, folder_record(Walker(registry), path), path)
    return adapter_card(registry, registry.resolve(target))
