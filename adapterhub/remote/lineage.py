"""`lineage REMOTE:REF` and `audit REMOTE:REF`: the lineage graph of a remote version, and every remote byte on it re-hashed.

The graph is lineage.py's (the same nodes, edges and renderings), walked over the remote's
records: parents the remote holds, its base and dataset fingerprints, and sources outside it.
Node ids and labels carry the remote's name (`adapter:team:sql-lora@3`), so a remote lineage
never reads as a local one.
"""

from __future__ import annotations

import hashlib

from ..audit import AuditReport, Finding
from ..errors import CorruptRegistryError
from ..lineage import Lineage, Node, walk_up
from ..records import VERSION_RELATIONS
from . import layout
from .catalogue import RemoteRegistry, RemoteVersion


class RemoteWalker:
    """What walk_up needs: the origins of a node, read from the remote."""

    def __init__(self, remote: RemoteRegistry):
        self.remote = remote
        self.damage: dict[str, str] = {}  # node id -> why its fingerprint cannot be trusted

    def adapter(self, rv: RemoteVersion) -> Node:
        return Node(f"adapter:{rv.remote_ref}", "adapter", rv.remote_ref, rv.entry["sha256"], True, rv.record)

    def origins(self, node: Node) -> list[tuple[str, Node]]:
        r = node.record
        if node.kind != "adapter" or not r:
            return []
        found = []
        for edge in r["parents"]:
            parent = self.remote.parent(edge)
            if parent is not None:
                found.append((edge["relation"], self.adapter(parent)))
            elif edge["relation"] in VERSION_RELATIONS:
                ref = f"{self.remote.name}:{edge['ref']}"
                found.append((edge["relation"], Node(f"adapter:{ref}", "adapter", ref, edge["sha256"], False)))
            else:
                found.append((edge["relation"], Node(f"remote:{edge['ref']}", "remote", edge["ref"], edge["sha256"], True)))
        if r.get("base"):
            found.append(("base", self._fingerprint("base", r["base"], self.remote.base_doc)))
        if r.get("dataset"):
            found.append(("dataset", self._fingerprint("dataset", r["dataset"], self.remote.dataset_doc)))
        return found

    def _fingerprint(self, kind: str, ref: dict, read) -> Node:
        node_id = f"{kind}:{ref['sha256']}"
        try:
            doc = read(ref["sha256"])
        except CorruptRegistryError as e:
            self.damage[node_id] = e.message
            return Node(node_id, kind, ref["name"], ref["sha256"], True, {})
        return Node(node_id, kind, (doc or ref)["name"], ref["sha256"], doc is not None, doc or {})


def ancestors(remote: RemoteRegistry, ref: str, walker: RemoteWalker | None = None) -> Lineage:
    walker = walker or RemoteWalker(remote)
    return walk_up(walker, walker.adapter(remote.resolve(ref)))


def audit(remote: RemoteRegistry, ref: str) -> AuditReport:
    """Re-hash every remote object along the lineage of `ref`: blobs by their bytes, fingerprints by their fields."""
    walker = RemoteWalker(remote)
    lineage = ancestors(remote, ref, walker)
    findings = []
    for node in lineage.nodes.values():
        if node.id in walker.damage:
            findings.append(Finding(node, "changed", [walker.damage[node.id]]))
        elif node.kind == "remote":
            findings.append(Finding(node, "unchecked", ["a source outside this remote: nothing here to re-hash"]))
        elif not node.found:
            findings.append(Finding(node, "missing", [f"not in remote '{remote.name}'"]))
        elif node.kind == "adapter":
            findings.append(Finding(node, *_rehash(remote, node.record["files"], required=True)))
        elif node.kind == "base":
            status, details = _rehash(remote, node.record["files"], required=False)
            findings.append(Finding(node, status, ["fingerprint re-derived from its files and config"] + details))
        else:
            findings.append(Finding(node, "ok", ["fingerprint re-derived from its files"]))
    return AuditReport(lineage, findings)


def _rehash(remote: RemoteRegistry, files: list[dict], required: bool) -> tuple[str, list[str]]:
    """Stream each file's blob and hash it; a base's weights are only there when pushed --with-base."""
    changed, missing, checked = [], [], 0
    for f in files:
        key = layout.blob_key(f["sha256"])
        if remote.bucket.head(key) is None:
            missing.append(f"{f['name']} is missing: {remote.where(key)}")
            continue
        digest = hashlib.sha256()
        for chunk in remote.bucket.stream(key):
            digest.update(chunk)
        checked += 1
        if digest.hexdigest() != f["sha256"]:
            changed.append(f"{f['name']} changed: {remote.where(key)} hashes to {digest.hexdigest()[:12]}, "
                           f"recorded {f['sha256'][:12]}")
    if changed:
        return "changed", changed + missing
    if missing and required:
        return "missing", missing
    if missing and not checked:
        return "ok", ["its weights are not in the remote (push with --with-base to share them)"]
    return "ok", [f"{checked} object(s) re-hashed in {remote.where()}"] + missing
