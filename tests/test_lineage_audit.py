"""lineage and audit on a real chain: imported, chained, stacked, fused, extracted."""

import json
import re
import shutil
import subprocess

import pytest

from adapterhub.tinymodel import write_adapter, write_dataset
from tests.conftest import assert_refused, snapshot


@pytest.fixture
def chain(cli, registry, tmp_path, tiny_model):
    """chain@1 (dataset A) -> chain@2 (resumed-from, dataset B) + other@1 -> both@1 (stacked) -> fused -> back@1."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data_a = write_dataset(tmp_path / "data-a", seed=1)
    data_b = write_dataset(tmp_path / "data-b", seed=2, style="colours")
    steps = [
        ("import", write_adapter(model, tmp_path / "c1", seed=1), "--name", "chain", "--base", model, "--dataset", data_a),
        ("import", write_adapter(model, tmp_path / "c2", seed=2), "--name", "chain", "--base", model, "--dataset", data_b,
         "--parent", "chain@1"),
        ("import", write_adapter(model, tmp_path / "o1", seed=3), "--name", "other", "--base", model),
        ("stack", "chain@2", "other@1", "--name", "both"),
        ("fuse", "both", "--base", model, "--out", tmp_path / "fused"),
        ("extract", "--base", model, "--fused", tmp_path / "fused", "--rank", "8", "--name", "back"),
    ]
    for step in steps:
        code, _, err = cli(*step)
        assert code == 0, (step, err)
    sha = {v.ref: v.sha256 for v in registry.list()}
    fused_sha = json.loads((tmp_path / "fused" / "adapterhub.json").read_text())["sha256"]
    return {"model": model, "data_a": data_a, "data_b": data_b, "fused": tmp_path / "fused", "sha": sha,
            "fused_sha": fused_sha, "base_sha": registry.bases()[0]["sha256"],
            "dataset_sha": {d["name"]: d["sha256"] for d in registry.datasets()}}


def expected_edges(chain) -> set[tuple[str, str, str]]:
    """(child, relation, parent sha256) of every edge back from back@1."""
    s, base = chain["sha"], chain["base_sha"]
    data = chain["dataset_sha"]
    return {
        ("back@1", "extracted-from", chain["fused_sha"]), ("back@1", "base", base),
        (str(chain["fused"].resolve()), "fused-from", s["both@1"]), (str(chain["fused"].resolve()), "base", base),
        ("both@1", "stacked-from", s["chain@2"]), ("both@1", "stacked-from", s["other@1"]), ("both@1", "base", base),
        ("chain@2", "resumed-from", s["chain@1"]), ("chain@2", "base", base), ("chain@2", "dataset", data["data-b"]),
        ("chain@1", "base", base), ("chain@1", "dataset", data["data-a"]),
        ("other@1", "base", base),
    }


def test_json_lineage_has_every_ancestor_with_relation_and_hash(cli, chain):
    code, out, err = cli("lineage", "back", "--format", "json")
    assert code == 0, err
    graph = json.loads(out)
    nodes = {n["id"]: n for n in graph["nodes"]}
    edges = {(nodes[e["child"]]["label"], e["relation"], nodes[e["parent"]]["sha256"]) for e in graph["edges"]}
    assert edges == expected_edges(chain)
    assert all(n["found"] for n in nodes.values())
    assert nodes[graph["root"]]["sha256"] == chain["sha"]["back@1"]


def test_tree_names_every_edge_with_its_hash(cli, chain):
    code, out, _ = cli("lineage", "back")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("back@1 (lora, rank 8)") and chain["sha"]["back@1"][:12] in lines[0]
    for child, relation, parent_sha in expected_edges(chain):
        assert any(f"{relation}: " in line and parent_sha[:12] in line for line in lines), (child, relation)
    # chain@2 and other@1 each lead to the base again, but every subtree is drawn once.
    assert sum("resumed-from: chain@1" in line for line in lines) == 1


def test_dot_is_accepted_by_a_dot_parser_and_has_every_edge(cli, chain, tmp_path):
    import pydot

    code, out, _ = cli("lineage", "back", "--format", "dot")
    assert code == 0
    (graph,) = pydot.graph_from_dot_data(out)
    labels = {n.get_name().strip('"'): n.get("label").strip('"') for n in graph.get_nodes() if n.get("label")}
    edges = {(labels[e.get_source().strip('"')].split("\\n")[1], e.get("label").strip('"'),
              labels[e.get_destination().strip('"')].split("\\n")[2].removeprefix("sha256 ")) for e in graph.get_edges()}
    assert edges == {(c, r, p[:12]) for c, r, p in expected_edges(chain)}
    if shutil.which("dot"):  # graphviz itself, where installed
        svg = subprocess.run(["dot", "-Tsvg"], input=out, capture_output=True, text=True, check=True).stdout
        assert svg.count('class="edge"') == len(edges)


MERMAID_LINE = re.compile(
    r'^  (?:n\d+(?:\(\["[^"\n]*"\]\)|\[\("[^"\n]*"\)\]|\[/"[^"\n]*"/\]|\[\["[^"\n]*"\]\]|>"[^"\n]*"\]|\{\{"[^"\n]*"\}\})'
    r'|n\d+ -->\|[a-z-]+\| n\d+'
    r'|classDef missing [^\n]+|class n\d+(?:,n\d+)* missing)$')


def test_mermaid_is_a_valid_flowchart_with_every_edge(cli, chain):
    code, out, _ = cli("lineage", "back", "--format", "mermaid")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "flowchart BT"
    bad = [line for line in lines[1:] if not MERMAID_LINE.match(line)]
    assert not bad, bad
    labels = {m.group(1): m.group(2) for m in re.finditer(r'^  (n\d+)\W+"([^"]*)"', out, re.M)}
    edges = {(labels[a].split("<br/>")[1], rel, labels[b].split("<br/>")[2].removeprefix("sha256 "))
             for a, rel, b in re.findall(r"^  (n\d+) -->\|([a-z-]+)\| (n\d+)$", out, re.M)}
    assert edges == {(c, r, p[:12]) for c, r, p in expected_edges(chain)}


def test_lineage_of_the_fused_folder_holds_only_its_ancestors(cli, chain):
    code, out, _ = cli("--json", "lineage", chain["fused"])
    graph = json.loads(out)
    assert code == 0 and {n["label"] for n in graph["nodes"]} >= {"both@1", "chain@1", "chain@2", "other@1"}
    assert "back@1" not in {n["label"] for n in graph["nodes"]}  # ancestors only


def test_dataset_descendants_are_transitive(cli, chain):
    code, out, _ = cli("--json", "lineage", "--dataset", chain["data_a"], "--descendants")
    assert code == 0
    found = {n["label"] for n in json.loads(out)["nodes"]}
    assert found == {"data-a", "chain@1", "chain@2", "both@1", str(chain["fused"].resolve()), "back@1"}
    code, out, _ = cli("--json", "lineage", "--dataset", chain["dataset_sha"]["data-b"][:16], "--descendants")
    assert {n["label"] for n in json.loads(out)["nodes"]} == {"data-b", "chain@2", "both@1", str(chain["fused"].resolve()),
                                                             "back@1"}
    code, out, _ = cli("--json", "lineage", "other", "--descendants")
    assert {n["label"] for n in json.loads(out)["nodes"]} == {"other@1", "both@1", str(chain["fused"].resolve()), "back@1"}


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def test_audit_ok_then_names_exactly_the_changed_node(cli, chain, registry):
    code, out, err = cli("--json", "audit", "back")
    report = json.loads(out)
    assert code == 0 and report["ok"], err
    assert report["counts"]["ok"] == len(report["nodes"]) == 9  # 5 versions, fused, base, 2 datasets
    targets = {
        "base": (next(chain["model"].glob("*.safetensors")), chain["base_sha"], "model.safetensors"),
        "dataset": (chain["data_b"] / "train.jsonl", chain["dataset_sha"]["data-b"], "train.jsonl"),
        "blob": (registry.objects.path(chain["sha"]["chain@1"]), chain["sha"]["chain@1"], "adapters.safetensors"),
        "fused": (next(chain["fused"].glob("*.safetensors")), chain["fused_sha"], "model.safetensors"),
    }
    for what, (path, node_sha, file_name) in targets.items():
        original = path.read_bytes()
        path.chmod(0o644)
        flip_one_byte(path)
        before = snapshot(registry.root)
        code, out, err = cli("--json", "audit", "back")
        changed = [n for n in json.loads(out)["nodes"] if n["status"] == "changed"]
        assert code == 1 and [n["sha256"] for n in changed] == [node_sha], what
        assert changed[0]["details"][0].startswith(f"{file_name} changed") and "error: 1 node(s)" in err
        assert snapshot(registry.root) == before
        path.write_bytes(original)
    assert cli("audit", "back")[0] == 0


def test_audit_reports_a_moved_dataset_as_missing_with_where_it_was(cli, chain, tmp_path):
    chain["data_a"].rename(tmp_path / "moved")
    code, out, _ = cli("--json", "audit", "chain@1")
    node = next(n for n in json.loads(out)["nodes"] if n["kind"] == "dataset")
    assert code == 0 and node["status"] == "missing"
    assert f"last seen at {chain['data_a'].resolve()}" in node["details"][0]


def test_audit_catches_an_edited_adapterhub_json(cli, chain):
    record_file = chain["fused"] / "adapterhub.json"
    record = json.loads(record_file.read_text())
    record["adapters"][0]["ref"] = "someone-else@1"
    record_file.write_text(json.dumps(record))
    code, out, _ = cli("--json", "audit", chain["fused"])
    fused = next(n for n in json.loads(out)["nodes"] if n["kind"] == "fused")
    assert code == 1 and fused["status"] == "changed" and "'adapters'" in " ".join(fused["details"])


def test_lineage_refusals(cli, tmp_path, chain):
    assert cli("lineage", "nope")[0] == 1
    assert cli("lineage", tmp_path)[0] == 1  # a folder adapterhub did not write
    assert cli("lineage", "--dataset", chain["data_a"])[0] == 2  # a dataset has no ancestors
    code, _, err = cli("lineage", "--dataset", "zzzz", "--descendants")
    assert code == 1 and err.startswith("error: no dataset(s) match 'zzzz'")


def forged_fused_folder(tmp_path, files):
    """A folder whose adapterhub.json has the shape fuse writes, naming `files` (name -> bytes they should hash to)."""
    import hashlib

    folder = tmp_path / "forged"
    folder.mkdir()
    hexes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    record = {"sha256": hexes[0], "base": {"name": "tiny-llama", "sha256": hexes[1], "structure_sha256": hexes[2],
                                           "model_type": "llama"},
              "adapters": [{"ref": "ghost@1", "sha256": hexes[3]}], "created_at": "2024-01-01T00:00:00Z",
              "files": [{"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                        for name, data in files.items()]}
    (folder / "adapterhub.json").write_text(json.dumps(record))
    return folder, record


@pytest.mark.parametrize("where", ["../secret.txt", "absolute", "sub/../../secret.txt", "./secret.txt"])
def test_an_untrusted_record_never_leads_a_reader_outside_its_folder(cli, registry, tmp_path, where):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours to hash")
    name = str(secret) if where == "absolute" else where
    folder, _ = forged_fused_folder(tmp_path, {name: secret.read_bytes()})
    before = snapshot(registry.root)
    for command in (["audit", folder], ["lineage", folder], ["card", folder]):
        # The schema's file-name pattern refuses it first; lineage.safe_member stands behind it for catalogue rows.
        assert_refused(cli(*command), "does not match schema 'fused_model'",
                       before, registry)


def test_a_forged_record_of_the_wrong_shape_is_one_error_line(cli, registry, tmp_path):
    folder, record = forged_fused_folder(tmp_path, {})
    before = snapshot(registry.root)
    for damage in ({"files": "model.safetensors"}, {"files": [7]}, {"adapters": [{"ref": ["x"], "sha256": "0" * 64}]},
                   {"sha256": ["not", "a", "hash"]}):
        (folder / "adapterhub.json").write_text(json.dumps({**record, **damage}))
        for command in (["audit", folder], ["lineage", folder], ["card", folder]):
            code, out, err = cli(*command)
            assert code == 1 and err.startswith("error: ") and "unexpected" not in err, (damage, command, err)
            assert len(err.strip().splitlines()) == 1 and snapshot(registry.root) == before


def test_audit_reports_an_unsafe_name_in_a_catalogue_record_without_reading_it(cli, registry, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours to hash")
    folder, record = forged_fused_folder(tmp_path, {"../secret.txt": secret.read_bytes()})
    from adapterhub.store import open_db

    # As if the catalogue itself were edited: register_fused would refuse the name (schema), so write the row by hand.
    open_db(registry.catalog / "fused.json").insert({**record, "path": str(folder)})
    before = snapshot(registry.root)
    code, out, err = cli("--json", "audit", folder)
    fused = next(n for n in json.loads(out)["nodes"] if n["kind"] == "fused")
    assert code == 1 and fused["status"] == "changed" and "error: 1 node(s)" in err and snapshot(registry.root) == before
    assert fused["details"][0].startswith("unsafe: the fused model record names the file '../secret.txt'")

    from adapterhub.audit import _Checker

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "train.jsonl").write_text("{}")
    ok = _Checker(registry).files(data, [{"name": "sub/train.jsonl", "sha256": "0" * 64, "size": 2}], "dataset", nested=True)
    unsafe = _Checker(registry).files(data, [{"name": "../secret.txt", "sha256": "0" * 64, "size": 2}], "dataset", nested=True)
    assert ok[0] == "changed" and ok[1][0].startswith("sub/train.jsonl changed")  # nested names are read
    assert unsafe == ("changed", ["unsafe: the dataset record names the file '../secret.txt', which is not a relative "
                                  "path inside its folder; not read"])


def test_an_export_walked_in_another_registry_is_checked_before_its_parents_are_followed(
        cli, registry, tmp_path, tiny_model, lora_adapter):
    from adapterhub.registry import Registry

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    assert cli("export", "stories", tmp_path / "exported")[0] == 0
    other = Registry(tmp_path / "other")
    other.init()
    code, out, err = cli("--json", "lineage", tmp_path / "exported", registry=other.root)
    root = json.loads(out)["nodes"][0]
    assert code == 0 and root["label"] == "stories@1" and not root["found"], err
    record_file = tmp_path / "exported" / "adapterhub.json"
    record = json.loads(record_file.read_text())
    before = snapshot(other.root)
    for damage in ({"parents": [{"ref": "x", "sha256": "0" * 64, "relation": "stolen-from"}]}, {"parents": "x"},
                   {"files": [{"name": "../../etc/passwd", "sha256": "0" * 64, "size": 1}]}):
        record_file.write_text(json.dumps({**record, **damage}))
        code, _, err = cli("lineage", tmp_path / "exported", registry=other.root)
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "unexpected" not in err, err
        assert snapshot(other.root) == before
