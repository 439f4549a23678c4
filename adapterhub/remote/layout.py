"""What a remote holds in its bucket, and how each document is made, named and checked.

    adapterhub-remote.json             marker: {"format": 1, "created_at"}
    objects/<sha[:2]>/<sha256>         blobs (weights, adapter configs, base files with --with-base), create-only
    records/<sha[:2]>/<sha256>.json    version records, named by the sha256 of their canonical JSON, create-only
    bases/<sha256>.json                base model fingerprints (the local row less its path), by the model's sha256
    datasets/<sha256>.json             dataset fingerprints, by the dataset's sha256
    refs/<name>.json                   per name: versions -> record, aliases, tags; the only mutable object
    leases/<sha256>.json               "I am uploading this blob": a create-only claim (cas.py)

Everything but a refs document proves itself: a record hashes to its key, a base or dataset
fingerprint re-derives its own sha256, a blob hashes to its key. A record leaves out what
may change or depends on the remote's numbering of the version itself (name, version,
tags), so the same content pushed twice is one object; the refs document supplies those.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Hashable, Iterable, TypeVar

from .. import jsonio
from ..errors import CorruptRegistryError
from ..files import dump_json
from ..fingerprint import canonical_sha256, model_sha256
from ..naming import is_sha256
from ..records import AdapterVersion, now

FORMAT = 1
MARKER = "adapterhub-remote.json"
MUTABLE = ("name", "version", "tags")


def blob_key(sha256: str) -> str:
    return f"objects/{_sha(sha256)[:2]}/{sha256}"


def record_key(sha256: str) -> str:
    return f"records/{_sha(sha256)[:2]}/{sha256}.json"


def base_key(sha256: str) -> str:
    return f"bases/{_sha(sha256)}.json"


def dataset_key(sha256: str) -> str:
    return f"datasets/{_sha(sha256)}.json"


def refs_key(name: str) -> str:
    return f"refs/{name}.json"


def lease_key(sha256: str) -> str:
    return f"leases/{_sha(sha256)}.json"


def _sha(sha256: str) -> str:
    # Keys are built from records anyone with write access could edit: only 64 hex digits make a key.
    if not is_sha256(sha256):
        raise CorruptRegistryError(f"{str(sha256)[:80]!r} is not a sha256", hint="the record naming it is damaged")
    return sha256


def canonical(doc: object, where: str = "a remote document") -> bytes:
    """The one byte form of a document: sorted keys, no spaces, so equal content has one sha256."""
    return dump_json(doc, where, separators=(",", ":")).encode()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse(data: bytes, where: str, hint: str) -> object:
    try:
        return jsonio.loads(data)
    except (jsonio.JSONError, UnicodeDecodeError) as e:
        raise CorruptRegistryError(f"{where} is damaged: {e}", hint=hint) from None


# ---- version records ---------------------------------------------------------------


def record_body(record: dict, parents: list[dict]) -> dict:
    """The immutable part of a version record as a remote stores it, with parents as the remote names them."""
    return {**{k: v for k, v in record.items() if k not in MUTABLE}, "parents": parents}


def compose(name: str, entry: dict, body: dict) -> dict:
    """A full version record (schemas/adapter_version) from a refs entry and its stored body."""
    return {**body, "name": name, "version": entry["version"], "tags": dict(entry["tags"])}


def check_record(data: bytes, sha256: str, where: str) -> dict:
    """A record's bytes, proven by its name and parsed; refused, naming the object, when they differ."""
    if sha256_of(data) != sha256:
        raise CorruptRegistryError(f"{where} is corrupt: its bytes hash to {sha256_of(data)[:12]}, not to its name",
                                   hint="restore it from a copy (push the version again from a registry that has it)")
    body = parse(data, where, "restore it from a copy (push the version again)")
    if not isinstance(body, dict) or any(k in body for k in MUTABLE) or not isinstance(body.get("files"), list):
        raise CorruptRegistryError(f"{where} is not a version record", hint="it was not written by adapterhub push")
    return body


def summary(record: dict) -> dict:
    base = record.get("base")
    return {"kind": record["kind"], "rank": record["rank"], "created_at": record["created_at"],
            "base": {"name": base["name"], "sha256": base["sha256"]} if base else None}


# ---- refs documents ----------------------------------------------------------------


def new_refs(name: str) -> dict:
    return {"format": FORMAT, "name": name, "versions": [], "aliases": {}, "updated_at": now()}


def parse_refs(data: bytes, name: str, where: str, full: bool = False) -> dict:
    """A refs document, checked: its schema (always for writers and verify; `full`), its name, its numbering."""
    hint = "restore it from the bucket's version history or a backup; nothing was changed"
    doc = parse(data, where, hint)
    if full:
        from ..errors import SchemaError
        from ..schemas import validate

        try:
            validate(doc, "remote_refs", what=where)
        except SchemaError as e:
            raise CorruptRegistryError(f"{where} is damaged: {e.message}", hint=hint) from None
    elif not (isinstance(doc, dict) and isinstance(doc.get("versions"), list) and isinstance(doc.get("aliases"), dict)
              and all(isinstance(v, dict) and isinstance(v.get("version"), int) and is_sha256(v.get("record"))
                      and is_sha256(v.get("sha256")) and isinstance(v.get("tags"), dict) for v in doc["versions"])
              and all(isinstance(a, dict) and isinstance(a.get("version"), int) for a in doc["aliases"].values())):
        raise CorruptRegistryError(f"{where} is damaged: it is not a refs document", hint=hint)
    if doc.get("name") != name:
        raise CorruptRegistryError(f"{where} is damaged: it names '{doc.get('name')}', not '{name}'", hint=hint)
    numbers = [v["version"] for v in doc["versions"]]
    if len(set(numbers)) != len(numbers):
        raise CorruptRegistryError(f"{where} is damaged: it lists a version number twice", hint=hint)
    return doc


def version_view(name: str, entry: dict, body: dict, aliases: dict) -> AdapterVersion:
    """The AdapterVersion `show` and `list` render, for a remote version."""
    return AdapterVersion(compose(name, entry, body),
                          tuple(sorted(a for a, target in aliases.items() if target["version"] == entry["version"])))


# ---- bases and datasets ------------------------------------------------------------


def base_doc(row: dict) -> dict:
    """A local base row as a remote stores it: the fingerprint, without the folder it sits in on one machine."""
    return {k: v for k, v in row.items() if k != "path"}


def dataset_doc(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "path"}


def check_base(data: bytes, sha256: str, where: str) -> dict:
    """A base fingerprint that re-derives its own sha256 and structure sha256 (fingerprint.model_sha256)."""
    doc = parse(data, where, "push the version again from a registry that has the base")
    try:
        # A base fingerprinted under an older format is filed under the hash records made then used.
        ok = (sha256 == doc["sha256"] or sha256 in (doc.get("previous_sha256") or ())) and (
            model_sha256(doc["files"], doc["config"]) == doc["sha256"]
            and canonical_sha256({"tensors": doc["tensors"], "config": doc["config"]}) == doc["structure_sha256"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CorruptRegistryError(f"{where} is corrupt: its files and config do not hash to {sha256[:12]}",
                                   hint="push the version again from a registry that has the base")
    return doc


def check_dataset(data: bytes, sha256: str, where: str) -> dict:
    doc = parse(data, where, "push the version again from a registry that has the dataset")
    try:
        ok = (isinstance(doc, dict) and doc.get("sha256") == sha256
              and canonical_sha256([[f["name"], f["sha256"]] for f in doc["files"]]) == sha256)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CorruptRegistryError(f"{where} is corrupt: its files do not hash to {sha256[:12]}",
                                   hint="push the version again from a registry that has the dataset")
    return doc


Node = TypeVar("Node")


def ancestors_first(start: Node, key: Callable[[Node], Hashable], parents: Callable[[Node], Iterable[Node]]) -> list[Node]:
    """`start` and everything it descends from, each once and after its own parents: the order push sends
    versions in and pull registers them, so a record never names a parent the other side lacks."""
    order: list = []
    seen: set = set()
    stack: list[tuple[Node, bool]] = [(start, False)]
    while stack:
        current, expanded = stack.pop()
        if expanded:
            order.append(current)
            continue
        if key(current) in seen:
            continue
        seen.add(key(current))
        stack.append((current, True))
        stack.extend((parent, False) for parent in reversed(list(parents(current))) if key(parent) not in seen)
    return order
