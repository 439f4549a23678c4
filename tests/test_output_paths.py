"""Every path a user names for output (export DIR, fuse --out, unfuse --out, card --out) under one rule:
never in the registry, never in or over a folder the command reads, never over something that exists without
--force, and --force lifts only the last."""

import json
import shutil

import pytest

from tests.conftest import assert_refused, snapshot

INSIDE_REGISTRY = "is inside the registry"
READS = "which this command reads or the registry records"


@pytest.fixture
def world(cli, registry, tmp_path, tiny_model, lora_adapter):
    """A registered adapter on a private copy of the tiny model, fused once."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert cli("import", lora_adapter, "--name", "stories", "--base", model)[0] == 0
    fused = tmp_path / "fused"
    code, _, err = cli("fuse", "stories", "--base", model, "--out", fused)
    assert code == 0, err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("someone's work")
    existing = tmp_path / "existing.md"
    existing.write_text("someone's card")
    return {"tmp": tmp_path, "registry": registry.root, "model": model, "fused": fused, "occupied": occupied,
            "existing": existing}


def command(name, w, out):
    """The command line that writes `out`; card --out reads the fused folder when it is the input at stake."""
    return {
        "export": ["export", "stories", out],
        "fuse": ["fuse", "stories", "--base", w["model"], "--out", out],
        "fuse --dry-run": ["fuse", "stories", "--base", w["model"], "--out", out, "--dry-run"],
        "unfuse": ["unfuse", w["fused"], "--out", out],
        "card": ["card", w["fused"] if w["fused"] in out.parents else "stories", "--out", out],
    }[name]


def refusals(name, w):
    """(what, out, message, lifted by --force) for one command."""
    registry, folder_cmd = w["registry"], name != "card"
    cases = [
        ("inside the registry", registry / ("sub" if folder_cmd else "card.md"), INSIDE_REGISTRY, False),
        ("inside the object store", registry / "objects" / ("x" if folder_cmd else "x.md"), INSIDE_REGISTRY, False),
        ("the registry itself", registry, INSIDE_REGISTRY, False),
        ("onto the registry marker", registry / "registry.json", INSIDE_REGISTRY, False),
        ("a folder holding the registry", w["tmp"], " contains ", False),
    ]
    inputs = {"fuse": [w["model"]], "fuse --dry-run": [w["model"]], "unfuse": [w["fused"], w["model"]],
              "card": [w["fused"]], "export": []}[name]
    for folder in inputs:
        cases.append((f"inside input {folder.name}", folder / ("out" if folder_cmd else "card.md"), READS, False))
        if folder_cmd:
            cases.append((f"input {folder.name} itself", folder, READS, False))
    if folder_cmd:
        cases.append(("an existing non-empty folder", w["occupied"], "is not empty", True))
        cases.append(("an existing file", w["existing"], "exists and is a file", False))
    else:
        cases.append(("an existing file", w["existing"], "already exists", True))
        cases.append(("an existing folder", w["occupied"], "exists and is a folder", False))
    return cases


def staging_leftovers(w):
    return sorted(p.name for p in [*w["tmp"].rglob(".*.tmp"), *w["registry"].parent.glob(".*")] if p.name.endswith(".tmp"))


@pytest.mark.parametrize("name", ["export", "fuse", "fuse --dry-run", "unfuse", "card"])
def test_every_output_path_rule_refuses_and_writes_nothing(cli, registry, world, name):
    watched = {k: world[k] for k in ("model", "fused", "occupied")}
    for what, out, message, lifted in refusals(name, world):
        for force in ([False] if lifted else [False, True]):
            before = snapshot(registry.root)
            files_before = {k: snapshot(p) for k, p in watched.items()}
            existed = out.exists()
            result = cli(*command(name, world, out), *(["--force"] if force else []))
            try:
                assert_refused(result, message, before, registry)
            except AssertionError as e:
                raise AssertionError(f"{name} onto {what} (force={force}): {result}") from e
            assert {k: snapshot(p) for k, p in watched.items()} == files_before, (name, what)
            assert out.exists() == existed, (name, what)
            assert world["existing"].read_text() == "someone's card"
            assert not staging_leftovers(world), (name, what)


def test_force_replaces_an_occupied_export_folder_with_exactly_the_export(cli, registry, world, lora_adapter):
    out = world["occupied"]
    assert cli("export", "stories", out, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapterhub.json",
                                                      "adapters.safetensors"]
    assert (out / "adapters.safetensors").read_bytes() == (lora_adapter / "adapters.safetensors").read_bytes()
    assert json.loads((out / "adapterhub.json").read_text())["ref"] == "stories@1"
    assert not staging_leftovers(world) and registry.verify().ok


def test_force_replaces_an_occupied_fuse_and_unfuse_folder_with_a_correct_model(cli, registry, world):
    out = world["occupied"]
    code, _, err = cli("fuse", "stories", "--base", world["model"], "--out", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    for f in world["fused"].glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    back = world["tmp"] / "back"
    back.mkdir()
    (back / "old.safetensors").write_bytes(b"stale")
    code, out_text, err = cli("--json", "unfuse", out, "--out", back, "--force")
    assert code == 0 and json.loads(out_text)["exact"] is True, err
    assert sorted(p.name for p in back.glob("*.safetensors")) == sorted(p.name for p in world["model"].glob("*.safetensors"))
    for f in world["model"].glob("*.safetensors"):
        assert (back / f.name).read_bytes() == f.read_bytes()
    assert not staging_leftovers(world) and registry.verify().ok


def test_force_replaces_an_existing_card_file(cli, world):
    code, expected, _ = cli("card", "stories")
    assert code == 0
    assert cli("card", "stories", "--out", world["existing"], "--force")[0] == 0
    assert world["existing"].read_text() == expected


def test_library_calls_take_force_as_a_keyword(registry, world):
    from adapterhub.algebra.fuse import execute_fuse, plan_fuse
    from adapterhub.errors import ConflictError
    from adapterhub.export import export

    with pytest.raises(ConflictError, match="is not empty"):
        plan_fuse(registry, ["stories"], str(world["model"]), world["occupied"])
    plan = plan_fuse(registry, ["stories"], str(world["model"]), world["occupied"], force=True)
    assert execute_fuse(plan, registry)["path"] == str(world["occupied"].resolve())
    with pytest.raises(ConflictError, match=INSIDE_REGISTRY):
        export(registry, "stories", registry.root / "x", force=True)
