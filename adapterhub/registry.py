"""`Registry(root)`: the single code path that creates, resolves, lists and removes adapter versions.

The layout on disk is in registry/README.md. A write puts files first, index rows next and
the version record last, so a process killed at any point leaves at worst an orphan blob or
a stale index row, which readers skip and `verify` reports without failing.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from . import compat, naming
from .errors import ConflictError, CorruptRegistryError, InvalidNameError, NotFoundError
from .fingerprint import HashCache
from .formats import mlx as mlx_format
from .migrations import FORMAT, upgrade
from .records import AdapterVersion, now, weights_claim_problem
from .safetensors_io import read_header
from .schemas import validate
from .bases import BaseModels
from .foreign import ForeignFolders
from .files import read_json, write_json
from .intake import Intake
from .outputs import Outputs
from .runs import TrainingRuns
from .objects import ObjectStore
from .store import MODEL_EVALS, Catalogue, RegistryLock

# A byte-progress factory: (description, total bytes) -> context manager yielding advance(n).
ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


def _no_progress(description: str, total: int) -> ContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


class Registry(Intake, BaseModels, TrainingRuns, Outputs, ForeignFolders):
    """A registry rooted at a folder. Every method is one user-level operation.

    The façade: adapter versions live here; bases and datasets (bases.py), training runs
    (runs.py), outputs (outputs.py) and PEFT or exported folders (foreign.py) are its parts; the catalogue's TinyDB files sit
    behind store.Catalogue, the blobs behind store.ObjectStore.
    """

    def __init__(self, root: Path | str, progress: ProgressFactory = _no_progress, hash_cache: HashCache | None = None):
        self.root = Path(root).expanduser()
        self.objects = ObjectStore(self.root / "objects")
        self.catalog = self.root / "catalog"
        self.catalogue = Catalogue(self.catalog)
        self._lock = RegistryLock(self.root / "registry.lock")
        self._progress = progress
        self._hash_cache = hash_cache
        self._format_checked = False

    # ---- set-up -------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return (self.root / "registry.json").is_file()

    def init(self) -> bool:
        """Create the registry layout; returns False when it already existed (upgrading an older format)."""
        if self.initialized:
            self._current_format()
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock.hold():
            if self.initialized:
                return False
            for folder in (self.objects.root / "tmp", self.catalog / "adapters", self.catalog / "sha", self.catalog / "by-base"):
                folder.mkdir(parents=True, exist_ok=True)
            if not (self.root / "policy.json").exists():
                write_json(self.root / "policy.json", naming.Policy().to_dict())
            from .version import __version__

            write_json(self.root / "registry.json", {"format": FORMAT, "created_at": now(), "adapterhub_version": __version__})
        return True

    def require(self) -> None:
        """Reading a registry that is not there is a mistake (a typo in --registry), not an empty answer."""
        if not self.initialized:
            self._marker()
        self._current_format()

    def _current_format(self) -> None:
        """Upgrade a registry written in an older format, once, under the lock; refuse a newer one."""
        if self._format_checked:
            return
        marker = self._marker()
        if marker["format"] > FORMAT:
            from .version import __version__

            raise CorruptRegistryError(f"{self.root} is in format {marker['format']}, newer than this adapterhub "
                                       f"({__version__}) reads ({FORMAT})", hint="upgrade adapterhub")
        if marker["format"] < FORMAT:
            with self._lock.hold():
                upgrade(self, self._marker())
        self._format_checked = True

    def _marker(self, full: bool = False) -> dict:
        """registry.json; `full` checks it against its schema (verify), otherwise only what reads need,
        so `list` and `show` never import jsonschema."""
        path = self.root / "registry.json"
        marker = read_json(path)
        if marker is None:
            raise NotFoundError(f"no registry at {self.root}", hint=f"run 'adapterhub init {self.root}'",
                                kind="registry", key=self.root)
        if full:
            validate(marker, "registry", what=str(path))
        elif not (isinstance(marker, dict) and isinstance(marker.get("format"), int) and not isinstance(marker["format"], bool)):
            raise CorruptRegistryError(f"{path} is damaged: it has no format number",
                                       hint="restore it from a backup; then run 'adapterhub verify'")
        return marker

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the registry lock; create the registry on first write, as `git init` would be tedious."""
        self.init()
        with self._lock.hold():
            yield

    @property
    def policy(self) -> naming.Policy:
        doc = read_json(self.root / "policy.json", {}) or {}
        validate(doc, "policy", what=str(self.root / "policy.json"))
        return naming.Policy.from_dict(doc)

    def set_policy(self, policy: naming.Policy) -> None:
        with self.transaction():
            doc = policy.to_dict()
            validate(doc, "policy")
            write_json(self.root / "policy.json", doc)

    # ---- catalogue entries --------------------------------------------------

    def _entry(self, name: str) -> tuple[list[dict], dict[str, int]]:
        """A name's versions and aliases, from one read of its catalogue file."""
        versions, aliases, _ = self.catalogue.entry(name)
        return versions, aliases

    def _versions(self, name: str) -> list[dict]:
        return self._entry(name)[0]

    def _names(self) -> list[str]:
        return self.catalogue.names()

    def version_of(self, record: dict, aliases: dict[str, int] | None = None) -> AdapterVersion:
        aliases = self._entry(record["name"])[1] if aliases is None else aliases
        return AdapterVersion(record, tuple(sorted(a for a, v in aliases.items() if v == record["version"])))

    # ---- adapters -----------------------------------------------------------

    def resolve(self, ref: str) -> AdapterVersion:
        """The version a ref names: `name`, `name@3`, `name@alias`, or a sha256 prefix."""
        self.require()
        parsed = naming.parse_ref(ref)
        versions, aliases, removed = self.catalogue.entry(parsed.name) if parsed.name else ([], {}, {})
        if parsed.version in removed:
            gone = removed[parsed.version]
            raise NotFoundError(f"{parsed.name}@{parsed.version} was removed at {gone['removed_at']} "
                                f"(it was sha256 {gone['sha256'][:12]}); its number is never reused",
                                hint=f"run 'adapterhub list --name {parsed.name}' for the versions that remain",
                                kind="removed-version", key=ref)
        if versions:
            latest = max(v["version"] for v in versions)
            wanted = parsed.version if parsed.version is not None else (aliases.get(parsed.alias) if parsed.alias else latest)
            if parsed.alias and wanted is None:
                known = ", ".join(sorted(aliases)) or "none"
                raise NotFoundError(f"adapter '{parsed.name}' has no alias '{parsed.alias}' (aliases: {known})",
                                    hint=f"run 'adapterhub show {parsed.name}'", kind="alias", key=ref)
            for v in versions:
                if v["version"] == wanted:
                    return self.version_of(v, aliases)
            raise NotFoundError(f"adapter '{parsed.name}' has no version {wanted} (latest is {latest})",
                                hint=f"run 'adapterhub list --name {parsed.name}'", kind="version", key=ref)
        if parsed.sha_prefix:
            found = self._by_sha_prefix(parsed.sha_prefix)
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise NotFoundError(f"sha256 prefix '{parsed.sha_prefix}' matches {len(found)} versions: "
                                    + ", ".join(v.ref for v in found[:5]), hint="give a longer prefix or NAME@VERSION",
                                    kind="ambiguous-sha", key=ref)
        raise NotFoundError(f"no adapter '{ref}'", hint="run 'adapterhub list' to see what is registered", kind="adapter", key=ref)

    def find(self, ref: str) -> AdapterVersion | None:
        """The version `ref` names, or None when there is none. Damage (a corrupt catalogue file, a lock
        timeout) still raises: only "not there" is an answer a caller may take quietly."""
        try:
            return self.resolve(ref)
        except (NotFoundError, InvalidNameError) as e:
            if getattr(e, "kind", None) == "ambiguous-sha":
                raise
            return None

    def _by_sha_prefix(self, prefix: str) -> list[AdapterVersion]:
        found = {}
        for row in self.catalogue.sha_rows(prefix, mlx_format.WEIGHTS_FILE):
            # Rows are written before their record; one without a record is a leftover, not a version.
            record = next((v for v in self._versions(row["name"]) if v["version"] == row["version"]), None)
            if record and record["sha256"] == row["sha256"]:
                found[(row["name"], row["version"])] = self.version_of(record)
        return list(found.values())

    def list(self, base: str | None = None, kind: str | None = None, tags: dict[str, str] | None = None,
             name_glob: str | None = None) -> list[AdapterVersion]:
        """Versions matching every filter given, by name then version."""
        self.require()
        if base:
            base_sha = self.base(base)["sha256"]
            names = sorted(self.catalogue.names_on_base(base_sha))
        else:
            base_sha, names = None, self._names()
        if name_glob:
            names = [n for n in names if fnmatch.fnmatchcase(n, name_glob)]
        result = []
        for name in names:
            versions, aliases = self._entry(name)
            for record in versions:
                if base_sha and (record.get("base") or {}).get("sha256") != base_sha:
                    continue
                if kind and record["kind"] != kind:
                    continue
                if tags and any(record["tags"].get(k) != v for k, v in tags.items()):
                    continue
                result.append(self.version_of(record, aliases))
        return result

    def weights(self, version: AdapterVersion) -> Path:
        """The path of a version's weights, for reading them: its record's claim and the blob's bytes checked first.

        Listing, showing and removing a version never read its weights, so a damaged record
        stays visible and removable; everything that uses the tensors comes through here.
        """
        _check_weights_claim(version.record)
        return self.objects.verified(version.sha256, f"weights of {version.ref}")

    def modules(self, version: AdapterVersion, weights: Path | None = None) -> dict[str, tuple[int, ...]]:
        """Module path -> (in, out) or (in, out, experts): recorded at import; from the weight header for records
        written before versions recorded it (`weights`: the blob's path when the caller has just verified it)."""
        if version.modules is not None:
            return version.modules
        header = read_header(weights or self.weights(version))
        config = self.objects.verified(version.file_sha(mlx_format.CONFIG_FILE), f"config of {version.ref}")
        return mlx_format.derive(config, header.path, read_json(config), header, check_values=False).modules

    def check(self, ref: str, base: str | Path, allow_different_weights: bool = False) -> compat.CompatReport:
        """Compatibility report of an adapter with a base given as a path or a registered name."""
        version = self.resolve(ref)
        weights = self.weights(version)  # a check passes only for weights that are still the registered bytes
        base_fp = self.resolve_base(base).fingerprint
        recorded = version.record.get("base")
        recorded_full = self.bases_by_sha().get(recorded["sha256"]) if recorded else None
        adapter_base = {**recorded, "config": recorded_full["config"]} if recorded and recorded_full else recorded
        shape = compat.AdapterShape(version.ref, self.modules(version, weights), version.layers, adapter_base,
                                    recorded_full["files"] if recorded_full else None,
                                    (version.record.get("loreft") or {}).get("hidden_size"))
        return compat.check(shape, str(base), base_fp, allow_different_weights)

    def alias(self, ref: str, alias: str) -> AdapterVersion:
        """Point `name@alias` at the version `ref` names (aliases move, versions do not)."""
        naming.check_alias(alias)
        with self.transaction():
            version = self.resolve(ref)
            self.catalogue.set_alias(version.name, alias, version.version)
            return self.resolve(version.ref)

    def tag(self, ref: str, key: str, value: str) -> AdapterVersion:
        naming.check_tags({key: value})
        with self.transaction():
            version = self.resolve(ref)
            record = {**version.record, "tags": {**version.tags, key: value}}
            validate(record, "adapter_version", what=f"record for {version.ref}")
            self.catalogue.update_version(version.name, version.version, {"tags": record["tags"]})
            return self.resolve(version.ref)

    def children(self, version: AdapterVersion) -> list[str]:
        """Refs of versions that list `version` as a parent. A full scan: rm is rare, the index is not worth it."""
        return [f"{r['name']}@{r['version']}" for name in self._names() for r in self._versions(name)
                if any(p["sha256"] == version.sha256 and p["ref"] == version.ref for p in r["parents"])]

    def remove(self, ref: str, force: bool = False) -> AdapterVersion:
        """Remove one version; refused while others name it as parent, unless forced.

        Its number is kept as removed (with its sha256), so it is never given to other bytes.
        """
        with self.transaction():
            version = self.resolve(ref)
            dependants = self.children(version)
            if dependants and not force:
                raise ConflictError(f"{version.ref} is the parent of {', '.join(dependants[:5])}",
                                    hint="remove those first, or pass --force to keep them with a dangling parent")
            for sha in self.catalogue.drop_version(version.record, now()):
                self.objects.remove(sha)
            return version

    # ---- evaluations --------------------------------------------------------

    def record_eval(self, row: dict) -> dict:
        """Append one evaluation (schemas/evaluation.schema.json) to what it evaluated: an adapter version's
        catalogue file, or the rows of base and fused models. Rows are never changed or removed."""
        subject = row.get("subject") or {}
        validate(row, "evaluation", what=f"evaluation of {subject.get('ref') or subject.get('name')}")
        with self.transaction():
            if subject["kind"] == "adapter":
                # Under the lock: the version may have been removed since it was evaluated.
                version = self.resolve(subject["ref"])
                if version.sha256 != subject["sha256"]:
                    raise ConflictError(f"{version.ref} is no longer the weights that were evaluated "
                                        f"({subject['sha256'][:12]})", hint="evaluate it again")
                self.catalogue.add_eval(version.name, row)
            else:
                self.catalogue.add_model_eval(row)
        return row

    def evaluations(self, subject: AdapterVersion | str) -> list[dict]:
        """Evaluations recorded on a version, or on the base or fused model with this sha256; oldest first."""
        self.require()
        if isinstance(subject, AdapterVersion):
            rows = [r for r in self.catalogue.evals(subject.name)
                    if isinstance(r.get("subject"), dict) and r["subject"].get("sha256") == subject.sha256]
            where = self.catalogue.adapter_path(subject.name)
        else:
            rows, where = self.catalogue.model_evals(subject), self.catalog / MODEL_EVALS
        for row in rows:
            validate(row, "evaluation", what=f"an evaluation in {where}")
        return rows

    # ---- integrity ----------------------------------------------------------

    def verify(self):
        """Every record against its schema and the catalogue's invariants, every blob re-hashed."""
        from .integrity import verify

        if not self.initialized:
            self._marker()  # no registry here: say so, rather than report it as damage
        return verify(self)

    def repair(self):
        """Remove what interrupted writes left (orphan blobs, temporary files, stale staging folders, stale index rows)."""
        from .integrity import repair

        self.require()  # never create a registry just to repair it
        with self.transaction():
            return repair(self)


def _check_weights_claim(record: dict) -> None:
    problem = weights_claim_problem(record)
    if problem:
        raise CorruptRegistryError(problem, hint="run 'adapterhub verify'; restore the catalogue file from a backup "
                                                 "or remove the version")
