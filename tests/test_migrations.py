"""A registry written in format 1 (base identity = weight files only) opens, upgrades in place and verifies."""

import hashlib
import json

from adapterhub.fingerprint import fingerprint_model
from adapterhub.registry import Registry


def _canonical(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _as_format_1(root):
    """Rewrite a registry the way format 1 wrote it: the hashes it computed, the seven config fields it kept."""
    catalog = root / "catalog"
    bases = json.loads((catalog / "bases.json").read_text())
    renamed = {}
    for row in bases["_default"].values():
        kept = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "quantization")
        row["config"] = {k: row["config"][k] for k in kept}
        old_sha = _canonical([[f["name"], f["sha256"]] for f in row["files"]])
        old_structure = _canonical({"tensors": row["tensors"], "config": row["config"]})
        renamed[row["sha256"]] = (old_sha, old_structure)
        (catalog / "by-base" / f"{row['sha256'][:16]}.json").rename(catalog / "by-base" / f"{old_sha[:16]}.json")
        row["sha256"], row["structure_sha256"] = old_sha, old_structure
    (catalog / "bases.json").write_text(json.dumps(bases))
    for path in (catalog / "adapters").glob("*.json"):
        doc = json.loads(path.read_text())
        for record in doc["versions"].values():
            record["base"]["sha256"], record["base"]["structure_sha256"] = renamed[record["base"]["sha256"]]
        path.write_text(json.dumps(doc))
    marker = json.loads((root / "registry.json").read_text())
    (root / "registry.json").write_text(json.dumps({**marker, "format": 1}))
    return renamed


def test_a_format_1_registry_is_upgraded_in_place(cli, registry, lora_adapter, lora_adapter_b, tiny_model):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    renamed = _as_format_1(registry.root)
    fresh = fingerprint_model(tiny_model)
    (old_sha, _), = renamed.values()
    assert old_sha != fresh["sha256"]

    reopened = Registry(registry.root)
    version = reopened.resolve("stories")  # a read upgrades, under the lock
    assert json.loads((registry.root / "registry.json").read_text())["format"] == 2
    assert version.record["base"]["sha256"] == fresh["sha256"]
    assert version.record["base"]["structure_sha256"] == fresh["structure_sha256"]
    assert [b["sha256"] for b in reopened.bases()] == [fresh["sha256"]]
    assert [v.ref for v in reopened.list(base="tiny-llama")] == ["stories@1"]  # the by-base shard moved too
    assert reopened.verify().ok
    # The same folder is the same base: no second registration, an exact check, and chained imports still fit.
    code, out, _ = cli("--json", "check", "stories", "--base", tiny_model)
    assert code == 0 and json.loads(out)["verdict"] == "exact"
    code, _, err = cli("import", lora_adapter_b, "--name", "stories", "--base", tiny_model, "--parent", "stories@1")
    assert code == 0, err
    assert len(reopened.bases()) == 1


def test_a_newer_format_is_refused(cli, registry):
    marker = json.loads((registry.root / "registry.json").read_text())
    (registry.root / "registry.json").write_text(json.dumps({**marker, "format": 99}))
    code, _, err = cli("list")
    assert code == 1 and "is in format 99, newer than this adapterhub" in err and "upgrade adapterhub" in err


def test_an_upgrade_killed_half_way_runs_again_to_the_same_result(registry, lora_adapter, tiny_model):
    from adapterhub.migrations import base_identity_covers_config

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    _as_format_1(registry.root)
    base_identity_covers_config(Registry(registry.root))  # the step ran, the marker was never bumped: a kill
    reopened = Registry(registry.root)
    assert reopened.resolve("stories").record["base"]["sha256"] == fingerprint_model(tiny_model)["sha256"]
    assert [v.ref for v in reopened.list(base="tiny-llama")] == ["stories@1"] and reopened.verify().ok


def test_an_upgrade_keeps_what_was_recorded_when_the_folder_is_gone_or_edited(cli, registry, lora_adapter, tiny_model, tmp_path):
    import shutil

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    _as_format_1(registry.root)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model, moved)
    base_row = json.loads((registry.catalog / "bases.json").read_text())["_default"]["1"]
    edited = tmp_path / "edited"
    shutil.copytree(tiny_model, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    rows = json.loads((registry.catalog / "bases.json").read_text())
    rows["_default"]["1"]["path"] = str(edited)  # the registered folder's config.json changed since
    (registry.catalog / "bases.json").write_text(json.dumps(rows))
    reopened = Registry(registry.root)
    (base,) = reopened.bases()
    assert base["config"]["hidden_size"] == 64 and base["config"] == base_row["config"]  # what was registered, not the edit
    assert base["previous_sha256"] == [base_row["sha256"]]
    # The same model found elsewhere is still exactly the adapter's base; fields never recorded are named, not failed.
    code, out, _ = cli("--json", "check", "stories", "--base", moved)
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "exact" and "were not compared" in " ".join(report["notes"])
    code, out, _ = cli("--json", "check", "stories", "--base", edited)
    assert code == 1 and json.loads(out)["verdict"] == "different-config"


def test_a_fused_folder_written_before_the_upgrade_still_audits(cli, registry, lora_adapter, tiny_model, tmp_path):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    fused = tmp_path / "fused"
    assert cli("fuse", "stories", "--base", tiny_model, "--out", fused)[0] == 0
    renamed = _as_format_1(registry.root)
    (old_sha, old_structure), = renamed.values()
    # The fused model's row and its folder's adapterhub.json both named the base by its format-1 hashes.
    for path in (registry.catalog / "fused.json",):
        doc = json.loads(path.read_text())
        for row in doc["_default"].values():
            row["base"].update(sha256=old_sha, structure_sha256=old_structure)
        path.write_text(json.dumps(doc))
    record = json.loads((fused / "adapterhub.json").read_text())
    record["base"].update(sha256=old_sha, structure_sha256=old_structure)
    (fused / "adapterhub.json").write_text(json.dumps(record))
    code, out, err = cli("audit", fused)
    assert code == 0, out + err
    assert Registry(registry.root).verify().ok
