"""`push REF REMOTE`: a version, and the lineage it needs that the remote lacks, into a remote registry.

Versions go ancestors first, so a child's record can name its parents by the numbers the
remote gave them. For each: blobs first (skipped when present, claimed by a lease so two
pushers send a blob once, hash-checked before the upload can complete), then the base and
dataset fingerprints, then the immutable record, and last the refs document, by
compare-and-swap: the remote assigns the next version number there, and that write is the
commit point. A push killed at any moment leaves at worst orphan objects, which
`verify --remote` reports and `--repair` removes once they are older than a grace period.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from ..errors import CorruptRegistryError, NotFoundError
from ..records import VERSION_RELATIONS, AdapterVersion, now
from . import cas, layout
from .bucket import PART_SIZE, SINGLE_PUT_LIMIT
from .catalogue import RemoteRegistry

ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


def _no_progress(description: str, total: int) -> ContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


def versions_to_push(registry, version: AdapterVersion) -> list[AdapterVersion]:
    """`version` and the versions of this registry it came from (resumed, stacked, promoted), ancestors first."""
    def parents(current: AdapterVersion) -> list[AdapterVersion]:
        return [p for p in (local_parent(registry, edge.to_dict()) for edge in current.parents) if p is not None]

    return layout.ancestors_first(version, lambda v: v.sha256, parents)


def local_parent(registry, edge: dict) -> AdapterVersion | None:
    """The version of this registry a parent edge names (by ref, proven by sha256), or None."""
    if edge["relation"] not in VERSION_RELATIONS:
        return None
    found = registry.find(edge["ref"])
    return found if found is not None and found.sha256 == edge["sha256"] else None


def ensure_marker(remote: RemoteRegistry) -> None:
    """The remote's format marker, written once by the first push; a newer format is refused before any write."""
    got = remote.bucket.get(layout.MARKER)
    if got is None:
        remote.bucket.create(layout.MARKER, layout.canonical({"format": layout.FORMAT, "created_at": now()}))
        return
    doc = layout.parse(got[0], remote.where(layout.MARKER), "restore it: it holds {\"format\": 1}")
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), int) or doc["format"] > layout.FORMAT:
        raise CorruptRegistryError(f"{remote.where(layout.MARKER)} says format {doc.get('format') if isinstance(doc, dict) else '?'}, "
                                   f"which this adapterhub does not write ({layout.FORMAT})", hint="upgrade adapterhub")


def plan(registry, remote: RemoteRegistry, ref: str, with_base: bool = False) -> dict:
    """What a push would send, read from the remote without writing to it (--dry-run)."""
    chain = versions_to_push(registry, registry.resolve(ref))
    steps = []
    for v in chain:
        there = remote.find_weights(v.name, v.sha256)
        blobs = [f.to_dict() for f in v.files if not remote.bucket.head(layout.blob_key(f.sha256))]
        base_files = []
        if with_base and v.base:
            row = registry.bases_by_sha().get(v.base.sha256) or {}
            base_files = [f for f in row.get("files", ()) if not remote.bucket.head(layout.blob_key(f["sha256"]))]
        steps.append({"ref": v.ref, "remote_ref": f"{remote.name}:{there.ref}" if there else None,
                      "blobs": blobs if not there else [], "base_files": base_files})
    return {"ref": chain[-1].ref, "remote": remote.name, "url": remote.remote.url, "versions": steps,
            "bytes": sum(b["size"] for s in steps for b in s["blobs"] + s["base_files"])}


def push(registry, ref: str, remote: RemoteRegistry, with_base: bool = False,
         progress: ProgressFactory = _no_progress) -> dict:
    """Push the version `ref` names, with the lineage it needs, to `remote`; returns a report of what was sent."""
    version = registry.resolve(ref)
    chain = versions_to_push(registry, version)
    ensure_marker(remote)
    names: dict[str, str] = {}  # local ref -> remote ref
    steps = []
    for v in chain:
        steps.append(_push_version(registry, remote, v, names, with_base, progress))
    stats = remote.bucket.stats
    return {"ref": version.ref, "remote": remote.name, "url": remote.remote.url,
            "remote_ref": f"{remote.name}:{names[version.ref]}", "versions": steps,
            "uploaded": {"blobs": sum(len(s["uploaded"]) for s in steps), "bytes": stats.bytes_up},
            "requests": sum(stats.requests.values())}


def _push_version(registry, remote: RemoteRegistry, v: AdapterVersion, names: dict[str, str], with_base: bool,
                  progress: ProgressFactory) -> dict:
    uploaded: list[str] = []
    base_row = registry.bases_by_sha().get(v.base.sha256) if v.base else None
    if v.base and base_row is None:
        raise NotFoundError(f"{v.ref} names base {v.base.name} ({v.base.sha256[:12]}), which is not registered here",
                            hint="run 'adapterhub verify'; register the base with 'adapterhub base add PATH'")
    if with_base and base_row:
        folder = Path(base_row["path"])
        for f in base_row["files"]:
            if send_blob(remote, f["sha256"], folder / f["name"], f["size"], f"base {base_row['name']} file {f['name']}",
                         progress):
                uploaded.append(f["sha256"])
    there = remote.find_weights(v.name, v.sha256)
    if there is not None:
        names[v.ref] = there.ref
        return {"ref": v.ref, "remote_ref": there.remote_ref, "created": False, "uploaded": uploaded}
    for f in v.files:
        if send_blob(remote, f.sha256, registry.objects.path(f.sha256), f.size, f"{f.name} of {v.ref}", progress):
            uploaded.append(f.sha256)
    if base_row:
        _put_document(remote, layout.base_key(v.base.sha256), layout.base_doc(base_row))
    if v.dataset:
        row = next((d for d in registry.datasets() if d["sha256"] == v.dataset.sha256), None)
        if row is not None:
            _put_document(remote, layout.dataset_key(row["sha256"]), layout.dataset_doc(row))
    parents = [{**edge, "ref": names.get(edge["ref"], edge["ref"])} if local_parent(registry, edge) else edge
               for edge in v.record["parents"]]
    body = layout.record_body(v.record, parents)
    data = layout.canonical(body, f"the record of {v.ref}")
    record_sha = layout.sha256_of(data)
    _put_document(remote, layout.record_key(record_sha), data)
    entry = {"record": record_sha, "sha256": v.sha256, "tags": v.tags, "summary": layout.summary(v.record),
             "pushed_at": now(), "pushed_by": cas.who()}

    def commit(doc: dict | None):
        doc = doc or layout.new_refs(v.name)
        same = next((e for e in doc["versions"] if e["sha256"] == v.sha256), None)
        if same is not None:  # another push of these weights committed first: one version, not two
            return None, (same["version"], False)
        number = max((e["version"] for e in doc["versions"]), default=0) + 1
        doc["versions"].append({"version": number, **entry})
        return doc, (number, True)

    number, created = cas.update(remote.bucket, layout.refs_key(v.name), commit, _reader(remote, v.name),
                                 f"push {v.ref}")
    if created:
        _heal(registry, remote, v, record_sha, data, progress)
    names[v.ref] = f"{v.name}@{number}"
    return {"ref": v.ref, "remote_ref": f"{remote.name}:{v.name}@{number}", "created": created, "uploaded": uploaded}


def _reader(remote: RemoteRegistry, name: str):
    return lambda data: layout.parse_refs(data, name, remote.where(layout.refs_key(name)), full=True)


def _put_document(remote: RemoteRegistry, key: str, doc: dict | bytes) -> None:
    """A create-only document; one already there is the same content (its key is its hash), so it is kept."""
    if remote.bucket.head(key) is None:
        remote.bucket.create(key, doc if isinstance(doc, bytes) else layout.canonical(doc, remote.where(key)))


def _heal(registry, remote: RemoteRegistry, v: AdapterVersion, record_sha: str, data: bytes,
          progress: ProgressFactory) -> None:
    """After the commit, what it names must be there: a `verify --remote --repair` running at the same moment may
    have taken a blob this push found and reused for an orphan. Put back whatever is missing."""
    if remote.bucket.head(layout.record_key(record_sha)) is None:
        remote.bucket.create(layout.record_key(record_sha), data)
    for f in v.files:
        if remote.bucket.head(layout.blob_key(f.sha256)) is None:
            send_blob(remote, f.sha256, registry.objects.path(f.sha256), f.size, f"{f.name} of {v.ref}", progress)


def send_blob(remote: RemoteRegistry, sha256: str, path: Path, size: int, what: str, progress: ProgressFactory) -> bool:
    """Upload one blob unless the remote has it or another push is sending it; True when this call sent it.

    The bytes are hashed on the way: a local file that no longer matches its sha256 is refused
    before the upload completes, so a wrong blob never appears under a content address.
    """
    key = layout.blob_key(sha256)

    def send() -> None:
        with progress(f"pushing {what}", size) as advance:
            if size <= SINGLE_PUT_LIMIT:
                data = _read(path, what)
                _check(hashlib.sha256(data).hexdigest(), sha256, path, what)
                remote.bucket.create(key, data)
                advance(len(data))
            else:
                remote.bucket.upload(key, _hashed_chunks(path, sha256, what, advance))

    return cas.upload_once(remote.bucket, sha256, send, renew=size > SINGLE_PUT_LIMIT)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CorruptRegistryError(f"{what} is missing ({path})", hint="run 'adapterhub verify'") from None


def _check(got: str, sha256: str, path: Path, what: str) -> None:
    if got != sha256:
        raise CorruptRegistryError(f"{what} is corrupt: {path} hashes to {got[:12]}, not {sha256[:12]}; nothing was "
                                   "published", hint="run 'adapterhub verify'; re-import the original to repair it")


def _hashed_chunks(path: Path, sha256: str, what: str, advance: Callable[[int], None]) -> Iterator[bytes]:
    """The file in parts, hashed as read; the hash is checked before the last part goes, so a mismatch aborts the upload."""
    digest = hashlib.sha256()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CorruptRegistryError(f"{what} is missing ({path})", hint="run 'adapterhub verify'") from None
    with f:
        chunk = f.read(PART_SIZE)
        while chunk:
            digest.update(chunk)
            following = f.read(PART_SIZE)
            if not following:
                _check(digest.hexdigest(), sha256, path, what)
            yield chunk
            advance(len(chunk))
            chunk = following
