"""Upgrades of a registry's on-disk format, run once, in place, under the registry lock.

`registry.json` says which format a registry was written in. Opening an older one
runs each step from there to `FORMAT`; the marker is bumped last, so a step killed
half-way runs again from the start, and every step is written to be safe to rerun
(it derives what it needs from data it does not change).
"""

from __future__ import annotations

from pathlib import Path

from .errors import AdapterHubError
from .fingerprint import canonical_sha256, config_essentials, model_sha256
from .files import read_json, write_json
from .store import open_db, read_tables

FORMAT = 2
# The config fields a format-1 registry hashed into a base's structure (quantization aside).
_FORMAT_1_ESSENTIALS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                        "num_attention_heads", "num_key_value_heads", "vocab_size")


def upgrade(registry, marker: dict) -> dict:
    """Run every step from `marker["format"]` to FORMAT; returns the new marker. Hold the lock."""
    for version, step in STEPS:
        if marker["format"] < version:
            step(registry)
            marker = {**marker, "format": version}
            write_json(registry.root / "registry.json", marker)
    return marker


def _format_1_config(config: dict) -> dict:
    """The config fields format 1 kept: seven, and quantization's group size and bits."""
    old = {k: config.get(k) for k in _FORMAT_1_ESSENTIALS}
    quant = config.get("quantization")
    old["quantization"] = {"group_size": quant.get("group_size"), "bits": quant.get("bits")} if quant else None
    return old


def _format_1_sha256(base: dict) -> str:
    """A base's sha256 as format 1 computed it: its weight files alone."""
    return canonical_sha256([[f["name"], f["sha256"]] for f in base["files"]])


def _format_2_identity(base: dict) -> tuple[str, str, dict]:
    """Format 2 hashes config.json's architecture fields into both hashes. They come from the base's
    folder only while its config.json still says what was recorded at registration (an edited or
    unreadable config is not the base that was registered); otherwise the recorded fields stay as
    they are, and fields never recorded stay absent (compat then says they were not compared)."""
    recorded = base["config"]
    try:
        folder_config = read_json(Path(base["path"]) / "config.json") if base.get("path") else None
    except AdapterHubError:
        folder_config = None
    essentials = config_essentials(folder_config) if isinstance(folder_config, dict) else None
    if essentials is None or _format_1_config(essentials) != _format_1_config(recorded):
        essentials = dict(recorded)
    return (model_sha256(base["files"], essentials), canonical_sha256({"tensors": base["tensors"], "config": essentials}),
            essentials)


def base_identity_covers_config(registry) -> None:
    """Format 1 → 2: a base's sha256 and structure_sha256 now cover config.json's architecture fields.

    Every place that names a base by hash moves with it: the base rows, each version's and
    fused model's base reference, training runs, and the by-base index shards (named by hash).
    """
    bases_db = open_db(registry.catalog / "bases.json")
    renamed: dict[str, dict] = {}  # any known hash of a base (format 1 or 2) -> its format-2 identity
    for row in bases_db.all():
        sha, structure, essentials = _format_2_identity(row)
        old_sha = _format_1_sha256(row)
        renamed[old_sha] = renamed[sha] = {"sha256": sha, "structure_sha256": structure, "config": essentials}
        # Folders written before (a fused model's adapterhub.json, checkpoints) keep naming the old hash.
        previous = sorted({*row.get("previous_sha256", []), old_sha} - {sha})
        bases_db.update({"sha256": sha, "structure_sha256": structure, "config": essentials,
                         **({"previous_sha256": previous} if previous else {})}, doc_ids=[row.doc_id])

    def moved(ref: dict | None) -> dict | None:
        if not ref or ref.get("sha256") not in renamed:
            return ref
        new = renamed[ref["sha256"]]
        return {**ref, "sha256": new["sha256"], **({"structure_sha256": new["structure_sha256"]} if "structure_sha256" in ref else {})}

    for path in sorted((registry.catalog / "adapters").glob("*.json")):
        tables = read_tables(path)
        versions = tables.get("versions", {})
        if any(moved(r.get("base")) != r.get("base") for r in versions.values()):
            db = open_db(path)
            for doc_id, record in versions.items():
                if moved(record.get("base")) != record.get("base"):
                    db.table("versions").update({"base": moved(record["base"])}, doc_ids=[doc_id])
    for filename in ("fused.json", "runs.json"):
        db = open_db(registry.catalog / filename)
        for row in db.all():
            if moved(row.get("base")) != row.get("base"):
                db.update({"base": moved(row["base"])}, doc_ids=[row.doc_id])
    for old_sha, new in renamed.items():
        old_shard = registry.catalog / "by-base" / f"{old_sha[:16]}.json"
        new_shard = registry.catalog / "by-base" / f"{new['sha256'][:16]}.json"
        if old_shard != new_shard and old_shard.is_file():
            names = {d["name"] for d in open_db(old_shard).all()} - {d["name"] for d in open_db(new_shard).all()}
            open_db(new_shard).insert_multiple({"name": n} for n in sorted(names))
            old_shard.unlink()


STEPS = [(2, base_identity_covers_config)]
