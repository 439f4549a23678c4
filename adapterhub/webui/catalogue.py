"""The catalogue as the web page lists it: one row per name (or per version), filtered, sorted and paged.

`Registry.list` takes about a second at 10,000 versions, too long for every click of a page. The
versions it returns are kept here and re-read name by name, through `Registry.list` again, when that
name's catalogue file changes (files are replaced by an atomic rename, so a new inode, size or mtime
means new contents); a page request then costs a `stat` per name plus a filter and a sort in memory.
The filters mean what `adapterhub list`'s options mean (tests compare the two on the same registry).
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import AdapterHubError
from ..records import AdapterVersion, EvalResult
from ..registry import Registry

KINDS = ("lora", "dora", "loreft")
# Above this many changed names one full read is cheaper than a read per name (each lists the folder).
FULL_READ = 64
MAX_LIMIT = 500
SORT_COLUMNS = ("name", "version", "versions", "kind", "rank", "scale", "base", "dataset", "tags", "aliases",
                "created_at")
_CACHED_QUERIES = 32


class QueryError(AdapterHubError, ValueError):
    """A page request with a filter, sort or page that means nothing (the page shows the message)."""


@dataclass(frozen=True)
class Query:
    """What a catalogue request asks for; every field is a filter of `adapterhub list` or a page setting."""

    base: str | None = None
    kind: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    name: str | None = None
    all_versions: bool = False
    sort: str = "name"
    offset: int = 0
    limit: int = 50

    def check(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise QueryError(f"kind '{self.kind}' is none of {', '.join(KINDS)}", hint="pick a kind from the list")
        column = self.sort.removeprefix("-")
        if column not in SORT_COLUMNS and not (column.startswith("eval:") and len(column) > 5):
            raise QueryError(f"'{self.sort}' is not a column to sort by",
                             hint=f"one of {', '.join(SORT_COLUMNS)}, or eval:SCORE such as eval:test_loss")
        if not (0 <= self.offset and 1 <= self.limit <= MAX_LIMIT):
            raise QueryError(f"rows {self.offset}+{self.limit} is not a page",
                             hint=f"offset 0 or more, limit 1 to {MAX_LIMIT}")

    @property
    def name_glob(self) -> str | None:
        """A name filter as a glob: text without glob characters matches anywhere in a name, as a search box does."""
        if not self.name:
            return None
        return self.name if any(c in self.name for c in "*?[") else f"*{self.name}*"


def _newest_scores(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """sha256 -> score name (test_loss, ...) -> {value, dataset}: the newest value of each score per version.

    Read without the schema check `Registry.evaluations` makes (the version page makes it): a row a hand
    edit damaged is left out of the catalogue's column rather than taking the whole catalogue down.
    """
    found: dict[str, dict[str, dict]] = {}
    for row in rows:
        try:
            result = EvalResult.from_dict(row)
            per = found.setdefault(result.subject_sha256, {})
            for score, value in result.scores.items():
                per[score] = {"value": value, "dataset": result.row["dataset"]["name"]}
        except (KeyError, TypeError, AttributeError):
            continue
    return found


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    versions: dict[str, list[AdapterVersion]]  # name -> its versions, by number
    scores: dict[str, dict[str, dict[str, dict]]]  # name -> sha256 -> score -> {value, dataset}


class CatalogueView:
    """The registry's versions, held for the page and kept up to date with the catalogue files.

    Thread-safe: the server answers requests from a pool of threads.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._lock = threading.Lock()
        self._stamps: dict[str, tuple[int, int, int]] = {}
        # Replaced whole, never changed in place: a request reads one snapshot while another thread refreshes.
        self._snapshot = _Snapshot(0, {}, {})
        self._queries: OrderedDict[tuple, list[dict]] = OrderedDict()
        self._facets: tuple[int, dict] | None = None

    # ---- keeping up with the registry ---------------------------------------------------------------

    def _stamp(self) -> dict[str, tuple[int, int, int]]:
        stamps = {}
        for name in self.registry.catalogue.names():
            try:
                st = os.stat(self.registry.catalogue.adapter_path(name))
            except FileNotFoundError:
                continue  # removed since the folder was listed
            stamps[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return stamps

    def refresh(self) -> "_Snapshot":
        """Re-read the names whose catalogue file changed; returns the versions as they are now."""
        with self._lock:
            # Stamps are taken before the reads: a file replaced during a read differs next time and is read again.
            stamps = self._stamp()
            changed = [n for n, s in stamps.items() if self._stamps.get(n) != s]
            gone = [n for n in self._stamps if n not in stamps]
            if not changed and not gone:
                return self._snapshot
            if len(changed) > FULL_READ:
                fresh: dict[str, list[AdapterVersion]] = {n: [] for n in changed}
                for version in self.registry.list():
                    if version.name in fresh:
                        fresh[version.name].append(version)
            else:
                # Names are lowercase letters, digits and . _ -: never glob characters.
                fresh = {n: self.registry.list(name_glob=n) for n in changed}
            old = self._snapshot
            versions = {n: v for n, v in old.versions.items() if n not in gone} | fresh
            scores = {n: v for n, v in old.scores.items() if n not in gone}
            for name in fresh:
                scores[name] = _newest_scores(self.registry.catalogue.evals(name))
            self._stamps = {n: stamps[n] for n in versions}
            self._snapshot = _Snapshot(old.generation + 1, versions, scores)
            self._queries.clear()
            return self._snapshot

    # ---- reading ------------------------------------------------------------------------------------

    def versions(self, name: str) -> list[AdapterVersion]:
        return list(self.refresh().versions.get(name, []))

    def scores(self, version: AdapterVersion) -> dict[str, dict]:
        return self.refresh().scores.get(version.name, {}).get(version.sha256, {})

    def children(self, version: AdapterVersion) -> list[str]:
        """Refs of versions naming `version` as a parent: what `Registry.children` finds, from memory."""
        snap = self.refresh()
        return [v.ref for name in sorted(snap.versions) for v in snap.versions[name]
                if any(p["sha256"] == version.sha256 and p["ref"] == version.ref for p in v.record["parents"])]

    def on_base(self, sha256: str) -> list[AdapterVersion]:
        return [v for versions in self.refresh().versions.values() for v in versions
                if (v.record.get("base") or {}).get("sha256") == sha256]

    def _matching(self, snap: "_Snapshot", query: Query) -> list[AdapterVersion]:
        """The versions `adapterhub list` prints for the same filters, in its order (name, then version)."""
        base_sha = self.registry.base(query.base)["sha256"] if query.base else None
        glob, tags = query.name_glob, dict(query.tags)
        found = []
        for name in sorted(snap.versions):
            if glob and not fnmatch.fnmatchcase(name, glob):
                continue
            for version in snap.versions[name]:
                r = version.record
                if base_sha and (r.get("base") or {}).get("sha256") != base_sha:
                    continue
                if query.kind and r["kind"] != query.kind:
                    continue
                if tags and any(r["tags"].get(k) != v for k, v in tags.items()):
                    continue
                found.append(version)
        return found

    @staticmethod
    def _row(snap: "_Snapshot", version: AdapterVersion, count: int) -> dict:
        r = version.record
        aliases = {a: v.version for v in snap.versions.get(version.name, ()) for a in v.aliases}
        base = r.get("base")
        return {"name": version.name, "version": version.version, "ref": version.ref, "versions": count,
                "kind": r["kind"], "rank": r["rank"], "scale": r["scale"],
                "base": {"name": base["name"], "sha256": base["sha256"]} if base else None,
                "dataset": (r.get("dataset") or {}).get("name"), "tags": dict(r["tags"]),
                "aliases": dict(sorted(aliases.items())), "scores": snap.scores.get(version.name, {}).get(version.sha256, {}),
                "created_at": r["created_at"], "description": r.get("description"), "sha256": version.sha256}

    def query(self, query: Query) -> dict:
        """One page of rows, with the total and the values the filters offer."""
        query.check()
        snap = self.refresh()
        key = (snap.generation, query.base, query.kind, query.tags, query.name_glob, query.all_versions, query.sort)
        with self._lock:
            rows = self._queries.get(key)
        if rows is None:
            rows = _sort(self._rows(snap, query), query.sort)
            with self._lock:
                self._queries[key] = rows
                while len(self._queries) > _CACHED_QUERIES:
                    self._queries.popitem(last=False)
        page = rows[query.offset:query.offset + query.limit]
        return {"total": len(rows), "offset": query.offset, "limit": query.limit, "rows": page,
                "versions_total": sum(len(v) for v in snap.versions.values()), "names_total": len(snap.versions)}

    def _rows(self, snap: "_Snapshot", query: Query) -> list[dict]:
        matching = self._matching(snap, query)
        if query.all_versions:
            return [self._row(snap, v, 1) for v in matching]
        latest: dict[str, tuple[AdapterVersion, int]] = {}
        for version in matching:  # by name, then version: the last one seen is the latest that matches
            latest[version.name] = (version, latest.get(version.name, (None, 0))[1] + 1)
        return [self._row(snap, v, count) for v, count in latest.values()]

    def facets(self) -> dict:
        """What the filters can choose from: bases, kinds and tags in use, and the recorded scores."""
        snap = self.refresh()
        with self._lock:
            if self._facets and self._facets[0] == snap.generation:
                return self._facets[1]
        bases: dict[str, dict] = {}
        kinds: dict[str, int] = {}
        tags: dict[str, int] = {}
        for versions in snap.versions.values():
            for v in versions:
                base = v.record.get("base")
                if base:
                    entry = bases.setdefault(base["sha256"], {"name": base["name"], "sha256": base["sha256"], "versions": 0})
                    entry["versions"] += 1
                kinds[v.kind] = kinds.get(v.kind, 0) + 1
                for k, value in v.tags.items():
                    tags[f"{k}={value}"] = tags.get(f"{k}={value}", 0) + 1
        scores = sorted({s for per_name in snap.scores.values() for per in per_name.values() for s in per})
        facets = {"bases": sorted(bases.values(), key=lambda b: b["name"]), "kinds": kinds,
                  "tags": dict(sorted(tags.items(), key=lambda t: (-t[1], t[0]))[:200]), "scores": scores}
        with self._lock:
            self._facets = (snap.generation, facets)
        return facets


def _sort_value(row: dict, column: str):
    if column.startswith("eval:"):
        return (row["scores"].get(column[5:]) or {}).get("value")
    value = row.get(column)
    if column == "base":
        return value["name"] if value else None
    if column == "tags":
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or None
    if column == "aliases":
        return ",".join(value) or None
    return value


def _sort(rows: list[dict], sort: str) -> list[dict]:
    """Rows by `sort` (a column, `-column` for descending); rows without a value last either way, ties by ref."""
    descending, column = sort.startswith("-"), sort.removeprefix("-")
    ordered = sorted(rows, key=lambda r: (r["name"], r["version"]))
    have = [r for r in ordered if _sort_value(r, column) is not None]
    missing = [r for r in ordered if _sort_value(r, column) is None]
    return sorted(have, key=lambda r: _sort_value(r, column), reverse=descending) + missing
