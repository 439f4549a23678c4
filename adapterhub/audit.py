"""Audit: re-hash every file along a lineage and say, node by node, whether it is still what was recorded.

Nothing is trusted: hash caches and Hugging Face blob names are bypassed, every
reachable byte is read again. A node is `ok`, `changed` (a file's bytes differ
from its record: the audit fails), `missing` (the file or folder is gone; the
report says where it was last seen) or `unchecked` (a remote source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import CorruptRegistryError
from .fingerprint import hash_files
from .lineage import Lineage, Node, ancestors, safe_member
from .records import RECORD_FILE
from .registry import Registry
from .files import read_json

STATUSES = ("ok", "changed", "missing", "unchecked")


@dataclass
class Finding:
    node: Node
    status: str
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.node.to_dict(), "status": self.status, "details": self.details}


@dataclass
class AuditReport:
    lineage: Lineage
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not any(f.status == "changed" for f in self.findings)

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.findings if f.status == s) for s in STATUSES}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "root": self.lineage.root, "counts": self.counts(),
                "nodes": [f.to_dict() for f in self.findings]}


def _same_base(written: object, registered: dict, bases: dict[str, dict]) -> bool:
    """A folder written before a registry upgrade names its base by the hash it had then."""
    if not isinstance(written, dict) or written.get("sha256") not in bases:
        return False
    return bases[written["sha256"]] is bases.get(registered["sha256"]) and written.get("name") == registered.get("name")


class _Checker:
    def __init__(self, registry: Registry):
        self.registry = registry

    @staticmethod
    def _compare(paths: dict[str, Path], recorded: list[dict], where: str) -> tuple[str, list[str]]:
        """Re-hash each recorded file at its path (reread: no cache, no Hugging Face blob name is trusted)."""
        present = [f for f in recorded if paths[f["name"]].is_file()]
        missing = [f"{f['name']} is missing from {where}" for f in recorded if f not in present]
        hashes = hash_files([paths[f["name"]] for f in present], reread=True)
        changed = [f"{f['name']} changed: sha256 is now {hashes[paths[f['name']]][:12]}, recorded {f['sha256'][:12]}"
                   for f in present if hashes[paths[f["name"]]] != f["sha256"]]
        status = "changed" if changed else "missing" if missing else "ok"
        return status, changed + missing or [f"{len(present)} file(s) re-hashed in {where}"]

    def files(self, folder: Path, recorded: list[dict], what: str, nested: bool = False) -> tuple[str, list[str]]:
        if not folder.is_dir():
            return "missing", [f"{what} folder is gone (last seen at {folder})"]
        # Names come from records anyone could have edited: one that leaves the folder is reported, never read.
        unsafe = []
        for f in recorded:
            try:
                safe_member(f["name"], f"the {what} record", nested)
            except CorruptRegistryError as e:
                unsafe.append(f"unsafe: {e.message}; not read")
        if unsafe:
            return "changed", unsafe
        return self._compare({f["name"]: folder / f["name"] for f in recorded}, recorded, str(folder))

    def blobs(self, recorded: list[dict]) -> tuple[str, list[str]]:
        return self._compare({f["name"]: self.registry.objects.path(f["sha256"]) for f in recorded}, recorded,
                             "the registry's object store")

    def check(self, node: Node, root_dir: Path | None) -> Finding:
        r = node.record
        if node.kind == "remote":
            return Finding(node, "unchecked", ["a remote source: nothing local to re-hash"])
        if not node.found and node.kind != "fused":
            where = r.get("path") or (r.get("source") or {}).get("path")
            return Finding(node, "missing", [f"not in this registry{f' (last seen at {where})' if where else ''}"])
        if node.kind == "adapter":
            return Finding(node, *self.blobs(r["files"]))
        if node.kind == "base":
            return Finding(node, *self.files(Path(r["path"]), r["files"], "base model"))
        if node.kind == "dataset":
            return Finding(node, *self.files(Path(r["path"]), r["files"], "dataset", nested=True))
        if node.kind == "fused":
            return self.fused(node, root_dir)
        # A checkpoint's hash was taken as the lineage was read; its metadata names its origins.
        return Finding(node, "ok", [f"read {r['path']}"])

    def fused(self, node: Node, root_dir: Path | None) -> Finding:
        registered = self.registry.fused(node.sha256)
        folder = root_dir or Path((registered or node.record).get("path", ""))
        record = registered or node.record
        if not record:
            return Finding(node, "missing", ["not in this registry, and its folder is unknown"])
        status, details = self.files(folder, record["files"], "fused model")
        if status == "missing" and not folder.is_dir():
            return Finding(node, status, details)
        in_folder = read_json(folder / RECORD_FILE)
        if registered and isinstance(in_folder, dict):
            bases = self.registry.bases_by_sha()
            for key in ("sha256", "base", "adapters", "files"):
                if key == "base" and _same_base(in_folder.get(key), registered.get(key), bases):
                    continue
                if in_folder.get(key) != registered.get(key):
                    status = "changed"
                    details.append(f"{RECORD_FILE} in the folder disagrees with the registry on '{key}'")
        elif registered:
            status = "changed" if status == "ok" else status
            details.append(f"{RECORD_FILE} is missing or unreadable in {folder}")
        else:
            details.append("not registered here: checked against its own adapterhub.json")
        restore = record.get("restore")
        if restore and registered:
            blob_status, blob_details = self.blobs([{"name": "restore data", "sha256": restore["sha256"]}])
            if blob_status != "ok":
                status = "changed" if "changed" in (status, blob_status) else blob_status
                details += blob_details
        return Finding(node, status, details)


def audit(registry: Registry, target: str) -> AuditReport:
    """Re-hash everything reachable along the lineage of `target` (a ref, a folder or a checkpoint)."""
    lineage = ancestors(registry, target)
    root_dir = Path(target).expanduser() if Path(target).expanduser().is_dir() else None
    checker = _Checker(registry)
    findings = [checker.check(node, root_dir if node.id == lineage.root else None) for node in lineage.nodes.values()]
    return AuditReport(lineage, findings)
