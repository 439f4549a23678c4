"""The only module that imports TinyDB: catalogue files and the registry lock (blobs are objects.py's).

The catalogue is many small TinyDB files rather than one big one, so the cost
of a read or write follows the size of what it touches, not of the registry.
Every file is replaced by an atomic rename (files.atomic_write).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tinydb import Query, TinyDB
from tinydb.storages import Storage
from tinydb.table import Document

from .errors import AdapterHubError, ConflictError, CorruptRegistryError
from .files import atomic_write, dump_json, read_json

ENV_LOCK_TIMEOUT = "ADAPTERHUB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 300.0


def lock_timeout_s() -> float:
    """Seconds to wait for the registry lock; read when a lock is taken, so a bad value is one clear error."""
    raw = os.environ.get(ENV_LOCK_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")):
        raise AdapterHubError(f"{ENV_LOCK_TIMEOUT}={raw!r} is not a number of seconds",
                              hint="set it to a number of seconds such as 300, or unset it")
    return value


class DiskTables:
    """Where catalogue files live: on disk, each read whole and replaced by an atomic rename.

    The catalogue reaches its files only through these four calls, so its logic runs as well on
    any other implementation (the unit tests keep them in a dict).
    """

    def read(self, path: Path) -> object:
        """The file's JSON, None when there is no file. Catalogue files are this program's output: parsed
        without the text screens on overflow and depth, which `verify` applies to each."""
        return read_json(path, own_output=True)

    def write(self, path: Path, data: dict) -> None:
        # json.dumps, not json.dump: only the one-shot path uses the C encoder.
        text = dump_json(data, path, separators=(",", ":"))
        with atomic_write(path, "w") as f:
            f.write(text)

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def stems(self, folder: Path) -> list[str]:
        """The names (without .json) of the catalogue files in `folder`."""
        if not Path(folder).is_dir():
            return []
        return sorted(e.name[:-5] for e in os.scandir(folder) if e.name.endswith(".json") and not e.name.startswith("."))


DISK = DiskTables()


class TableStorage(Storage):
    """TinyDB storage over a catalogue file: never creates a file on read, replaces it whole on write.

    TinyDB's own JSONStorage rewrites the file in place, which a crash or a second
    process can leave truncated (tinydb issues #529, #537).
    """

    def __init__(self, path: Path, files: DiskTables = DISK):
        self.path, self.files = Path(path), files

    def read(self):
        data = self.files.read(self.path)
        if data is not None:
            _check_tables(data, self.path)
        return data

    def write(self, data) -> None:
        self.files.write(self.path, data)

    def close(self) -> None:
        pass


def _check_tables(data: object, path: Path) -> None:
    """TinyDB's layout, {table: {doc id: document}}: valid JSON of another shape must not reach TinyDB's internals."""
    ok = isinstance(data, dict) and all(
        isinstance(docs, dict) and all(isinstance(i, str) and i.isdigit() and isinstance(d, dict) for i, d in docs.items())
        for docs in data.values())
    if not ok:
        raise CorruptRegistryError(f"{path} is damaged: not a catalogue file of tables of numbered documents",
                                   hint="restore it from a backup or remove it; then run 'adapterhub verify'")


def open_db(path: Path, files: DiskTables = DISK) -> TinyDB:
    return TinyDB(path, files, storage=TableStorage)


def rewrite_tables(path: Path, change: Callable[[dict], None], files: DiskTables = DISK) -> None:
    """Change several tables of one catalogue file in a single atomic write: `change` edits the raw
    {table: {doc id: document}} data in place. A kill leaves the file wholly before or wholly after."""
    storage = TableStorage(path, files)
    data = storage.read() or {}
    change(data)
    storage.write(data)


def read_tables(path: Path, files: DiskTables = DISK) -> dict[str, dict[int, dict]]:
    """Every table of a TinyDB file from one read: table -> {doc_id: document}."""
    data = TableStorage(path, files).read() or {}
    return {table: {int(i): doc for i, doc in docs.items()} for table, docs in data.items()}


class RegistryLock:
    """One lock per registry for every write transaction; reentrant within a process."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        # Imported here: read-only commands never lock, and filelock costs start-up time.
        from filelock import FileLock, Timeout

        if self._lock is None:
            self._lock = FileLock(str(self.path), timeout=lock_timeout_s())
        try:
            with self._lock:
                yield
        except Timeout:
            raise AdapterHubError(
                f"the registry is locked by another process (waited {self._lock.timeout:.0f} s for {self._lock.lock_file})",
                hint=f"wait for the other adapterhub command to finish, or raise {ENV_LOCK_TIMEOUT}",
            ) from None


# What readers index records by; the full schema is checked on write and by verify, too slow for every list.
_ROW_KEYS = {"versions": {"name": str, "version": int, "sha256": str},
             "aliases": {"alias": str, "version": int},
             "removed": {"version": int, "sha256": str, "removed_at": str}}
_CATALOGUE_NAME = re.compile(r"[a-z][a-z0-9._-]*")
MODEL_EVALS = "evals.json"  # evaluations of bases and fused models; a version's live in its adapter file


def _check_shapes(path: Path, tables: dict) -> None:
    for table, docs in tables.items():
        keys = _ROW_KEYS.get(table)
        if not keys:
            continue
        names, kinds = list(keys), list(keys.values())
        for doc in docs.values():
            # type() is, not isinstance: a bool is not a version number. One comparison per row; `list` reads thousands.
            if [type(doc.get(k)) for k in names] != kinds:
                bad = [k for k, kind in keys.items() if type(doc.get(k)) is not kind]
                raise CorruptRegistryError(f"{path} is damaged: a row of table '{table}' has no valid {', '.join(bad)}",
                                           hint="restore it from a backup, or run 'adapterhub verify' to see the damage")


class Catalogue:
    """The TinyDB files under catalog/, behind the few operations the registry needs.

        adapters/<name>.json   one file per adapter name: tables versions (doc id = version), aliases, removed
        sha/<sha[:2]>.json     sha256 -> name@version rows: sha-prefix refs and blob reference counts
        by-base/<sha[:16]>.json  names with a version on that base, for `list --base`
        <rows>.json            bases, datasets, runs, fused, staging: rows matched by field equality

    Callers hold the registry lock around every write; reads take no lock (files are
    replaced atomically, so a read sees a whole file).
    """

    def __init__(self, folder: Path, files: DiskTables = DISK):
        self.folder = Path(folder)
        self.files = files

    def _db(self, path: Path) -> TinyDB:
        return open_db(path, self.files)

    # ---- adapter entries ------------------------------------------------------

    def adapter_path(self, name: str) -> Path:
        return self.folder / "adapters" / f"{name}.json"

    def names(self) -> list[str]:
        return self.files.stems(self.folder / "adapters")

    def entry(self, name: str) -> tuple[list[dict], dict[str, int], dict[int, dict]]:
        """A name's versions (by number), aliases and removed numbers ({number: {sha256, removed_at}}), in one read."""
        if not _CATALOGUE_NAME.fullmatch(name):
            return [], {}, {}  # never a path outside the catalogue, whatever a ref says
        path = self.adapter_path(name)
        tables = read_tables(path, self.files)
        _check_shapes(path, tables)
        versions = sorted(tables.get("versions", {}).values(), key=lambda r: r["version"])
        removed = {d["version"]: d for d in tables.get("removed", {}).values()}
        return versions, {d["alias"]: d["version"] for d in tables.get("aliases", {}).values()}, removed

    def add_versions(self, name: str, records: list[dict]) -> None:
        """Store finished records as versions of `name`; a number in use, or ever used, is refused."""
        db = self._db(self.adapter_path(name))
        taken = {d.doc_id for d in db.table("versions").all()} | {d.doc_id for d in db.table("removed").all()}
        clash = [r["version"] for r in records if r["version"] in taken]
        if clash:
            raise ConflictError(f"{name} already has or had version(s) {clash}", hint="version numbers are never reused")
        db.table("versions").insert_multiple(Document(r, doc_id=r["version"]) for r in records)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._db(self.adapter_path(name)).table("aliases").upsert({"alias": alias, "version": version}, Query().alias == alias)

    def update_version(self, name: str, version: int, fields: dict) -> None:
        self._db(self.adapter_path(name)).table("versions").update(fields, doc_ids=[version])

    def drop_version(self, record: dict, removed_at: str) -> list[str]:
        """Remove a version, keeping its number as removed; returns the sha256s no version references any more.

        Check, then write: every file this touches is read (and so parsed) first, so a damaged
        one refuses the removal before anything has changed. The record goes first, in one
        write with its tombstone and aliases: a kill after it leaves stale index rows and
        orphan blobs, both harmless, and never a version both present and removed.
        """
        name, number = record["name"], record["version"]
        sha_dbs = {f["sha256"]: self._sha_db(f["sha256"]) for f in record["files"]}
        for db in sha_dbs.values():
            db.all()
        base_sha = (record["base"] or {}).get("sha256")
        by_base = self._by_base_db(base_sha) if base_sha else None
        if by_base is not None:
            by_base.all()

        def drop(tables: dict) -> None:
            tables.setdefault("removed", {})[str(number)] = {"version": number, "sha256": record["sha256"], "removed_at": removed_at}
            tables["versions"].pop(str(number))
            tables["aliases"] = {i: a for i, a in tables.get("aliases", {}).items() if a["version"] != number}

        rewrite_tables(self.adapter_path(name), drop, self.files)
        unreferenced = []
        for sha, sha_db in sha_dbs.items():
            sha_db.remove((Query().sha256 == sha) & (Query().name == name) & (Query().version == number))
            if not sha_db.contains(Query().sha256 == sha):
                unreferenced.append(sha)
        if by_base is not None and not any((v.get("base") or {}).get("sha256") == base_sha for v in self.entry(name)[0]):
            by_base.remove(Query().name == name)
        return unreferenced

    # ---- evaluations ------------------------------------------------------------

    def add_eval(self, name: str, row: dict) -> None:
        """Append an evaluation of a version of `name` to its catalogue file (table `evals`): append-only,
        so a recomputation never hides what was measured before, and `rm` keeps them with the number."""
        self._db(self.adapter_path(name)).table("evals").insert(row)

    def evals(self, name: str) -> list[dict]:
        """Every evaluation recorded on versions of `name`, oldest first."""
        if not _CATALOGUE_NAME.fullmatch(name):
            return []
        docs = read_tables(self.adapter_path(name), self.files).get("evals", {})
        return [docs[i] for i in sorted(docs)]

    def add_model_eval(self, row: dict) -> None:
        """Append an evaluation of a base model or fused model (they have no catalogue file of their own)."""
        self.insert(MODEL_EVALS, row)

    def model_evals(self, sha256: str) -> list[dict]:
        """Evaluations recorded on the base or fused model with this sha256, oldest first."""
        rows = sorted(self.rows(MODEL_EVALS), key=lambda r: r["doc_id"])
        return [{k: v for k, v in r.items() if k != "doc_id"} for r in rows
                if isinstance(r.get("subject"), dict) and r["subject"].get("sha256") == sha256]

    # ---- indexes --------------------------------------------------------------

    def _sha_db(self, sha256: str) -> TinyDB:
        return self._db(self.folder / "sha" / f"{sha256[:2]}.json")

    def _by_base_db(self, base_sha: str) -> TinyDB:
        return self._db(self.folder / "by-base" / f"{base_sha[:16]}.json")

    def index(self, records: list[dict]) -> None:
        """Index rows for records about to be stored: written before the records, so a reader never
        finds a record its indexes miss (a row without its record is a harmless leftover)."""
        by_shard: dict[str, list[dict]] = {}
        by_base: dict[str, set[str]] = {}
        for record in records:
            for f in record["files"]:
                by_shard.setdefault(f["sha256"][:2], []).append(
                    {"sha256": f["sha256"], "name": record["name"], "version": record["version"], "file": f["name"]})
            if record["base"]:
                by_base.setdefault(record["base"]["sha256"], set()).add(record["name"])
        for shard, rows in by_shard.items():
            self._sha_db(shard).insert_multiple(rows)
        for base_sha, names in by_base.items():
            db = self._by_base_db(base_sha)
            known = {d["name"] for d in db.all()}
            db.insert_multiple({"name": n} for n in sorted(names - known))

    def sha_rows(self, prefix: str, file: str) -> list[dict]:
        """Index rows of `file`s whose sha256 starts with `prefix` (12+ hex digits)."""
        return [dict(r) for r in self._sha_db(prefix).search(Query().sha256.test(lambda s: s.startswith(prefix))
                                                               & (Query().file == file))]

    def names_on_base(self, base_sha: str) -> set[str]:
        return {d["name"] for d in self._by_base_db(base_sha).all()}

    # ---- row files --------------------------------------------------------------

    def rows(self, filename: str) -> list[dict]:
        """Every row of a row file, each with its `doc_id`."""
        return [{**d, "doc_id": d.doc_id} for d in self._db(self.folder / filename).all()]

    def find(self, filename: str, **match) -> dict | None:
        found = self._db(self.folder / filename).get(_where(match))
        return dict(found) if found is not None else None

    def insert(self, filename: str, row: dict) -> None:
        self._db(self.folder / filename).insert(row)

    def upsert(self, filename: str, row: dict, key: str) -> None:
        self._db(self.folder / filename).upsert(row, Query()[key] == row[key])

    def update(self, filename: str, fields: dict, **match) -> None:
        self._db(self.folder / filename).update(fields, _where(match))

    def remove(self, filename: str, doc_ids: list[int] | None = None, **match) -> None:
        """Remove matching rows; a row file left empty is removed too (no file is no rows, and a command
        that wrote then withdrew a row leaves the catalogue byte-identical)."""
        db = self._db(self.folder / filename)
        db.remove(doc_ids=doc_ids) if doc_ids is not None else db.remove(_where(match))
        if not len(db):
            self.files.remove(self.folder / filename)


def _where(match: dict):
    query = None
    for key, value in match.items():
        test = Query()[key] == value
        query = test if query is None else query & test
    return query
