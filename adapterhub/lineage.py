"""Lineage: the graph from an adapter, a fused model or a checkpoint to its bases and datasets.

Nodes are adapter versions, base models, datasets, fused models, checkpoints and
remote sources (a Hub repo, a folder imported from another registry); an edge
goes from a child to what it came from, labelled with the relation the registry
recorded (`resumed-from`, `stacked-from`, `fused-from`, `extracted-from`,
`imported-from`, `pulled-from`, `promoted-from`) or with `base` / `dataset`.

Ancestors are walked lazily, one record at a time, so a lineage costs a few reads
whatever the registry's size; descendants need every record and scan them once.
The graph renders as a terminal tree, JSON, Graphviz dot and Mermaid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterHubError, CorruptRegistryError, NotFoundError
from .records import RECORD_FILE, VERSION_RELATIONS, AdapterVersion
from .registry import Registry
from .schemas import validate
from .files import read_json

_SHA256 = re.compile(r"[0-9a-f]{64}")


def safe_member(name: object, where: object, nested: bool = False) -> str:
    """`name`, read from a record, checked to name a file inside the record's folder.

    A record is text anyone can edit: a name such as `../../etc/passwd` or `/etc/passwd`
    would send a reader (audit, export, unfuse) outside the folder. `nested` allows
    sub-folders (a dataset's `data/train.jsonl`), never `..`, `.`, empty parts or a root.

    Raises:
        CorruptRegistryError: naming the record and the offending name.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or "\x00" in name or "\\" in name or any(part in ("", ".", "..") for part in parts)
            or (len(parts) > 1 and not nested)):
        what = "a relative path inside its folder" if nested else "a plain file name inside its folder"
        raise CorruptRegistryError(f"{where} names the file {name!r}, which is not {what}",
                                   hint="the record was edited or damaged; restore it from a trusted copy")
    return name


def folder_record(walker: "Walker", folder: Path) -> dict:
    """The record a fused or exported folder carries, in a shape safe to walk and to read files by.

    The registry's own record wins when it knows the hash; otherwise the folder's
    `adapterhub.json` is all there is, and it is untrusted: it must match its schema,
    and every file it names must lie inside the folder.

    Raises:
        NotFoundError: the folder carries no record.
        SchemaError, CorruptRegistryError: the record is not one adapterhub wrote.
    """
    where = folder / RECORD_FILE
    record = read_json(where)
    if not isinstance(record, dict):
        raise NotFoundError(f"{folder} has no {RECORD_FILE}, so adapterhub did not write it",
                            hint="give a version ref, or a folder made by 'adapterhub fuse' or 'adapterhub export'")
    if not (isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
        raise CorruptRegistryError(f"{where} has no valid sha256", hint="give a folder made by 'adapterhub fuse' or 'adapterhub export'")
    if "adapters" in record:
        known = walker._fused.get(record["sha256"])
        if known:
            return known
        validate(record, "fused_model", what=str(where))
        for f in record["files"]:
            safe_member(f["name"], where)
        return record
    if not isinstance(record.get("ref"), str):
        raise CorruptRegistryError(f"{where} names no version ref", hint="give a folder made by 'adapterhub export'")
    if walker.adapter_by_ref(record["ref"], record["sha256"]).found:
        return record
    # Unknown here, so the walk follows this record's parents, base and dataset: they must have the shape ours have.
    validate({k: v for k, v in record.items() if k not in ("ref", "aliases")}, "adapter_version", what=str(where))
    for f in record["files"]:
        safe_member(f["name"], where)
    return record


@dataclass
class Node:
    id: str
    kind: str  # adapter | base | dataset | fused | checkpoint | remote
    label: str
    sha256: str
    found: bool = True  # False: named by a record, but not (or no longer) in this registry
    record: dict = field(default_factory=dict, repr=False)

    @property
    def title(self) -> str:
        r = self.record
        what = {
            "adapter": f"{self.label} ({r.get('kind', '?')}, rank {r.get('rank', '?')})",
            "base": f"base {self.label}",
            "dataset": f"dataset {self.label}",
            "fused": f"fused model {self.label}",
            "checkpoint": f"checkpoint {self.label}",
            "remote": f"source {self.label}",
        }[self.kind]
        return f"{what}  sha256:{self.short_sha}" + ("" if self.found else "  (not in this registry)")

    @property
    def short_sha(self) -> str:
        return self.sha256[:12] or "unknown"

    def to_dict(self) -> dict:
        where = self.record.get("path")
        return {"id": self.id, "kind": self.kind, "label": self.label, "sha256": self.sha256, "found": self.found,
                **({"path": where} if where else {})}


@dataclass(frozen=True)
class Edge:
    child: str
    parent: str
    relation: str


@dataclass
class Lineage:
    root: str
    direction: str  # ancestors | descendants
    nodes: dict[str, Node]
    edges: list[Edge]

    def next_of(self, node_id: str) -> list[tuple[str, Node]]:
        """(relation, node) one step away from `node_id` in the walk's direction."""
        if self.direction == "ancestors":
            return [(e.relation, self.nodes[e.parent]) for e in self.edges if e.child == node_id]
        return [(e.relation, self.nodes[e.child]) for e in self.edges if e.parent == node_id]

    def to_dict(self) -> dict:
        return {"root": self.root, "direction": self.direction, "nodes": [n.to_dict() for n in self.nodes.values()],
                "edges": [{"child": e.child, "parent": e.parent, "relation": e.relation} for e in self.edges]}


class Walker:
    """Turns registry records into nodes and their recorded origins."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._bases = registry.bases_by_sha()
        self._datasets = {d["sha256"]: d for d in registry.datasets()}
        self._fused = {f["sha256"]: f for f in registry.fused_models()}

    # ---- nodes ----------------------------------------------------------------

    def adapter(self, version: AdapterVersion) -> Node:
        return Node(f"adapter:{version.ref}", "adapter", version.ref, version.sha256, True, version.record)

    def adapter_by_ref(self, ref: str, sha256: str, record: dict | None = None) -> Node:
        version = self._version(ref)
        if version is None or version.sha256 != sha256:
            # The ref was removed (or reused after removal): the weights' hash is the identity.
            version = self._version(sha256)
        if version is None:
            return Node(f"adapter:{ref}", "adapter", ref, sha256, False, record or {})
        return self.adapter(version)

    def _version(self, ref: str) -> AdapterVersion | None:
        return self.registry.find(ref)

    def base(self, ref: dict) -> Node:
        known = self._bases.get(ref["sha256"])
        sha = known["sha256"] if known else ref["sha256"]  # one node per base, under whichever hash a record used
        return Node(f"base:{sha}", "base", (known or ref)["name"], sha, known is not None, known or {})

    def dataset(self, ref: dict) -> Node:
        known = self._datasets.get(ref["sha256"])
        return Node(f"dataset:{ref['sha256']}", "dataset", (known or ref)["name"], ref["sha256"], known is not None, known or {})

    def fused(self, sha256: str, label: str | None = None, record: dict | None = None) -> Node:
        known = self._fused.get(sha256)
        record = record or known or {}
        return Node(f"fused:{sha256}", "fused", label or record.get("path") or sha256[:12], sha256,
                    known is not None, record)

    def checkpoint(self, path: Path) -> Node:
        from .safetensors_io import read_header, sha256_file

        metadata = read_header(path).metadata or {}
        if "step" not in metadata or "base_sha256" not in metadata:
            raise AdapterHubError(f"{path} is not an adapterhub checkpoint (no step or base in its metadata)",
                                  hint="give a version ref, a fused model folder or a runs/<id>/step-*.safetensors file")
        label = f"{metadata.get('run_id', path.parent.name)} step {int(metadata['step'])}"
        return Node(f"checkpoint:{path.resolve()}", "checkpoint", label, sha256_file(path), True,
                    {**metadata, "path": str(path.resolve())})

    def remote(self, ref: str, sha256: str) -> Node:
        return Node(f"remote:{ref}", "remote", ref, sha256, True, {})

    # ---- edges ----------------------------------------------------------------

    def origins(self, node: Node) -> list[tuple[str, Node]]:
        """What `node` came from, as (relation, node), in the order the records list them."""
        r = node.record
        if not r:
            return []
        if node.kind == "adapter":
            found: list[tuple[str, Node]] = []
            for p in r["parents"]:
                found.append((p["relation"], self._parent(p)))
            if r.get("base"):
                found.append(("base", self.base(r["base"])))
            if r.get("dataset"):
                found.append(("dataset", self.dataset(r["dataset"])))
            return found
        if node.kind == "fused":
            return ([("fused-from", self.adapter_by_ref(a["ref"], a["sha256"])) for a in r["adapters"]]
                    + [("base", self.base(r["base"]))])
        if node.kind == "checkpoint":
            found = []
            if r.get("parent_ref"):
                found.append(("resumed-from", self._parent_by_ref(r["parent_ref"])))
            found.append(("base", self.base({"sha256": r["base_sha256"], "name": r["base_sha256"][:12]})))
            if r.get("dataset_sha256"):
                found.append(("dataset", self.dataset({"sha256": r["dataset_sha256"], "name": r["dataset_sha256"][:12]})))
            return found
        return []

    def _parent(self, parent: dict) -> Node:
        relation = parent["relation"]
        if relation in VERSION_RELATIONS:
            return self.adapter_by_ref(parent["ref"], parent["sha256"])
        if relation == "extracted-from":
            return self.fused(parent["sha256"], label=None if parent["sha256"] in self._fused else parent["ref"])
        here = self._version(parent["ref"])
        if relation == "imported-from" and here and here.sha256 == parent["sha256"]:
            return self.adapter(here)
        return self.remote(parent["ref"], parent["sha256"])

    def _parent_by_ref(self, ref: str) -> Node:
        version = self._version(ref)
        # A checkpoint names its parent by ref alone: a removed parent's hash is unknown, never made up.
        return self.adapter(version) if version else Node(f"adapter:{ref}", "adapter", ref, "", False)

    def every_child(self):
        """Every node that can have origins: all versions, all fused models."""
        for version in self.registry.list():
            yield self.adapter(version)
        for sha256, record in self._fused.items():
            yield self.fused(sha256, record=record)


def start_node(walker: Walker, target: str) -> Node:
    """A ref, a fused model or exported adapter folder, or a checkpoint file, as a node."""
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return walker.checkpoint(path)
    if path.is_dir():
        record = folder_record(walker, path)
        if "adapters" in record:
            return walker.fused(record["sha256"], str(path.resolve()), record)
        return walker.adapter_by_ref(record["ref"], record["sha256"], record)
    return walker.adapter(walker.registry.resolve(target))


def dataset_node(walker: Walker, target: str) -> Node:
    """A dataset named by its folder (fingerprinted), its registered name, or a sha256 prefix."""
    path = Path(target).expanduser()
    if path.is_dir():
        from .fingerprint import fingerprint_dataset

        sha256 = fingerprint_dataset(path)["sha256"]
        return walker.dataset({"sha256": sha256, "name": path.name})
    key = target.lower()
    matches = [d for d in walker.registry.datasets()
               if d["name"] == key or (len(key) >= 12 and d["sha256"].startswith(key))]
    if len(matches) != 1:
        known = ", ".join(d["name"] for d in walker.registry.datasets()[:10]) or "none yet"
        raise NotFoundError(f"{'no' if not matches else str(len(matches))} dataset(s) match '{target}' (registered: {known})",
                            hint="give the dataset folder, its registered name, or a longer sha256 prefix")
    return walker.dataset(matches[0])


def ancestors(registry: Registry, target: str) -> Lineage:
    walker = Walker(registry)
    return walk_up(walker, start_node(walker, target))


def walk_up(walker: Walker, root: Node) -> Lineage:
    nodes, edges, todo = {root.id: root}, [], [root]
    while todo:
        node = todo.pop(0)
        for relation, origin in walker.origins(node):
            edges.append(Edge(node.id, origin.id, relation))
            if origin.id not in nodes:
                nodes[origin.id] = origin
                todo.append(origin)
    return Lineage(root.id, "ancestors", nodes, edges)


def descendants(registry: Registry, target: str | None = None, dataset: str | None = None) -> Lineage:
    """Everything that came from `target` (or from `dataset`), directly or through others."""
    walker = Walker(registry)
    root = dataset_node(walker, dataset) if dataset else start_node(walker, target)
    children: dict[str, list[tuple[str, Node]]] = {}
    for child in walker.every_child():
        for relation, origin in walker.origins(child):
            children.setdefault(origin.id, []).append((relation, child))
    nodes, edges, todo = {root.id: root}, [], [root]
    while todo:
        node = todo.pop(0)
        for relation, child in children.get(node.id, []):
            edges.append(Edge(child.id, node.id, relation))
            if child.id not in nodes:
                nodes[child.id] = child
                todo.append(child)
    return Lineage(root.id, "descendants", nodes, edges)


# ---- renderings ---------------------------------------------------------------


def render(lineage: Lineage, fmt: str) -> str:
    return {"tree": to_tree, "json": lambda g: json.dumps(g.to_dict(), indent=2), "dot": to_dot,
            "mermaid": to_mermaid}[fmt](lineage)


def to_tree(lineage: Lineage) -> str:
    lines = [lineage.nodes[lineage.root].title]
    expanded: set[str] = {lineage.root}

    def walk(node_id: str, prefix: str) -> None:
        steps = lineage.next_of(node_id)
        for i, (relation, node) in enumerate(steps):
            last = i == len(steps) - 1
            repeat = node.id in expanded and lineage.next_of(node.id)
            step = f"{relation}: {node.title}" if lineage.direction == "ancestors" else f"{node.title}  ← {relation}"
            lines.append(f"{prefix}{'└── ' if last else '├── '}{step}" + ("  (shown above)" if repeat else ""))
            if not repeat:
                expanded.add(node.id)
                walk(node.id, prefix + ("    " if last else "│   "))

    walk(lineage.root, "")
    return "\n".join(lines)


_DOT_STYLE = {"adapter": 'shape=box, style="rounded,filled", fillcolor="#dbeafe"',
              "base": 'shape=cylinder, style=filled, fillcolor="#fde68a"',
              "dataset": 'shape=folder, style=filled, fillcolor="#bbf7d0"',
              "fused": 'shape=box3d, style=filled, fillcolor="#fbcfe8"',
              "checkpoint": 'shape=note, style=filled, fillcolor="#e5e7eb"',
              "remote": 'shape=component, style=filled, fillcolor="#ddd6fe"'}


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(lineage: Lineage) -> str:
    lines = ["digraph lineage {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for node in lineage.nodes.values():
        label = f"{node.kind}\n{node.label}\nsha256 {node.short_sha}" + ("" if node.found else "\n(not in this registry)")
        lines.append(f"  {_dot_string(node.id)} [label={_dot_string(label)}, tooltip={_dot_string(node.sha256)}, "
                     f"{_DOT_STYLE[node.kind]}{'' if node.found else ', color=red'}];")
    for e in lineage.edges:
        lines.append(f"  {_dot_string(e.child)} -> {_dot_string(e.parent)} [label={_dot_string(e.relation)}];")
    return "\n".join(lines + ["}"])


def _mermaid_text(text: str) -> str:
    # Mermaid reads entity codes inside quoted labels; these characters would end or break one.
    return "".join({'"': "#quot;", "<": "#lt;", ">": "#gt;", "|": "#124;"}.get(c, c) for c in text)


def to_mermaid(lineage: Lineage) -> str:
    ids = {node_id: f"n{i}" for i, node_id in enumerate(lineage.nodes)}
    lines = ["flowchart BT"]
    shapes = {"adapter": ('(["', '"])'), "base": ('[("', '")]'), "dataset": ('[/"', '"/]'), "fused": ('[["', '"]]'),
              "checkpoint": ('>"', '"]'), "remote": ('{{"', '"}}')}
    for node_id, node in lineage.nodes.items():
        opening, closing = shapes[node.kind]
        label = "<br/>".join(_mermaid_text(t) for t in (node.kind, node.label, f"sha256 {node.short_sha}"))
        lines.append(f"  {ids[node_id]}{opening}{label}{closing}")
    for e in lineage.edges:
        lines.append(f"  {ids[e.child]} -->|{_mermaid_text(e.relation)}| {ids[e.parent]}")
    missing = [ids[n.id] for n in lineage.nodes.values() if not n.found]
    if missing:
        lines += ["  classDef missing stroke:#dc2626,stroke-dasharray:4", f"  class {','.join(missing)} missing"]
    return "\n".join(lines)
