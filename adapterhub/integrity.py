"""`verify` and `verify --repair`: the registry checked against its files and its own invariants.

A problem fails verification: something a command would trip over or, worse, use
wrongly (a corrupt blob, a record whose sha256 is not its weights, two records with
one version number, a lineage cycle, a damaged catalogue file). A note is a harmless
leftover of an interrupted write (an orphan blob, a temporary file, a staging folder
of a killed fuse, an index row without its record): `repair` removes those, under the
registry lock, and nothing else; problems need a person.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterHubError, CorruptRegistryError, SchemaError
from .safetensors_io import sha256_file
from .schemas import validate
from .outputs import STAGING
from .records import VERSION_RELATIONS, weights_claim_problem
from .runs import process_alive
from .files import read_json, writer_pid
from .store import open_db, read_tables

INDEX_SCHEMAS = {"bases.json": "base_model", "datasets.json": "dataset", "fused.json": "fused_model",
                 "runs.json": "training_run", "evals.json": "evaluation"}


@dataclass
class VerifyReport:
    """Problems fail verification; notes are harmless leftovers of interrupted writes."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "checked": self.checked}


@dataclass
class RepairReport:
    """What `repair` removed, by kind."""

    removed: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"removed": self.removed}


@dataclass
class _Catalogue:
    """What one pass over the catalogue found, shared by verify and repair."""

    records: dict[str, dict] = field(default_factory=dict)  # ref -> record
    referenced: set[str] = field(default_factory=set)
    stale_rows: dict[Path, list[int]] = field(default_factory=dict)  # sha shard -> doc ids without a record


def verify(registry) -> VerifyReport:
    report = VerifyReport()
    try:
        registry._marker(full=True)
        registry.policy
    except AdapterHubError as e:
        report.problems.append(e.message)
        return report
    _screen_catalogue(registry, report)
    found = _scan_versions(registry, report)
    bases = {r["sha256"] for r in _index_rows(registry, "bases.json", report)}
    datasets = {r["sha256"] for r in _index_rows(registry, "datasets.json", report)}
    _index_rows(registry, "runs.json", report)
    _index_rows(registry, "evals.json", report)
    for ref, record in found.records.items():
        for f in record["files"]:
            found.referenced.add(f["sha256"])
            problem = _blob_problem(registry, f["sha256"])
            if problem:
                report.problems.append(f"{ref}: file {f['name']} {problem}")
        if record["base"] and record["base"]["sha256"] not in bases:
            report.problems.append(f"{ref}: base {record['base']['name']} is not registered")
        if record["dataset"] and record["dataset"]["sha256"] not in datasets:
            report.problems.append(f"{ref}: dataset {record['dataset']['name']} is not registered")
        for p in record["parents"]:
            if p["ref"] == ref:
                report.problems.append(f"{ref}: names itself as its parent")
            elif p["relation"] in VERSION_RELATIONS and (found.records.get(p["ref"]) or {}).get("sha256") != p["sha256"]:
                report.problems.append(f"{ref}: parent {p['ref']} ({p['sha256'][:12]}) is not in the registry")
    report.problems += _cycles(found.records)
    fused = _index_rows(registry, "fused.json", report)
    for record in fused:
        where = f"fused model {record.get('path', record['sha256'][:12])}"
        if record["base"]["sha256"] not in bases:
            report.problems.append(f"{where}: base {record['base']['name']} is not registered")
        if record.get("restore"):
            found.referenced.add(record["restore"]["sha256"])
            problem = _blob_problem(registry, record["restore"]["sha256"])
            if problem:
                report.problems.append(f"{where}: restore data {problem}")
    _scan_indexes(registry, found, report)
    _leftover_notes(registry, found, report)
    report.problems = list(dict.fromkeys(report.problems))  # a file the screen and a reader both refused: once
    report.checked = {"versions": len(found.records), "blobs": len(found.referenced), "bases": len(bases),
                      "datasets": len(datasets), "fused": len(fused)}
    return report


def repair(registry) -> RepairReport:
    """Remove the leftovers verify notes. Called under the registry lock; refuses while the catalogue is
    damaged, because then "unreferenced" cannot be trusted. What a live process is still writing is kept."""
    report = VerifyReport()
    found = _scan_versions(registry, report)
    fused = _index_rows(registry, "fused.json", report)
    _scan_indexes(registry, found, report)
    if report.problems:
        raise CorruptRegistryError(f"the catalogue itself is damaged ({report.problems[0]}), so leftovers cannot be told apart",
                                   hint="fix what 'adapterhub verify' lists first, then run 'adapterhub verify --repair'")
    live, killed = registry.staging_rows()
    for record in found.records.values():
        found.referenced.update(f["sha256"] for f in record["files"])
    found.referenced.update(r["restore"]["sha256"] for r in fused if r.get("restore"))
    removed: dict[str, list[str]] = {}
    # A running fuse stores its restore blob before its row: while one runs, no blob is provably an orphan.
    for sha in [] if live else [s for s in registry.objects.all() if s not in found.referenced]:
        registry.objects.remove(sha)
        removed.setdefault("orphan blobs", []).append(sha)
    for path in _temporary_files(registry):
        if not _written_by_live_process(path):
            path.unlink(missing_ok=True)
            removed.setdefault("temporary files", []).append(str(path))
    for path in registry.objects.strays():
        path.unlink()
        removed.setdefault("stray files", []).append(str(path))
    for shard, doc_ids in found.stale_rows.items():
        open_db(shard).remove(doc_ids=doc_ids)
        removed.setdefault("stale index rows", []).extend(f"{shard.name}#{i}" for i in doc_ids)
    for row in killed:
        shutil.rmtree(row["path"], ignore_errors=True)
        registry.catalogue.remove(STAGING, doc_ids=[row["doc_id"]])
        removed.setdefault("staging folders", []).append(row["path"])
    return RepairReport(removed)


def _written_by_live_process(path: Path) -> bool:
    pid = writer_pid(path)
    import socket

    return pid is not None and process_alive(pid, socket.gethostname())


def _scan_versions(registry, report: VerifyReport) -> _Catalogue:
    """Every adapter catalogue file: parsed, each record validated and checked against where it is filed."""
    found = _Catalogue()
    for name in registry._names():
        path = registry.catalog / "adapters" / f"{name}.json"
        try:
            tables = read_tables(path)
        except CorruptRegistryError as e:
            report.problems.append(e.message)
            continue
        removed = {d.get("version") for d in tables.get("removed", {}).values()}
        for doc_id, row in sorted(tables.get("evals", {}).items()):
            try:
                validate(row, "evaluation", what=f"{path.name} evaluation {doc_id}")
            except SchemaError as e:
                report.problems.append(e.message)
        numbers: dict[int, int] = {}
        for doc_id, record in sorted(tables.get("versions", {}).items()):
            where = f"record {name}@{record.get('version')}"
            try:
                validate(record, "adapter_version", what=where)
            except SchemaError as e:
                report.problems.append(e.message)
                continue
            ref = f"{name}@{record['version']}"
            if record["name"] != name:
                report.problems.append(f"{where} says its name is '{record['name']}' but is filed under '{name}'")
                continue
            if record["version"] != doc_id:
                report.problems.append(f"{where} is stored as version {doc_id} of {path.name}")
            if record["version"] in numbers:
                report.problems.append(f"{name} has two records with version {record['version']}")
                continue
            if record["version"] in removed:
                report.problems.append(f"{ref} is recorded both as present and as removed")
            claim = weights_claim_problem(record)
            if claim:
                report.problems.append(f"{claim}; restore {path} from a backup or remove {ref}")
            numbers[record["version"]] = doc_id
            found.records[ref] = record
        present = set(numbers)
        aliases = {d.get("alias"): d.get("version") for d in tables.get("aliases", {}).values()}
        report.problems += [f"alias {name}@{a} points at missing version {v}" for a, v in aliases.items() if v not in present]
    return found


def _screen_catalogue(registry, report: VerifyReport) -> None:
    """Every catalogue file as strict as a file from outside: commands read them without the overflow and
    depth screens (they are this program's output), so a hand edit that only those catch is found here."""
    for path in sorted(registry.catalog.rglob("*.json")):
        if path.name.startswith("."):
            continue  # an interrupted write's temporary file, noted with the other leftovers
        try:
            read_json(path)
        except AdapterHubError as e:
            report.problems.append(e.message)


def _index_rows(registry, filename: str, report: VerifyReport) -> list[dict]:
    good = []
    for row in map(dict, _readable_rows(registry.catalog / filename, report)):
        try:
            validate(row, INDEX_SCHEMAS[filename], what=f"{filename} row {row.get('name', row.get('id'))!r}")
            good.append(row)
        except SchemaError as e:
            report.problems.append(e.message)
    return good


def _scan_indexes(registry, found: _Catalogue, report: VerifyReport) -> None:
    """The sha and by-base shards parse, and each row points at a record (or is a harmless leftover)."""
    for shard in sorted((registry.catalog / "sha").glob("*.json")):
        stale = [r.doc_id for r in _readable_rows(shard, report)
                 if f"{r.get('name')}@{r.get('version')}" not in found.records]
        if stale:
            found.stale_rows[shard] = stale
    for shard in sorted((registry.catalog / "by-base").glob("*.json")):
        if any(not isinstance(r.get("name"), str) for r in _readable_rows(shard, report)):
            report.problems.append(f"{shard} has a row without a name; restore it or remove it and re-import")


def _readable_rows(path: Path, report: VerifyReport) -> list:
    """A catalogue file's rows; a damaged file is a problem, reported once, and reads as empty."""
    try:
        return open_db(path).all()
    except CorruptRegistryError as e:
        report.problems.append(e.message)
        return []


def _leftover_notes(registry, found: _Catalogue, report: VerifyReport) -> None:
    stale = sum(len(ids) for ids in found.stale_rows.values())
    orphans = [sha for sha in registry.objects.all() if sha not in found.referenced]
    leftovers = [p for p in _temporary_files(registry) if not _written_by_live_process(p)]
    strays = registry.objects.strays()
    try:
        live, staging = registry.staging_rows()
    except CorruptRegistryError as e:
        report.problems.append(e.message)
        live, staging = [], []
    if live:
        report.notes.append(f"{len(live)} fuse/unfuse/export running now (pid {', '.join(str(r['pid']) for r in live)})")
    if strays:
        report.notes.append(f"{len(strays)} stray file(s) in objects/ that are not blobs: {', '.join(p.name for p in strays[:3])}")
    if stale:
        report.notes.append(f"{stale} index row(s) left by an interrupted write; they are ignored")
    if orphans:
        report.notes.append(f"{len(orphans)} unreferenced blob(s) in objects/ left by an interrupted write")
    if leftovers:
        report.notes.append(f"{len(leftovers)} temporary file(s) left by an interrupted write")
    for row in staging:
        if Path(row["path"]).exists():
            size = sum(p.stat().st_size for p in Path(row["path"]).rglob("*") if p.is_file())
            report.notes.append(f"staging folder of a killed {row['purpose']} ({size:,} bytes): {row['path']}")
    if stale or orphans or leftovers or staging or strays:
        report.notes.append("'adapterhub verify --repair' removes these")


def _temporary_files(registry) -> list[Path]:
    return registry.objects.leftovers() + sorted(registry.catalog.rglob("*.tmp"))


def _blob_problem(registry, sha256: str) -> str | None:
    blob = registry.objects.path(sha256)
    if not blob.is_file():
        return f"is missing from the object store ({blob})"
    if sha256_file(blob) != sha256:
        return "is corrupt (its sha256 no longer matches); re-import the original to repair it"
    return None


def _cycles(records: dict[str, dict]) -> list[str]:
    """Lineage cycles among versions, each named once by the refs on it."""
    edges = {ref: [p["ref"] for p in r["parents"] if p["ref"] in records and p["ref"] != ref] for ref, r in records.items()}
    return ["lineage cycle: " + " -> ".join(loop) for loop in find_cycles(edges)]


def find_cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Each cycle a depth-first walk meets, as the path that closes it (a -> b -> a); iterative, so deep graphs are fine."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [(start, iter(sorted(edges[start])))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                cycles.append(path[path.index(child):] + [child])
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges.get(child, ())))))
    return cycles
