"""verify finds every broken invariant on a registry the test damages; verify --repair removes only leftovers."""

import json
import os

import pytest

from tests.conftest import assert_refused, snapshot


def _edit_tables(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _overwrite_blob(registry, sha, data: bytes):
    blob = registry.objects.path(sha)
    blob.chmod(0o644)
    blob.write_bytes(data)


@pytest.fixture
def two_versions(registry, lora_adapter, lora_adapter_b, tiny_model):
    one, _ = registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    two, _ = registry.import_adapter(lora_adapter_b, "stories", base=tiny_model)
    return one, two


def test_a_blob_overwritten_with_other_weights_is_refused_everywhere_and_healed_by_reimport(
        cli, registry, two_versions, lora_adapter, tiny_model, tmp_path):
    one, two = two_versions
    _overwrite_blob(registry, one.sha256, registry.objects.path(two.sha256).read_bytes())
    before = snapshot(registry.root)
    for args in (["export", "stories@1", tmp_path / "mlx"], ["export", "stories@1", tmp_path / "peft", "--format", "peft"],
                 ["check", "stories@1", "--base", tiny_model],
                 ["fuse", "stories@1", "--base", tiny_model, "--out", tmp_path / "fused"]):
        assert_refused(cli(*args), "is corrupt: its bytes no longer hash to its sha256", before, registry)
        assert not any(tmp_path.glob("*/adapters.safetensors"))
    code, out, _ = cli("verify")
    assert code == 1 and "stories@1: file adapters.safetensors is corrupt" in out
    # The genuine bytes, imported under another name, replace the corrupt blob: the store heals.
    assert cli("import", lora_adapter, "--name", "stories-again", "--base", tiny_model)[0] == 0
    assert registry.objects.verified(one.sha256) and cli("verify")[0] == 0


def test_a_record_whose_sha256_is_not_its_weights_is_found_and_never_used(cli, registry, two_versions, tmp_path):
    one, two = two_versions
    _edit_tables(registry.catalog / "adapters" / "stories.json",
                 lambda d: d["versions"]["1"].update(sha256=two.sha256))
    code, out, _ = cli("verify")
    assert code == 1 and f"record stories@1 claims weights {two.sha256[:12]} but its files[] list {one.sha256[:12]}" in out
    before = snapshot(registry.root)
    assert_refused(cli("export", "stories@1", tmp_path / "out"), "claims weights", before, registry)
    # Listing and removing never read the weights: the damaged version stays visible and removable.
    assert cli("list")[0] == 0 and cli("rm", "stories@1")[0] == 0 and cli("verify")[0] == 0


@pytest.mark.parametrize("damage,problem", [
    (lambda d: d["versions"].update({"3": d["versions"]["2"]}), "is stored as version 3"),
    (lambda d: d["versions"]["2"].update(name="other"), "says its name is 'other' but is filed under 'stories'"),
    (lambda d: d["versions"]["2"].update(parents=[{"ref": "stories@2", "sha256": d["versions"]["2"]["sha256"],
                                                   "relation": "resumed-from"}]), "names itself as its parent"),
    (lambda d: (d["versions"]["1"].update(parents=[{"ref": "stories@2", "sha256": d["versions"]["2"]["sha256"],
                                                    "relation": "resumed-from"}]),
                d["versions"]["2"].update(parents=[{"ref": "stories@1", "sha256": d["versions"]["1"]["sha256"],
                                                    "relation": "resumed-from"}])),
     "lineage cycle: stories@1 -> stories@2 -> stories@1"),
    (lambda d: d.setdefault("removed", {}).update({"2": {"version": 2, "sha256": "0" * 64, "removed_at": "x"}}),
     "stories@2 is recorded both as present and as removed"),
], ids=["duplicate version", "name disagrees with file", "own parent", "cycle", "present and removed"])
def test_verify_finds_broken_catalogue_invariants(cli, registry, two_versions, damage, problem):
    _edit_tables(registry.catalog / "adapters" / "stories.json", damage)
    code, out, err = cli("verify")
    assert code == 1 and problem in out, out
    assert "has 1 problem(s)" in err or "problem(s)" in err


@pytest.mark.parametrize("target", ["sha", "by-base", "runs.json", "fused.json", "datasets.json"])
def test_verify_finds_a_truncated_index_file(cli, registry, two_versions, target):
    folder = registry.catalog / target
    path = sorted(folder.glob("*.json"))[0] if folder.is_dir() else folder
    if not path.exists():
        path.write_text('{"_default": {}}')
    path.write_text(path.read_text()[:7])
    code, out, _ = cli("verify")
    assert code == 1 and f"{path} is damaged" in out


def test_verify_finds_a_policy_regex_that_does_not_compile(cli, registry, two_versions):
    (registry.root / "policy.json").write_text(json.dumps({"name_pattern": "^(unclosed", "required_tags": []}))
    code, out, _ = cli("verify")
    assert code == 1 and "is not a valid regular expression" in out


def test_repair_removes_only_leftovers_and_reports_them(cli, registry, two_versions, tmp_path):
    one, _ = two_versions
    orphan, _ = registry.objects.put_file(registry.objects.path(one.sha256))  # same bytes: not an orphan
    stray = tmp_path / "stray.bin"
    stray.write_bytes(b"left by a killed import")
    orphan, _ = registry.objects.put_file(stray)
    (registry.objects.root / "tmp" / ".blob.123.abcd1234.tmp").write_bytes(b"half")
    # A killed fuse: its staging folder beside the output, and its journal row, with a pid that is gone.
    staging = tmp_path / ".fused.fuse-999999.tmp"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 4096)
    from adapterhub.store import open_db
    open_db(registry.catalog / "staging.json").insert(
        {"path": str(staging), "out": str(tmp_path / "fused"), "purpose": "fuse", "pid": 999999,
         "host": os.uname().nodename, "started_at": "2026-01-01T00:00:00Z"})
    code, out, _ = cli("verify")
    assert code == 0 and "1 unreferenced blob(s)" in out and "staging folder of a killed fuse (4,096 bytes)" in out
    assert "1 temporary file(s)" in out and "verify --repair" in out
    code, out, _ = cli("--json", "verify", "--repair")
    report = json.loads(out)
    assert code == 0 and report["repaired"]["removed"]["orphan blobs"] == [orphan]
    assert report["repaired"]["removed"]["staging folders"] == [str(staging)] and not staging.exists()
    assert report["notes"] == [] and registry.objects.verified(one.sha256)
    assert registry.resolve("stories@2")


def test_repair_refuses_while_the_catalogue_is_damaged(cli, registry, two_versions):
    stray = registry.root.parent / "stray.bin"
    stray.write_bytes(b"x")
    registry.objects.put_file(stray)
    path = registry.catalog / "adapters" / "stories.json"
    path.write_text(path.read_text()[:30])
    before = snapshot(registry.root)
    assert_refused(cli("verify", "--repair"), "the catalogue itself is damaged", before, registry)


def test_a_version_number_means_one_set_of_bytes_forever(cli, registry, lora_adapter, lora_adapter_b, all_layers_adapter):
    registry.import_adapter(lora_adapter, "stories")
    gone, _ = registry.import_adapter(lora_adapter_b, "stories")
    assert cli("rm", "stories@2")[0] == 0
    third, created = registry.import_adapter(all_layers_adapter, "stories")
    assert created and third.version == 3
    code, _, err = cli("show", "stories@2")
    assert code == 1 and "stories@2 was removed at " in err and f"sha256 {gone.sha256[:12]}" in err
    # Removing every version keeps the high-water mark too.
    assert cli("rm", "stories@1")[0] == 0 and cli("rm", "stories@3")[0] == 0
    again, _ = registry.import_adapter(lora_adapter, "stories")
    assert again.version == 4 and registry.verify().ok


def test_rm_at_zero_removes_nothing(cli, registry, two_versions):
    before = snapshot(registry.root)
    assert_refused(cli("rm", "stories@0"), "has no version 0", before, registry)


def test_a_failed_rm_changes_nothing(cli, registry, two_versions):
    _, two = two_versions
    registry.alias("stories@2", "prod")
    shard = registry.catalog / "sha" / f"{two.sha256[:2]}.json"
    shard.write_text(shard.read_text()[:20])
    before = snapshot(registry.root)
    assert_refused(cli("rm", "stories@prod"), "is damaged", before, registry)


def test_a_bad_row_in_bases_json_is_named(cli, registry, two_versions):
    _edit_tables(registry.catalog / "bases.json", lambda d: d["_default"]["1"].pop("sha256"))
    before = snapshot(registry.root)
    assert_refused(cli("base", "list"), "does not match schema 'base_model'", before, registry)


def test_reading_a_registry_that_does_not_exist_is_an_error(cli, tmp_path):
    code, _, err = cli("list", registry=tmp_path / "typo")
    assert code == 1 and err.startswith("error: no registry at") and "adapterhub init" in err
    assert not (tmp_path / "typo").exists()


def test_catalogue_numbers_are_standard_json(cli, registry, two_versions):
    path = registry.catalog / "adapters" / "stories.json"
    path.write_text(path.read_text().replace('"scale":20.0', '"scale":NaN'))
    before = snapshot(registry.root)
    assert_refused(cli("show", "stories@1"), "is damaged: non-standard number NaN", before, registry)


def test_deeply_nested_catalogue_file_is_one_line(cli, registry, two_versions):
    path = registry.catalog / "adapters" / "stories.json"
    path.write_text("[" * 100000 + "]" * 100000)
    before = snapshot(registry.root)
    assert_refused(cli("show", "stories"), "is damaged: nesting too deep", before, registry)


def _journal(registry, **row):
    from adapterhub.store import open_db

    open_db(registry.catalog / "staging.json").insert(row)


def test_repair_never_deletes_a_folder_a_forged_journal_row_names(cli, registry, two_versions, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    _journal(registry, path=str(victim), out=str(tmp_path / "fused"), purpose="fuse", pid=999999,
             host=os.uname().nodename, started_at="2026-01-01T00:00:00Z")
    code, out, _ = cli("verify")
    assert code == 1 and "is not the staging folder of an output outside the registry" in out
    before = snapshot(registry.root)
    assert_refused(cli("verify", "--repair"), "which is not the staging folder", before, registry)
    assert (victim / "precious.txt").read_text() == "mine"


def test_a_journal_row_of_the_wrong_shape_is_a_problem_not_a_crash(cli, registry, two_versions, tmp_path):
    _journal(registry, path=str(tmp_path / ".x.fuse-1.tmp"), out=str(tmp_path / "x"), purpose="fuse")
    code, out, err = cli("verify")
    assert code == 1 and "does not match schema 'staging'" in out and "unexpected" not in err


def test_repair_keeps_what_a_live_process_is_writing_and_removes_stray_files(cli, registry, two_versions, tmp_path):
    live = registry.objects.root / "tmp" / f".blob.{os.getpid()}.abcd1234.tmp"
    live.parent.mkdir(exist_ok=True)
    live.write_bytes(b"being written")
    # A staging folder of this (live) process: its fuse may have stored a restore blob not yet in the catalogue.
    out = tmp_path / "fused"
    from adapterhub.files import staging_path
    staging_path(out, "fuse", os.getpid()).mkdir()
    _journal(registry, path=str(staging_path(out, "fuse", os.getpid())), out=str(out), purpose="fuse", pid=os.getpid(),
             host=os.uname().nodename, started_at="2026-01-01T00:00:00Z")
    stray_src = tmp_path / "restore.bin"
    stray_src.write_bytes(b"a restore blob of the running fuse")
    pending, _ = registry.objects.put_file(stray_src)
    (registry.objects.root / pending[:2] / "README").write_text("put here by hand")
    code, out_text, _ = cli("verify")
    assert code == 0 and "1 fuse/unfuse/export running now" in out_text and "1 stray file(s)" in out_text
    code, out_text, _ = cli("--json", "verify", "--repair")
    removed = json.loads(out_text)["repaired"]["removed"]
    assert code == 0 and removed == {"stray files": [str(registry.objects.root / pending[:2] / "README")]}
    assert live.exists() and registry.objects.has(pending) and staging_path(out, "fuse", os.getpid()).exists()


def test_verify_checks_recorded_evaluations(cli, registry, two_versions):
    _edit_tables(registry.catalog / "adapters" / "stories.json",
                 lambda d: d.setdefault("evals", {}).update({"1": {"metric": "test_loss", "value": "low"}}))
    code, out, _ = cli("verify")
    assert code == 1 and "does not match schema 'evaluation'" in out


@pytest.mark.parametrize("edit, problem", [
    (lambda text: text.replace('"scale":20.0', '"scale":1e999'), "overflows to infinity"),
    (lambda text: text.replace('"tags":', '"deep":' + "[" * 70 + "]" * 70 + ',"tags":', 1), "nested more than 64 levels"),
])
def test_verify_screens_catalogue_files_that_commands_read_unscreened(cli, registry, two_versions, edit, problem):
    """Commands parse the catalogue (this program's output) without the overflow and depth screens; verify
    applies them, so a hand edit only they catch is still reported, once."""
    path = registry.catalog / "adapters" / "stories.json"
    text = path.read_text()
    assert edit(text) != text
    path.write_text(edit(text))
    code, out, err = cli("show", "stories@1")
    assert code == 0, err
    code, out, err = cli("verify")
    assert code == 1 and out.count(f"{path} is damaged: ") == 1 and problem in out
