"""store.Catalogue on disk, without a model in sight: the operations the registry is built on."""

import json
from pathlib import Path

import pytest

from adapterhub.errors import ConflictError, CorruptRegistryError
from adapterhub.store import Catalogue


def _record(name: str, version: int, sha: str, base: str | None = "b" * 64) -> dict:
    return {"name": name, "version": version, "sha256": sha, "base": {"sha256": base} if base else None,
            "files": [{"name": "adapters.safetensors", "sha256": sha, "size": 1},
                      {"name": "adapter_config.json", "sha256": "c" * 64, "size": 1}]}


@pytest.fixture
def catalogue(tmp_path):
    return Catalogue(tmp_path / "catalog")


def test_versions_aliases_and_the_indexes(catalogue):
    one, two = _record("sql", 1, "1" * 64), _record("sql", 2, "2" * 64)
    catalogue.index([one, two])
    catalogue.add_versions("sql", [one, two])
    catalogue.set_alias("sql", "prod", 2)
    versions, aliases, removed = catalogue.entry("sql")
    assert [v["version"] for v in versions] == [1, 2] and aliases == {"prod": 2} and removed == {}
    assert catalogue.names() == ["sql"] and catalogue.names_on_base("b" * 64) == {"sql"}
    assert [r["version"] for r in catalogue.sha_rows("2" * 12, "adapters.safetensors")] == [2]
    with pytest.raises(ConflictError, match="already has or had version"):
        catalogue.add_versions("sql", [one])


def test_dropping_a_version_keeps_its_number_and_says_which_blobs_are_free(catalogue):
    one, two = _record("sql", 1, "1" * 64), _record("sql", 2, "2" * 64)
    catalogue.index([one, two])
    catalogue.add_versions("sql", [one, two])
    catalogue.set_alias("sql", "prod", 2)
    # The config blob is shared by both versions: only the weights of version 2 become free.
    assert catalogue.drop_version(two, "2026-01-01T00:00:00Z") == ["2" * 64]
    versions, aliases, removed = catalogue.entry("sql")
    assert [v["version"] for v in versions] == [1] and aliases == {} and removed[2]["sha256"] == "2" * 64
    with pytest.raises(ConflictError):
        catalogue.add_versions("sql", [two])  # a removed number is never given out again
    assert catalogue.drop_version(one, "2026-01-01T00:00:01Z") == ["1" * 64, "c" * 64]
    assert catalogue.names_on_base("b" * 64) == set()


def test_row_files_match_by_field_and_vanish_when_empty(catalogue):
    catalogue.insert("runs.json", {"id": "r1", "status": "running"})
    catalogue.upsert("runs.json", {"id": "r2", "status": "running"}, "id")
    catalogue.update("runs.json", {"status": "finished"}, id="r1")
    assert catalogue.find("runs.json", id="r1")["status"] == "finished" and catalogue.find("runs.json", id="nope") is None
    assert sorted(r["id"] for r in catalogue.rows("runs.json")) == ["r1", "r2"]
    catalogue.remove("runs.json", id="r1")
    catalogue.remove("runs.json", id="r2")
    assert not (catalogue.folder / "runs.json").exists()


@pytest.mark.parametrize("text", ['{"versions": []}', '{"versions": {"x": {}}}', '[]', '{"versions": {"1": 5}}',
                                  '{"versions": {"1": {"name": "sql"}}}', '{"removed": {"3": {"version": 3}}}'])
def test_valid_json_of_the_wrong_shape_is_damage_not_a_crash(catalogue, text):
    path = catalogue.adapter_path("sql")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(CorruptRegistryError, match="is damaged"):
        catalogue.entry("sql")


def test_a_name_never_becomes_a_path_outside_the_catalogue(catalogue, tmp_path):
    (tmp_path / "outside.json").write_text(json.dumps({"versions": {}}))
    assert catalogue.entry("../outside") == ([], {}, {}) and catalogue.entry("sql\n") == ([], {}, {})


class MemoryTables:
    """Catalogue files in a dict: the catalogue's logic without a filesystem, through the four calls it uses."""

    def __init__(self):
        self.files: dict[str, str] = {}

    def read(self, path):
        text = self.files.get(str(path))
        return json.loads(text) if text is not None else None

    def write(self, path, data):
        self.files[str(path)] = json.dumps(data)  # a copy, as a file is: later edits of `data` must not show

    def remove(self, path):
        self.files.pop(str(path), None)

    def stems(self, folder):
        prefix = f"{folder}/"
        return sorted(p[len(prefix):-5] for p in self.files if p.startswith(prefix) and "/" not in p[len(prefix):])


def test_the_catalogue_runs_the_same_on_memory_tables(tmp_path):
    memory = MemoryTables()
    catalogues = {"disk": Catalogue(tmp_path / "catalog"), "memory": Catalogue(Path("/nowhere/catalog"), memory)}
    seen = {}
    for where, catalogue in catalogues.items():
        catalogue.add_versions("alpha", [_record("alpha", 1, "1" * 64), _record("alpha", 2, "2" * 64)])
        catalogue.add_versions("beta", [_record("beta", 1, "1" * 64)])
        catalogue.index([_record("alpha", 1, "1" * 64), _record("alpha", 2, "2" * 64), _record("beta", 1, "1" * 64)])
        catalogue.set_alias("alpha", "prod", 1)
        freed = catalogue.drop_version(_record("alpha", 2, "2" * 64), "2026-01-01T00:00:00Z")
        catalogue.insert("bases.json", {"name": "b", "sha256": "b" * 64})
        catalogue.remove("bases.json", name="b")
        seen[where] = (catalogue.names(), catalogue.entry("alpha"), catalogue.names_on_base("b" * 64), freed,
                       catalogue.rows("bases.json"), sorted(r["name"] for r in catalogue.sha_rows("1111", "adapters.safetensors")))
    assert seen["memory"] == seen["disk"]
    assert seen["disk"][0] == ["alpha", "beta"] and seen["disk"][1][1] == {"prod": 1} and 2 in seen["disk"][1][2]
    assert not (Path("/nowhere")).exists() and all(p.startswith("/nowhere/catalog/") for p in memory.files)
    assert "/nowhere/catalog/bases.json" not in memory.files  # emptied row file removed, as on disk
