import hashlib
import json

import pytest

from adapterhub.errors import ConflictError, NotFoundError
from adapterhub.registry import Registry

SHOW_FIELDS = {"name", "version", "ref", "sha256", "kind", "rank", "scale", "targets", "num_layers", "base", "dataset",
               "training", "parents", "files", "aliases", "tags", "created_at"}


def test_import_records_what_the_tensors_say(cli, lora_adapter, tiny_model, tiny_data):
    code, out, err = cli("--json", "import", lora_adapter, "--name", "stories-lora", "--base", tiny_model,
                         "--dataset", tiny_data, "--tag", "task=stories")
    assert code == 0, err
    code, out, err = cli("--json", "show", "stories-lora")
    assert code == 0, err
    shown = json.loads(out)
    assert SHOW_FIELDS <= set(shown)
    assert shown["ref"] == "stories-lora@1" and shown["version"] == 1
    assert shown["kind"] == "lora" and shown["rank"] == 8 and shown["scale"] == 20.0
    assert shown["num_layers"] == 2 and shown["layers"] == [2, 3]
    assert "self_attn.q_proj" in shown["targets"] and "mlp.down_proj" in shown["targets"]
    weights = (lora_adapter / "adapters.safetensors").read_bytes()
    assert shown["sha256"] == hashlib.sha256(weights).hexdigest()
    assert {f["name"] for f in shown["files"]} == {"adapters.safetensors", "adapter_config.json"}
    assert set(shown["base"]) == {"name", "sha256", "structure_sha256", "model_type"}
    assert shown["base"]["model_type"] == "llama"
    assert shown["dataset"]["examples"] == {"train": 64, "valid": 16, "test": 16}
    assert shown["training"]["hyperparameters"]["iters"] == 6
    assert shown["tags"] == {"task": "stories"} and shown["parents"] == [] and shown["aliases"] == []


def test_versions_count_up_and_refs_resolve(registry, lora_adapter, lora_adapter_b, tiny_model):
    v1, _ = registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    v2, _ = registry.import_adapter(lora_adapter_b, "stories", base=tiny_model, parent="stories@1")
    assert (v1.version, v2.version) == (1, 2)
    assert registry.resolve("stories").ref == "stories@2"
    assert registry.resolve("stories@latest").ref == "stories@2"
    assert registry.resolve("stories@1").sha256 == v1.sha256
    assert registry.resolve(v1.sha256[:12]).ref == "stories@1"
    assert registry.resolve(v2.sha256.upper()[:20]).ref == "stories@2"
    assert v2.record["parents"] == [{"ref": "stories@1", "sha256": v1.sha256, "relation": "resumed-from"}]
    with pytest.raises(NotFoundError, match="has no version 3 \\(latest is 2\\)"):
        registry.resolve("stories@3")


def test_same_weights_under_same_name_are_not_a_new_version(registry, lora_adapter):
    first, created = registry.import_adapter(lora_adapter, "stories")
    again, created_again = registry.import_adapter(lora_adapter, "stories")
    assert created and not created_again and again.ref == first.ref
    other, _ = registry.import_adapter(lora_adapter, "stories-copy")
    assert other.sha256 == first.sha256
    assert len(list(registry.objects.all())) == 2  # weights and config, stored once


def test_checkpoint_import_and_dora_kind(registry, lora_adapter, dora_adapter):
    checkpoint = sorted(lora_adapter.glob("0*_adapters.safetensors"))[0]
    v, _ = registry.import_adapter(lora_adapter, "stories-ckpt", checkpoint=checkpoint.name)
    assert v.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert v.record["source"]["checkpoint"] == checkpoint.name
    d, _ = registry.import_adapter(dora_adapter, "stories-dora")
    assert d.record["kind"] == "dora"


def test_list_filters(cli, registry, lora_adapter, lora_adapter_b, dora_adapter, tiny_model, tiny_model_other_weights):
    registry.import_adapter(lora_adapter, "alpha-lora", base=tiny_model, tags={"task": "a"})
    registry.import_adapter(lora_adapter_b, "beta-lora", base=tiny_model_other_weights, tags={"task": "b"})
    registry.import_adapter(dora_adapter, "alpha-dora", base=tiny_model, tags={"task": "a"})
    refs = lambda *args: [v["ref"] for v in json.loads(cli("--json", "list", *args)[1])]  # noqa: E731
    assert refs() == ["alpha-dora@1", "alpha-lora@1", "beta-lora@1"]
    assert refs("--base", "tiny-llama") == ["alpha-dora@1", "alpha-lora@1"]
    assert refs("--base", "tiny-llama-b") == ["beta-lora@1"]
    assert refs("--kind", "dora") == ["alpha-dora@1"]
    assert refs("--tag", "task=b") == ["beta-lora@1"]
    assert refs("--name", "alpha-*") == ["alpha-dora@1", "alpha-lora@1"]
    assert refs("--name", "alpha-*", "--kind", "lora") == ["alpha-lora@1"]
    code, out, _ = cli("list")
    assert code == 0 and out.splitlines()[0].startswith("REF") and "alpha-lora@1" in out


def test_alias_moves_and_tag_sets(cli, registry, lora_adapter, lora_adapter_b):
    registry.import_adapter(lora_adapter, "stories")
    registry.import_adapter(lora_adapter_b, "stories")
    assert cli("alias", "stories@1", "prod")[0] == 0
    assert registry.resolve("stories@prod").version == 1
    assert cli("alias", "stories@2", "prod")[0] == 0
    assert registry.resolve("stories@prod").version == 2
    assert registry.resolve("stories@2").aliases == ("prod",)
    assert cli("tag", "stories@prod", "owner=ana")[0] == 0
    assert registry.resolve("stories@2").record["tags"] == {"owner": "ana"}
    code, _, err = cli("show", "stories@staging")
    assert code == 1 and err == "error: adapter 'stories' has no alias 'staging' (aliases: prod) — run 'adapterhub show stories'\n"


def test_rm_refuses_a_parent_unless_forced(cli, registry, lora_adapter, lora_adapter_b):
    registry.import_adapter(lora_adapter, "base-run")
    registry.import_adapter(lora_adapter_b, "chained", parent="base-run@1")
    code, _, err = cli("rm", "base-run@1")
    assert code == 1 and "is the parent of chained@1" in err
    assert cli("rm", "chained@1")[0] == 0
    assert cli("rm", "base-run@1")[0] == 0
    assert registry.list() == []
    assert list(registry.objects.all()) == []  # no version references them any more
    assert registry.verify().ok


def test_rm_force_leaves_a_dangling_parent_that_verify_reports(registry, lora_adapter, lora_adapter_b):
    registry.import_adapter(lora_adapter, "base-run")
    registry.import_adapter(lora_adapter_b, "chained", parent="base-run@1")
    with pytest.raises(ConflictError):
        registry.remove("base-run@1")
    registry.remove("base-run@1", force=True)
    report = registry.verify()
    assert not report.ok and any("parent base-run@1" in p for p in report.problems)


def test_rm_keeps_blobs_still_used_by_another_version(registry, lora_adapter):
    registry.import_adapter(lora_adapter, "one")
    registry.import_adapter(lora_adapter, "two")
    registry.remove("one")
    assert registry.resolve("two").sha256 in set(registry.objects.all())
    assert registry.verify().ok


def test_export_is_byte_identical_and_loads_in_mlx_lm(cli, registry, lora_adapter, tiny_model, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    out = tmp_path / "exported"
    code, _, err = cli("export", "stories@1", out)
    assert code == 0, err
    assert (out / "adapters.safetensors").read_bytes() == (lora_adapter / "adapters.safetensors").read_bytes()
    assert (out / "adapter_config.json").read_bytes() == (lora_adapter / "adapter_config.json").read_bytes()
    tokens = mx.array([[1, 5, 9, 12, 7, 3]])
    original, _ = load(str(tiny_model), adapter_path=str(lora_adapter))
    exported, _ = load(str(tiny_model), adapter_path=str(out))
    plain, _ = load(str(tiny_model))
    assert mx.array_equal(original(tokens), exported(tokens)).item()
    assert not mx.allclose(plain(tokens), exported(tokens)).item()  # the adapter really does something
    code, _, err = cli("export", "stories@1", out)
    assert code == 1 and "is not empty" in err


def test_check_verdicts(cli, registry, lora_adapter, tiny_model, tiny_model_other_weights, tiny_model_4bit):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    code, out, _ = cli("--json", "check", "stories", "--base", tiny_model)
    assert code == 0 and json.loads(out)["verdict"] == "exact"
    code, out, err = cli("--json", "check", "stories", "--base", tiny_model_other_weights)
    report = json.loads(out)
    assert code == 1 and report["verdict"] == "different-weights" and report["differing_files"] == ["model.safetensors"]
    assert "not compatible" in err
    code, out, _ = cli("--json", "check", "stories", "--base", tiny_model_other_weights, "--allow-different-weights")
    assert code == 0 and json.loads(out)["compatible"]
    code, out, _ = cli("--json", "check", "stories", "--base", tiny_model_4bit)
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "quantized-variant" and "4-bit" in report["notes"][0]


def test_check_lists_every_structural_mismatch(cli, registry, lora_adapter, tmp_path):
    from adapterhub.tinymodel import write_model

    registry.import_adapter(lora_adapter, "stories")
    narrow = write_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64, num_layers=4)
    code, out, err = cli("check", "stories", "--base", narrow)
    assert code == 1
    mismatches = [line for line in out.splitlines() if line.startswith("  ✗")]
    assert len(mismatches) == 14  # 7 modules × 2 layers
    assert "self_attn.q_proj: adapter expects (in 64, out 64), base has (in 32, out 32)" in out
    shallow = write_model(tmp_path / "shallow", num_layers=2)
    code, out, _ = cli("check", "stories", "--base", shallow)
    assert code == 1 and "adapter touches layer(s) 2, 3 but the base has 2 layers (0–1)" in out
    assert "module model.layers.2.self_attn.q_proj is missing from the base" in out


def test_check_caps_the_listing_at_twenty(registry, all_layers_adapter, tmp_path):
    from adapterhub.tinymodel import write_model

    registry.import_adapter(all_layers_adapter, "everywhere")
    report = registry.check("everywhere", write_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64))
    lines = report.summary().splitlines()
    assert len(report.problems) == 28  # 7 modules × 4 layers
    assert len([x for x in lines if "✗" in x]) == 20 and "  … and 8 more problems" in lines


def test_base_commands(cli, tiny_model):
    code, out, err = cli("--json", "base", "add", tiny_model, "--name", "tiny")
    assert code == 0, err
    added = json.loads(out)
    code, out, _ = cli("--json", "base", "add", tiny_model)
    assert code == 0 and json.loads(out)["sha256"] == added["sha256"]
    assert [b["name"] for b in json.loads(cli("--json", "base", "list")[1])] == ["tiny"]
    assert json.loads(cli("--json", "base", "show", added["sha256"][:12])[1])["name"] == "tiny"
    code, _, err = cli("base", "show", "nope")
    assert code == 1 and "no base model 'nope'" in err


def test_policy_pattern_is_enforced_on_import(cli, registry, lora_adapter, tiny_model):
    from adapterhub.naming import Policy

    registry.set_policy(Policy(pattern="^{base}-{task}-", required_tags=("task",)))
    registry.add_base(tiny_model, name="tiny")
    code, _, err = cli("import", lora_adapter, "--name", "stories", "--base", "tiny", "--tag", "task=qa")
    assert code == 1 and err.startswith("error: invalid name 'stories'") and "try 'tiny-qa-stories'" in err
    code, _, err = cli("import", lora_adapter, "--name", "tiny-qa-stories", "--base", "tiny", "--tag", "task=qa")
    assert code == 0, err


def test_verify_detects_a_corrupted_blob(cli, registry, lora_adapter):
    v, _ = registry.import_adapter(lora_adapter, "stories")
    assert cli("verify")[0] == 0
    blob = registry.objects.path(v.sha256)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    code, out, err = cli("verify")
    assert code == 1 and "stories@1: file adapters.safetensors is corrupt" in out


def test_registry_is_created_on_first_write(tmp_path, lora_adapter):
    registry = Registry(tmp_path / "fresh")
    assert not registry.initialized
    registry.import_adapter(lora_adapter, "stories")
    assert registry.initialized and registry.verify().ok


def test_find_answers_none_for_a_miss_but_never_hides_damage(registry, lora_adapter):
    from adapterhub.errors import CorruptRegistryError, NotFoundError

    registry.import_adapter(lora_adapter, "stories")
    assert registry.find("stories@1").ref == "stories@1"
    assert registry.find("stories@7") is None and registry.find("ghost") is None and registry.find("stories@0") is None
    with pytest.raises(NotFoundError) as missing:
        registry.resolve("stories@7")
    assert (missing.value.kind, missing.value.key) == ("version", "stories@7")
    path = registry.catalog / "adapters" / "stories.json"
    path.write_text(path.read_text()[:10])
    with pytest.raises(CorruptRegistryError):
        registry.find("stories@1")


def test_tensors_in_memory_make_the_record_their_folder_would(registry, lora_adapter, tiny_model, tiny_data):
    import mlx.core as mx

    from adapterhub.errors import InvalidAdapterError
    from tests.conftest import snapshot

    config = json.loads((lora_adapter / "adapter_config.json").read_text())
    tensors = mx.load(str(lora_adapter / "adapters.safetensors"))
    added, created = registry.add_version("in-memory", tensors, config, base=tiny_model, dataset=tiny_data)
    imported, _ = registry.import_adapter(lora_adapter, "from-folder", base=tiny_model, dataset=tiny_data)
    assert created
    differ = {"name", "sha256", "files", "source", "created_at"}
    assert {k: v for k, v in added.record.items() if k not in differ} == \
           {k: v for k, v in imported.record.items() if k not in differ}
    assert added.modules == registry.modules(imported) and len(added.modules) == 14
    stored = mx.load(str(registry.weights(added)), format="safetensors")
    assert stored.keys() == tensors.keys() and all(mx.array_equal(stored[k], tensors[k]).item() for k in tensors)
    blob = registry.weights(added).read_bytes()
    assert added.sha256 == hashlib.sha256(blob).hexdigest() and added.record["source"] is None
    assert not any((registry.root / "objects" / "tmp").iterdir())  # staged, then moved to its address

    # Refused tensors (a rank that disagrees with the config) leave every byte as it was, staging included.
    before = snapshot(registry.root)
    with pytest.raises(InvalidAdapterError, match="rank"):
        registry.add_version("in-memory", tensors, {**config, "lora_parameters": {**config["lora_parameters"], "rank": 4}},
                             base=tiny_model)
    assert snapshot(registry.root) == before
