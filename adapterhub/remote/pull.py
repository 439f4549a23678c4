"""`pull REMOTE:REF [--name NAME]`: a remote version, with the versions it came from, into the local registry.

Check everything, then write. Every record is proven by its hash, every blob is hashed as
it streams into the object store's staging area, the weights are read as an import reads
them (header, dtypes, values) and must say what the record says, and the base and dataset
fingerprints must re-derive their own hashes. Only then, under the registry lock: blobs,
base and dataset rows, and the version records last, ancestors first, each numbered by this
registry. A refused pull leaves the registry as it was; a killed one leaves orphan blobs.

A version whose base is not on this machine is still registered: its base is registered
from the remote's fingerprint (so `check` and `compat` can work), under the remote address
as its path, and the report says which base it needs.
"""

from __future__ import annotations

from pathlib import Path

from .. import naming
from ..bases import local_folder, unique_name
from ..errors import CorruptRegistryError, IncompatibleError
from ..files import read_json
from ..formats import mlx as mlx_format
from ..records import base_ref, now
from ..safetensors_io import read_header
from ..schemas import validate
from ..objects import StagedBlob
from . import layout
from .catalogue import RemoteRegistry, RemoteVersion
from .push import ProgressFactory, _no_progress


def remote_chain(remote: RemoteRegistry, target: RemoteVersion,
                 parents: dict[tuple[str, str], str] | None = None) -> list[RemoteVersion]:
    """`target` and the remote versions it came from (parents this remote holds, proven by sha256), ancestors first.

    `parents`, when given, is filled with (edge ref, edge sha256) -> the parent's remote ref.
    """
    def found(current: RemoteVersion) -> list[RemoteVersion]:
        held = []
        for edge in current.record["parents"]:
            parent = remote.parent(edge)
            if parent is not None:
                held.append(parent)
                if parents is not None:
                    parents[edge["ref"], edge["sha256"]] = parent.remote_ref
        return held

    return layout.ancestors_first(target, lambda v: v.entry["sha256"], found)


def pull(registry, remote: RemoteRegistry, ref: str, name: str | None = None, base: str | Path | None = None,
         progress: ProgressFactory = _no_progress) -> dict:
    """Pull the version `ref` names in `remote` (as `name`, else its remote name) with its lineage; returns a report."""
    registry.require()
    target = remote.resolve(ref)
    parents: dict[tuple[str, str], str] = {}
    chain = remote_chain(remote, target, parents)
    local_name = {rv.remote_ref: (name if name and rv.name == target.name else rv.name) for rv in chain}
    for rv in chain:
        naming.check_name(local_name[rv.remote_ref], registry.policy, rv.entry["tags"],
                          (rv.record.get("base") or {}).get("name"))
    given_base = _given_base(registry, base, target) if base is not None else None
    staged: dict[str, StagedBlob] = {}
    try:
        docs = {}
        for rv in chain:
            if _local_match(registry, local_name[rv.remote_ref], rv.entry["sha256"]) is None:
                _fetch(registry, remote, rv, staged, progress)
                docs[rv.remote_ref] = _fingerprints(registry, remote, rv, given_base)
        pulled: dict[str, str] = {}  # remote ref -> local ref
        with registry.transaction():
            steps = []
            for rv in chain:
                steps.append(_register(registry, remote, rv, local_name[rv.remote_ref], staged, docs.get(rv.remote_ref),
                                       given_base, {k: pulled[v] for k, v in parents.items() if v in pulled}))
                pulled[rv.remote_ref] = steps[-1]["local_ref"]
    finally:
        for blob in staged.values():
            blob.path.unlink(missing_ok=True)  # gone already when adopted
    final = steps[-1]
    record_base = target.record.get("base")
    base_row = registry.bases_by_sha().get(record_base["sha256"]) if record_base else None
    return {"ref": target.remote_ref, "local_ref": final["local_ref"], "sha256": target.entry["sha256"],
            "created": final["created"], "versions": steps,
            "base": None if base_row is None else {**base_ref(base_row), "hf_repo": base_row.get("hf_repo"),
                                                   "local": local_folder(base_row) is not None},
            "downloaded": {"bytes": remote.bucket.stats.bytes_down}}


def _local_match(registry, name: str, sha256: str):
    versions, aliases, _ = registry.catalogue.entry(name)
    same = next((v for v in versions if v["sha256"] == sha256), None)
    return registry.version_of(same, aliases) if same else None


def _given_base(registry, base: str | Path, target: RemoteVersion):
    resolved = registry.resolve_base(base)
    wanted = target.record.get("base")
    if wanted and resolved.sha256 != wanted["sha256"]:
        raise IncompatibleError(f"{target.remote_ref} was trained on base {wanted['name']} ({wanted['sha256'][:12]}), "
                                f"but {base} is {resolved.sha256[:12]}",
                                hint="give the base it was trained on, or leave --base out to register its fingerprint")
    return resolved


def _fetch(registry, remote: RemoteRegistry, rv: RemoteVersion, staged: dict[str, StagedBlob],
           progress: ProgressFactory) -> None:
    """Download the version's blobs into staging, hash-checked, and read the weights as an import would."""
    for f in rv.record["files"]:
        if f["sha256"] in staged or _have(registry, f["sha256"]):
            continue
        key = layout.blob_key(f["sha256"])
        with progress(f"pulling {f['name']} of {rv.remote_ref}", f["size"]) as advance:
            blob = registry.objects.stage(_counted(remote.bucket.stream(key), advance))
        staged[f["sha256"]] = blob
        if blob.sha256 != f["sha256"]:
            raise CorruptRegistryError(f"remote object {remote.where(key)} is corrupt: its bytes hash to {blob.sha256[:12]}, "
                                       f"not {f['sha256'][:12]}; nothing was registered",
                                       hint=f"push {rv.ref} again from a registry that has it, then run "
                                            f"'adapterhub verify --remote {remote.name}'")
    paths = {f["name"]: (staged[f["sha256"]].path if f["sha256"] in staged else registry.objects.path(f["sha256"]))
             for f in rv.record["files"]}
    config = read_json(paths[mlx_format.CONFIG_FILE])
    validate(config, "mlx_adapter_config", what=f"the adapter config of {rv.remote_ref}")
    weights = paths[mlx_format.WEIGHTS_FILE]
    parsed = mlx_format.derive(Path(mlx_format.CONFIG_FILE), weights, config, read_header(weights))
    said = {"kind": parsed.kind, "rank": parsed.rank, "layers": list(parsed.layers), "targets": list(parsed.targets)}
    for field, value in said.items():
        if rv.record.get(field) != value:
            raise CorruptRegistryError(f"{rv.remote_ref}: its record says {field} {rv.record.get(field)!r} but its weights "
                                       f"say {value!r}; nothing was registered",
                                       hint=f"run 'adapterhub verify --remote {remote.name}'")


def _have(registry, sha256: str) -> bool:
    """Whether the local store holds these bytes already (re-hashed: a damaged local blob is fetched again)."""
    if not registry.objects.has(sha256):
        return False
    try:
        registry.objects.verified(sha256)
    except CorruptRegistryError:
        return False
    return True


def _counted(chunks, advance):
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


def _fingerprints(registry, remote: RemoteRegistry, rv: RemoteVersion, given_base) -> dict:
    """The base and dataset fingerprints this version needs and this registry lacks, read and proven."""
    found = {}
    b, d = rv.record.get("base"), rv.record.get("dataset")
    needed = {"base": b and b["sha256"] not in registry.bases_by_sha() and not (given_base and given_base.sha256 == b["sha256"]),
              "dataset": d and not any(row["sha256"] == d["sha256"] for row in registry.datasets())}
    for kind, ref, read, key in (("base", b, remote.base_doc, layout.base_key), ("dataset", d, remote.dataset_doc, layout.dataset_key)):
        if not needed[kind]:
            continue
        doc = read(ref["sha256"])
        if doc is None:
            raise CorruptRegistryError(f"{rv.remote_ref} names {kind} {ref['name']} ({ref['sha256'][:12]}), which "
                                       f"{remote.where(key(ref['sha256']))} does not hold",
                                       hint=f"run 'adapterhub verify --remote {remote.name}'; push the version again")
        found[kind] = doc
    return found


def _register(registry, remote: RemoteRegistry, rv: RemoteVersion, name: str, staged: dict[str, StagedBlob],
              docs: dict | None, given_base, parents: dict[tuple[str, str], str]) -> dict:
    """Under the lock: this version's blobs, base and dataset rows, then its record (or the version already here)."""
    existing = _local_match(registry, name, rv.entry["sha256"])
    if existing is not None:
        return {"ref": rv.remote_ref, "local_ref": existing.ref, "created": False}
    for f in rv.record["files"]:
        if f["sha256"] in staged and staged[f["sha256"]].path.exists():
            registry.objects.adopt(staged[f["sha256"]].path, f["sha256"])
    record = dict(rv.record)
    if record.get("base"):
        record["base"] = _base_row(registry, remote, record["base"], (docs or {}).get("base"), given_base)
    if record.get("dataset"):
        row = _dataset_row(registry, remote, record["dataset"], (docs or {}).get("dataset"))
        record["dataset"] = {**record["dataset"], "name": row["name"]}
    versions, _, removed = registry.catalogue.entry(name)
    number = max([v["version"] for v in versions] + list(removed), default=0) + 1
    record.update(name=name, version=number, parents=[{**e, "ref": parents.get((e["ref"], e["sha256"]), e["ref"])} for e in record["parents"]],
                  source={"path": remote.where(layout.record_key(rv.entry["record"])), "format": "mlx", "checkpoint": None,
                          "remote": remote.name, "ref": rv.remote_ref, "record": rv.entry["record"], "pulled_at": now(),
                          "origin": rv.record.get("source")})
    registry.register_records([record])
    return {"ref": rv.remote_ref, "local_ref": f"{name}@{number}", "created": True}


def _base_row(registry, remote: RemoteRegistry, wanted: dict, doc: dict | None, given_base) -> dict:
    known = registry.bases_by_sha().get(wanted["sha256"])
    if known is None and given_base is not None and given_base.sha256 == wanted["sha256"]:
        known = registry.register_base_row(given_base.fingerprint, None, given_base.path)
    if known is None:
        taken = {b["name"] for b in registry.bases()}
        name = doc["name"] if doc["name"] not in taken and naming.broken_rule(doc["name"]) is None \
            else unique_name(naming.suggest_name(doc["name"]), taken)
        # Not on this machine: the fingerprint is enough for check and compat; the path says where it came from.
        fingerprint = {**doc, "path": remote.where(layout.base_key(wanted["sha256"]))}
        known = registry.register_base_row(fingerprint, name, Path(fingerprint["path"]))
    return {**wanted, "name": known["name"]}


def _dataset_row(registry, remote: RemoteRegistry, wanted: dict, doc: dict | None) -> dict:
    known = next((d for d in registry.datasets() if d["sha256"] == wanted["sha256"]), None)
    if known is not None:
        return known
    fingerprint = {k: v for k, v in doc.items() if k not in ("name", "created_at")}
    fingerprint["path"] = remote.where(layout.dataset_key(wanted["sha256"]))
    return registry.register_dataset_row(fingerprint, Path(doc["name"]))
