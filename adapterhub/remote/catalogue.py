"""A remote registry read and changed through its bucket: resolve refs, list, show, alias, tag.

Reads take no lock: every object but a refs document is immutable and proves itself by its
hash, and a refs document is replaced whole. Aliases and tags change by compare-and-swap
(cas.update), so two people promoting at once never lose a write, and `--expect` turns a
concurrent promotion into a conflict that names the winner.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .. import naming
from ..errors import ConflictError, CorruptRegistryError, InvalidNameError, NotFoundError
from ..records import VERSION_RELATIONS, AdapterVersion, now
from . import cas, layout
from .bucket import Bucket
from .config import Remote, Remotes


@dataclass(frozen=True)
class RemoteVersion:
    """One version in a remote: its name, its refs entry, the refs document it came from, and its record."""

    remote: str
    name: str
    entry: dict
    refs: dict
    view: AdapterVersion

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.entry['version']}"

    @property
    def remote_ref(self) -> str:
        return f"{self.remote}:{self.ref}"

    @property
    def record(self) -> dict:
        return self.view.record


@dataclass(frozen=True)
class Listed:
    """A version as `list --remote` shows it, from its refs document alone (no record read)."""

    name: str
    entry: dict
    aliases: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.entry['version']}"


class RemoteRegistry:
    """The registry kept in one remote's bucket prefix."""

    def __init__(self, remote: Remote, bucket: Bucket):
        self.remote = remote
        self.bucket = bucket
        self._bodies: dict[str, dict] = {}

    @classmethod
    def open(cls, registry, name: str) -> "RemoteRegistry":
        remote = Remotes(registry).get(name)
        return cls(remote, Bucket(remote))

    @property
    def name(self) -> str:
        return self.remote.name

    def where(self, key: str = "") -> str:
        return self.bucket.where(key)

    # ---- refs documents -------------------------------------------------------

    def refs(self, name: str, full: bool = True) -> dict | None:
        got = self.bucket.get(layout.refs_key(name)) if naming.broken_rule(name) is None else None
        return layout.parse_refs(got[0], name, self.where(layout.refs_key(name)), full) if got else None

    def names(self) -> list[str]:
        return sorted(m.key[len("refs/"):-len(".json")] for m in self.bucket.list("refs/")
                      if m.key.endswith(".json") and naming.broken_rule(m.key[len("refs/"):-len(".json")]) is None)

    def all_refs(self, names: list[str]) -> dict[str, dict]:
        """Many refs documents at once (a listing, a sha prefix); ones deleted since the listing are skipped."""
        found = self.bucket.get_many([layout.refs_key(n) for n in names])
        return {n: layout.parse_refs(found[layout.refs_key(n)], n, self.where(layout.refs_key(n)))
                for n in names if found[layout.refs_key(n)] is not None}

    # ---- records --------------------------------------------------------------

    def body(self, sha256: str) -> dict:
        """A version record's stored body, proven by its hash."""
        if sha256 not in self._bodies:
            key = layout.record_key(sha256)
            got = self.bucket.get(key)
            if got is None:
                raise CorruptRegistryError(f"record {self.where(key)} is missing", hint=self._verify_hint)
            self._bodies[sha256] = layout.check_record(got[0], sha256, self.where(key))
        return self._bodies[sha256]

    def bodies(self, shas: list[str]) -> dict[str, dict]:
        wanted = sorted(set(shas) - set(self._bodies))
        found = self.bucket.get_many([layout.record_key(s) for s in wanted])
        for sha in wanted:
            data = found[layout.record_key(sha)]
            if data is None:
                raise CorruptRegistryError(f"record {self.where(layout.record_key(sha))} is missing", hint=self._verify_hint)
            self._bodies[sha] = layout.check_record(data, sha, self.where(layout.record_key(sha)))
        return {s: self._bodies[s] for s in shas}

    @property
    def _verify_hint(self) -> str:
        return f"run 'adapterhub verify --remote {self.name}'"

    def version(self, name: str, entry: dict, refs: dict, validate_record: bool = True) -> RemoteVersion:
        body = self.body(entry["record"])
        view = layout.version_view(name, entry, body, refs["aliases"])
        where = f"{self.name}:{name}@{entry['version']}"
        if validate_record:
            from ..errors import SchemaError
            from ..schemas import validate

            try:
                validate(view.record, "adapter_version", what=f"the record of {where}")
            except SchemaError as e:
                raise CorruptRegistryError(e.message, hint=self._verify_hint) from None
        files = {f["name"]: f["sha256"] for f in body["files"]}
        if not (entry["sha256"] == body.get("sha256") == files.get("adapters.safetensors")):
            raise CorruptRegistryError(f"{where}: its refs entry names weights {entry['sha256'][:12]} but its record "
                                       f"{str(body.get('sha256'))[:12]}", hint=self._verify_hint)
        return RemoteVersion(self.name, name, entry, refs, view)

    # ---- resolving --------------------------------------------------------------

    def resolve(self, ref: str) -> RemoteVersion:
        """The version a ref names in this remote: `name`, `name@3`, `name@alias`, or a sha256 prefix."""
        parsed = naming.parse_ref(ref)
        refs = self.refs(parsed.name) if parsed.name else None
        if refs is not None and refs["versions"]:
            return self.version(parsed.name, _pick(self.name, refs, parsed), refs)
        if parsed.sha_prefix:
            docs = self.all_refs(self.names())
            found = [(n, e) for n, doc in docs.items() for e in doc["versions"] if e["sha256"].startswith(parsed.sha_prefix)]
            if len(found) == 1:
                return self.version(found[0][0], found[0][1], docs[found[0][0]])
            if len(found) > 1:
                raise NotFoundError(f"sha256 prefix '{parsed.sha_prefix}' matches {len(found)} versions in remote "
                                    f"'{self.name}': " + ", ".join(f"{n}@{e['version']}" for n, e in found[:5]),
                                    hint="give a longer prefix or NAME@VERSION", kind="ambiguous-sha", key=ref)
        raise NotFoundError(f"remote '{self.name}' has no adapter '{ref}'",
                            hint=f"run 'adapterhub list --remote {self.name}' to see what it holds", kind="adapter", key=ref)

    def parent(self, edge: dict) -> RemoteVersion | None:
        """The version of this remote a parent edge names (`name@N`, proven by sha256), or None."""
        if edge["relation"] not in VERSION_RELATIONS or "@" not in edge["ref"]:
            return None
        try:
            parsed = naming.parse_ref(edge["ref"])
        except (InvalidNameError, NotFoundError):
            return None  # a ref no version of any registry can have
        refs = self.refs(parsed.name) if parsed.version is not None else None
        entry = next((e for e in (refs or {}).get("versions", ()) if e["version"] == parsed.version), None)
        if entry is None or entry["sha256"] != edge["sha256"]:
            return None
        return self.version(parsed.name, entry, refs)

    def find_weights(self, name: str, sha256: str) -> RemoteVersion | None:
        """The version of `name` holding these weights, if the remote has one."""
        refs = self.refs(name)
        entry = next((e for e in (refs or {}).get("versions", ()) if e["sha256"] == sha256), None)
        return self.version(name, entry, refs) if entry else None

    # ---- listing ----------------------------------------------------------------

    def list(self, base: str | None = None, kind: str | None = None, tags: dict[str, str] | None = None,
             name_glob: str | None = None) -> list[Listed]:
        """Versions matching every filter, by name then version, from one read per refs document."""
        names = self.names()
        if name_glob:
            names = [n for n in names if fnmatch.fnmatchcase(n, name_glob)]
        listed = []
        for name, refs in sorted(self.all_refs(names).items()):
            for entry in sorted(refs["versions"], key=lambda e: e["version"]):
                s = entry["summary"] if isinstance(entry.get("summary"), dict) else {}
                b = s.get("base") or {}
                if base and not (b.get("name") == base or (len(base) >= 12 and str(b.get("sha256", "")).startswith(base))):
                    continue
                if kind and s.get("kind") != kind:
                    continue
                if tags and any(entry["tags"].get(k) != v for k, v in tags.items()):
                    continue
                aliases = tuple(sorted(a for a, t in refs["aliases"].items() if t["version"] == entry["version"]))
                listed.append(Listed(name, entry, aliases))
        return listed

    def views(self, listed: list[Listed]) -> list[AdapterVersion]:
        """Full records for listed versions (for --json and sorting), read concurrently."""
        bodies = self.bodies([item.entry["record"] for item in listed])
        return [AdapterVersion(layout.compose(item.name, item.entry, bodies[item.entry["record"]]), item.aliases)
                for item in listed]

    def base_doc(self, sha256: str) -> dict | None:
        got = self.bucket.get(layout.base_key(sha256))
        return layout.check_base(got[0], sha256, self.where(layout.base_key(sha256))) if got else None

    def dataset_doc(self, sha256: str) -> dict | None:
        got = self.bucket.get(layout.dataset_key(sha256))
        return layout.check_dataset(got[0], sha256, self.where(layout.dataset_key(sha256))) if got else None

    # ---- aliases and tags ---------------------------------------------------------

    def _read_refs(self, name: str):
        return lambda data: layout.parse_refs(data, name, self.where(layout.refs_key(name)), full=True)

    def alias(self, ref: str, alias: str, expect: str | None = None) -> RemoteVersion:
        """Point `name@alias` at the version `ref` names, by compare-and-swap.

        Args:
            expect: the version the alias must point at now (`NAME@N`, `N`, another alias, or `none` for
                an alias that must not exist yet); anything else is a conflict that names who moved it.
        """
        naming.check_alias(alias)
        target = self.resolve(ref)
        name, number = target.name, target.entry["version"]

        def change(doc: dict | None):
            if doc is None or not any(e["version"] == number for e in doc["versions"]):
                raise NotFoundError(f"{self.name}:{name}@{number} is gone from the remote", hint=self._verify_hint)
            current = doc["aliases"].get(alias)
            if expect is not None:
                wanted = None if expect == "none" else _pick(self.name, doc, _expect_ref(name, expect)).get("version")
                if (current or {}).get("version") != wanted:
                    raise ConflictError(_moved(self.name, name, alias, current, expect),
                                        hint=f"someone else moved it first; re-run with --expect "
                                             f"{name}@{current['version'] if current else 'none'} to move it anyway")
            if current and current["version"] == number:
                return None, None
            doc["aliases"][alias] = {"version": number, "set_at": now(), "set_by": cas.who()}
            return doc, None

        cas.update(self.bucket, layout.refs_key(name), change, self._read_refs(name), f"alias {name}@{alias}")
        return self.resolve(f"{name}@{number}")

    def tag(self, ref: str, key: str, value: str) -> RemoteVersion:
        naming.check_tags({key: value})
        target = self.resolve(ref)
        name, number = target.name, target.entry["version"]

        def change(doc: dict | None):
            entry = next((e for e in (doc or {}).get("versions", ()) if e["version"] == number), None)
            if entry is None:
                raise NotFoundError(f"{self.name}:{name}@{number} is gone from the remote", hint=self._verify_hint)
            if entry["tags"].get(key) == value:
                return None, None
            entry["tags"][key] = value
            return doc, None

        cas.update(self.bucket, layout.refs_key(name), change, self._read_refs(name), f"tag {name}@{number}")
        return self.resolve(f"{name}@{number}")


def _pick(remote: str, refs: dict, parsed: naming.Ref) -> dict:
    """The refs entry a parsed ref names in one refs document."""
    name = refs["name"]
    by_number = {e["version"]: e for e in refs["versions"]}
    latest = max(by_number, default=0)
    if parsed.alias:
        target = refs["aliases"].get(parsed.alias)
        if target is None:
            known = ", ".join(sorted(refs["aliases"])) or "none"
            raise NotFoundError(f"adapter '{name}' in remote '{remote}' has no alias '{parsed.alias}' (aliases: {known})",
                                hint=f"run 'adapterhub show {remote}:{name}'", kind="alias", key=parsed.text)
        wanted = target["version"]
    else:
        wanted = parsed.version if parsed.version is not None else latest
    if wanted not in by_number:
        raise NotFoundError(f"adapter '{name}' in remote '{remote}' has no version {wanted} (latest is {latest})",
                            hint=f"run 'adapterhub list --remote {remote} --name {name}'", kind="version", key=parsed.text)
    return by_number[wanted]


def _expect_ref(name: str, expect: str) -> naming.Ref:
    """--expect as a ref of `name`: `3`, `name@3`, `name@prod`, `REMOTE:name@3`."""
    text = expect.partition(":")[2] if ":" in expect else expect
    text = f"{name}@{text}" if "@" not in text and text != name else text
    parsed = naming.parse_ref(text)
    if parsed.name != name:
        raise ConflictError(f"--expect {expect} names another adapter than '{name}'", hint=f"give --expect {name}@VERSION")
    return parsed


def _moved(remote: str, name: str, alias: str, current: dict | None, expect: str) -> str:
    if current is None:
        return f"{remote}:{name}@{alias} does not exist (expected it at {expect})"
    return (f"{remote}:{name}@{alias} points at {name}@{current['version']}, set by {current['set_by']} at "
            f"{current['set_at']}, not at {expect}")
