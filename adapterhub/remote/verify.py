"""`verify --remote NAME [--repair]`: a remote registry checked against its objects and its own invariants.

Problems fail verification: a damaged refs document, an alias or parent pointing at nothing,
a record or blob that is missing or whose bytes no longer hash to its name, a fingerprint
that no longer derives its hash, a lineage cycle. Notes are what interrupted pushes leave:
objects no refs document reaches (orphans) and upload leases. `repair` removes orphans and
stale leases older than a grace period: a push uploads its objects before it commits its
refs document, so a young orphan may be a push in flight, not a leftover.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from ..errors import AdapterHubError, CorruptRegistryError, SchemaError
from ..integrity import RepairReport, VerifyReport, find_cycles
from ..schemas import validate
from . import cas, layout
from .bucket import Meta
from .catalogue import RemoteRegistry

DEFAULT_GRACE_S = 24 * 3600.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_KINDS = ("objects/", "records/", "bases/", "datasets/")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `2d` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise AdapterHubError(f"'{text}' is not a duration", hint="give seconds, or a number with s, m, h or d (30m, 2d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


class _Scan:
    """One pass over the remote: every object listed once, every refs document and record read once."""

    def __init__(self, remote: RemoteRegistry, report: VerifyReport):
        self.remote, self.report = remote, report
        self.objects: dict[str, Meta] = {m.key: m for m in remote.bucket.list("")}
        self.referenced: set[str] = {layout.MARKER}
        self.versions: dict[str, dict] = {}  # name@N -> record

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def run(self, rehash: bool = True) -> None:
        names = sorted(k[len("refs/"):-len(".json")] for k in self.objects if k.startswith("refs/") and k.endswith(".json"))
        found = self.remote.bucket.get_many([layout.refs_key(n) for n in names])
        docs = {}
        for name in names:
            key = layout.refs_key(name)
            self.referenced.add(key)
            if found[key] is None:
                continue  # deleted since the listing
            try:
                docs[name] = layout.parse_refs(found[key], name, self.remote.where(key), full=True)
            except CorruptRegistryError as e:
                self.problem(e.message)
        records = self._records(docs)
        blobs: dict[str, str] = {}  # sha -> what names it first
        for name, doc in docs.items():
            numbers = {e["version"] for e in doc["versions"]}
            for alias, target in doc["aliases"].items():
                if target["version"] not in numbers:
                    self.problem(f"{self.remote.name}:{name}@{alias} points at missing version {target['version']}")
            for entry in doc["versions"]:
                self._version(name, entry, records.get(entry["record"]), blobs)
        for ref, record in self.versions.items():
            for p in record["parents"]:
                parent = self.versions.get(p["ref"])
                if p["relation"] in ("resumed-from", "stacked-from", "promoted-from") and (parent or {}).get("sha256") != p["sha256"]:
                    self.problem(f"{self.remote.name}:{ref}: parent {p['ref']} ({p['sha256'][:12]}) is not in the remote")
        edges = {ref: [p["ref"] for p in r["parents"] if p["ref"] in self.versions and p["ref"] != ref]
                 for ref, r in self.versions.items()}
        self.report.problems += ["lineage cycle: " + " -> ".join(loop) for loop in find_cycles(edges)]
        if rehash:
            self._rehash(blobs)
        self.report.checked = {"names": len(docs), "versions": len(self.versions), "blobs": len(blobs)}

    def _records(self, docs: dict[str, dict]) -> dict[str, dict]:
        shas = sorted({e["record"] for doc in docs.values() for e in doc["versions"]})
        present = [s for s in shas if layout.record_key(s) in self.objects]
        got = self.remote.bucket.get_many([layout.record_key(s) for s in present])
        records = {}
        for sha in present:
            key = layout.record_key(sha)
            try:
                if got[key] is not None:
                    records[sha] = layout.check_record(got[key], sha, self.remote.where(key))
            except CorruptRegistryError as e:
                self.problem(e.message)
        return records

    def _version(self, name: str, entry: dict, body: dict | None, blobs: dict[str, str]) -> None:
        ref = f"{name}@{entry['version']}"
        where = f"{self.remote.name}:{ref}"
        key = layout.record_key(entry["record"])
        self.referenced.add(key)
        if body is None:
            if key not in self.objects:
                self.problem(f"{where}: its record {self.remote.where(key)} is missing")
            return
        record = layout.compose(name, entry, body)
        try:
            validate(record, "adapter_version", what=f"the record of {where}")
        except SchemaError as e:
            self.problem(e.message)
            return
        if entry["sha256"] != record["sha256"]:
            self.problem(f"{where}: its refs entry names weights {entry['sha256'][:12]}, its record {record['sha256'][:12]}")
        if entry.get("summary") != layout.summary(record):
            self.problem(f"{where}: the summary in refs/{name}.json disagrees with its record")
        self.versions[ref] = record
        for f in record["files"]:
            blob = layout.blob_key(f["sha256"])
            self.referenced.add(blob)
            meta = self.objects.get(blob)
            if meta is None:
                self.problem(f"{where}: file {f['name']} is missing ({self.remote.where(blob)})")
            elif meta.size != f["size"]:
                self.problem(f"{where}: file {f['name']} is corrupt: {self.remote.where(blob)} holds {meta.size} bytes, "
                             f"recorded {f['size']}")
            else:
                blobs.setdefault(f["sha256"], f"{where}: file {f['name']}")
        for kind, ref_doc, read in (("base", record.get("base"), self.remote.base_doc),
                                    ("dataset", record.get("dataset"), self.remote.dataset_doc)):
            if not ref_doc:
                continue
            key = layout.base_key(ref_doc["sha256"]) if kind == "base" else layout.dataset_key(ref_doc["sha256"])
            if key in self.referenced:
                continue
            self.referenced.add(key)
            try:
                doc = read(ref_doc["sha256"]) if key in self.objects else None
            except CorruptRegistryError as e:
                self.problem(e.message)
                continue
            if doc is None:
                self.problem(f"{where}: its {kind} {ref_doc['name']} has no fingerprint ({self.remote.where(key)})")
            elif kind == "base":
                # Base weights pushed --with-base belong to it; without them the fingerprint stands alone.
                for f in doc["files"]:
                    if layout.blob_key(f["sha256"]) in self.objects:
                        self.referenced.add(layout.blob_key(f["sha256"]))
                        blobs.setdefault(f["sha256"], f"base {doc['name']}: file {f['name']}")

    def _rehash(self, blobs: dict[str, str]) -> None:
        def check(item: tuple[str, str]) -> str | None:
            sha, what = item
            digest = hashlib.sha256()
            for chunk in self.remote.bucket.stream(layout.blob_key(sha)):
                digest.update(chunk)
            if digest.hexdigest() != sha:
                return (f"{what} is corrupt: {self.remote.where(layout.blob_key(sha))} hashes to "
                        f"{digest.hexdigest()[:12]}, not its name")
            return None

        with ThreadPoolExecutor(max_workers=4) as pool:
            self.report.problems += [p for p in pool.map(check, sorted(blobs.items())) if p]

    def leftovers(self) -> tuple[list[Meta], list[Meta], list[Meta]]:
        """(orphans, leases, strays): objects nothing reaches, upload claims, and keys the layout has no place for."""
        orphans, leases, strays = [], [], []
        for key, meta in sorted(self.objects.items()):
            if key in self.referenced:
                continue
            if key.startswith("leases/"):
                leases.append(meta)
            elif key.startswith(_KINDS):
                orphans.append(meta)
            elif not key.startswith("refs/"):
                strays.append(meta)
        return orphans, leases, strays


def verify(remote: RemoteRegistry, rehash: bool = True) -> VerifyReport:
    """Every refs document, record, fingerprint and blob of the remote checked; leftovers reported as notes."""
    report = VerifyReport()
    scan = _Scan(remote, report)
    if layout.MARKER not in scan.objects:
        if scan.objects:
            report.problems.append(f"{remote.where(layout.MARKER)} is missing: the prefix holds objects but no marker")
        report.checked = {"names": 0, "versions": 0, "blobs": 0}
        return report
    scan.run(rehash)
    orphans, leases, strays = scan.leftovers()
    if orphans:
        report.notes.append(f"{len(orphans)} object(s) no refs document reaches, left by interrupted pushes "
                            f"(or a push in flight): {', '.join(m.key for m in orphans[:3])}")
    if leases:
        report.notes.append(f"{len(leases)} upload lease(s): a push in flight, or one that was killed")
    if strays:
        report.notes.append(f"{len(strays)} object(s) the layout has no place for: {', '.join(m.key for m in strays[:3])}")
    if orphans or leases:
        report.notes.append(f"'adapterhub verify --remote {remote.name} --repair' removes those older than the grace period")
    return report


def repair(remote: RemoteRegistry, grace_s: float = DEFAULT_GRACE_S) -> RepairReport:
    """Remove orphans and stale leases older than `grace_s`; refused while the remote is damaged, since then
    "unreferenced" cannot be trusted (a damaged refs document would make every version it names an orphan)."""
    report = VerifyReport()
    scan = _Scan(remote, report)
    scan.run(rehash=False)
    if report.problems:
        raise CorruptRegistryError(f"remote '{remote.name}' is damaged ({report.problems[0]}), so leftovers cannot be "
                                   "told apart", hint=f"fix what 'adapterhub verify --remote {remote.name}' lists first")
    now = datetime.now(timezone.utc)
    old = lambda m: m.last_modified is None or (now - m.last_modified).total_seconds() >= grace_s  # noqa: E731
    orphans, leases, _ = scan.leftovers()
    removed: dict[str, list[str]] = {}
    for meta in orphans:
        if old(meta):
            remote.bucket.delete(meta.key)
            removed.setdefault("orphan objects", []).append(meta.key)
    for meta in leases:
        got = remote.bucket.get(meta.key)
        if got is None:
            continue
        try:
            holder = layout.parse(got[0], remote.where(meta.key), "")
        except CorruptRegistryError:
            holder = None
        if old(meta) and (holder is None or cas.lease_is_stale(holder, got[1].last_modified)):
            remote.bucket.delete(meta.key)
            removed.setdefault("stale leases", []).append(meta.key)
    return RepairReport(removed)
