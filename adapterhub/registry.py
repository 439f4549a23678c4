"""`Registry(root)`: the single code path that creates, resolves, lists and removes records.

On disk (see registry/README.md):

    registry.json                 marker and format version
    policy.json                   naming policy
    registry.lock                 held by every write transaction
    objects/<sha[:2]>/<sha>       content-addressed files (adapter weights, configs)
    catalog/adapters/<name>.json  one TinyDB per adapter name: versions (doc_id = version), aliases
    catalog/sha/<sha[:2]>.json    sha256 -> name@version, for sha-prefix refs and blob reference counts
    catalog/by-base/<sha[:16]>.json  names with a version on that base, for `list --base`
    catalog/bases.json, catalog/datasets.json

A write puts files first, index rows next and the version record last, so a
process killed at any point leaves at worst an orphan blob or a stale index
row, which readers skip and `verify` reports without failing.
"""

from __future__ import annotations

import fnmatch
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from tinydb import Query
from tinydb.table import Document

from . import compat, naming
from .errors import AdapterHubError, ConflictError, CorruptRegistryError, IncompatibleError, NotFoundError
from .fingerprint import HashCache, fingerprint_dataset, fingerprint_model
from .formats import mlx as mlx_format
from .migrations import FORMAT, upgrade
# Re-exported while callers move to records: RECORD_FILE, VERSION_RELATIONS, AdapterVersion, now, unapplied.
from .records import (RECORD_FILE, VERSION_RELATIONS, AdapterVersion, base_ref, now, unapplied,  # noqa: F401
                      weights_claim_problem)
from .safetensors_io import read_header
from .schemas import validate
from .store import (ObjectStore, RegistryLock, check_output, enclosing_registry, open_db, read_json, read_tables,
                    rewrite_tables, staged_folder, staging_path, write_json)

_CATALOGUE_NAME = re.compile(r"^[a-z][a-z0-9._-]*$")
# A byte-progress factory: (description, total bytes) -> context manager yielding advance(n).
ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


def _no_progress(description: str, total: int) -> ContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


class Registry:
    """A registry rooted at a folder. Every method is one user-level operation."""

    def __init__(self, root: Path | str, progress: ProgressFactory = _no_progress, hash_cache: HashCache | None = None):
        self.root = Path(root).expanduser()
        self.objects = ObjectStore(self.root / "objects")
        self.catalog = self.root / "catalog"
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

    def _require(self) -> None:
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

    def _marker(self) -> dict:
        marker = read_json(self.root / "registry.json")
        if marker is None:
            raise NotFoundError(f"no registry at {self.root}", hint=f"run 'adapterhub init {self.root}'")
        validate(marker, "registry", what=str(self.root / "registry.json"))
        return marker

    @contextmanager
    def _transaction(self) -> Iterator[None]:
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
        with self._transaction():
            doc = policy.to_dict()
            validate(doc, "policy")
            write_json(self.root / "policy.json", doc)

    # ---- catalogue files ----------------------------------------------------

    def _adapter_db(self, name: str):
        return open_db(self.catalog / "adapters" / f"{name}.json")

    def _sha_db(self, sha256: str):
        return open_db(self.catalog / "sha" / f"{sha256[:2]}.json")

    def _by_base_db(self, base_sha: str):
        return open_db(self.catalog / "by-base" / f"{base_sha[:16]}.json")

    def _entry(self, name: str) -> tuple[list[dict], dict[str, int]]:
        """A name's versions and aliases, from one read of its catalogue file."""
        versions, aliases, _ = self._entry_with_removed(name)
        return versions, aliases

    def _entry_with_removed(self, name: str) -> tuple[list[dict], dict[str, int], dict[int, dict]]:
        """Versions, aliases and removed versions (number -> {sha256, removed_at}) of one name."""
        if not _CATALOGUE_NAME.fullmatch(name):
            return [], {}, {}  # never a path outside the catalogue, whatever a ref says
        path = self.catalog / "adapters" / f"{name}.json"
        tables = read_tables(path)
        _check_shapes(path, tables)
        versions = sorted(tables.get("versions", {}).values(), key=lambda r: r["version"])
        removed = {d["version"]: d for d in tables.get("removed", {}).values()}
        return versions, {d["alias"]: d["version"] for d in tables.get("aliases", {}).values()}, removed

    def _versions(self, name: str) -> list[dict]:
        return self._entry(name)[0]

    def _aliases(self, name: str) -> dict[str, int]:
        return self._entry(name)[1]

    def _names(self) -> list[str]:
        folder = self.catalog / "adapters"
        if not folder.is_dir():
            return []
        return sorted(e.name[:-5] for e in os.scandir(folder) if e.name.endswith(".json") and not e.name.startswith("."))

    def _version_obj(self, record: dict, aliases: dict[str, int] | None = None) -> AdapterVersion:
        aliases = self._aliases(record["name"]) if aliases is None else aliases
        return AdapterVersion(record, tuple(sorted(a for a, v in aliases.items() if v == record["version"])))

    # ---- bases and datasets -------------------------------------------------

    def bases(self) -> list[dict]:
        return sorted(self._rows("bases.json", "base_model"), key=lambda b: b["name"])

    def bases_by_sha(self) -> dict[str, dict]:
        """Registered bases by sha256, also under the hashes older formats gave them (records written then use those)."""
        bases = self.bases()
        found = {sha: b for b in bases for sha in b.get("previous_sha256", [])}
        return found | {b["sha256"]: b for b in bases}

    def _rows(self, filename: str, schema: str) -> list[dict]:
        """Every row of a catalogue file, each checked against its schema: a hand-edited row is named, not tripped over."""
        self._require()
        rows = [dict(d) for d in open_db(self.catalog / filename).all()]
        for row in rows:
            validate(row, schema, what=f"{self.catalog / filename} row {row.get('name', row.get('id'))!r}")
        return rows

    def base(self, name_or_sha: str) -> dict:
        """A registered base by name or sha256 prefix (12+ characters)."""
        key = name_or_sha.lower()
        matches = [b for b in self.bases() if b["name"] == key or (len(key) >= 12 and b["sha256"].startswith(key))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFoundError(f"'{name_or_sha}' matches {len(matches)} bases", hint="give a longer sha256 prefix")
        known = ", ".join(b["name"] for b in self.bases()[:10]) or "none yet"
        raise NotFoundError(f"no base model '{name_or_sha}' (registered: {known})",
                            hint=f"give a model folder path, or register it with 'adapterhub base add PATH --name {name_or_sha}'")

    def _fingerprint(self, path: Path, reread: bool = False) -> dict:
        from .fingerprint import weight_files

        total = sum(p.stat().st_size for p in weight_files(path)) if Path(path).is_dir() else 0
        with self._progress(f"fingerprinting {Path(path).name}", total) as advance:
            return fingerprint_model(path, self._hash_cache, reread, advance)

    def resolve_base(self, path_or_name: str | Path, reread: bool = False) -> tuple[dict, dict | None]:
        """A base given as a folder path or a registered name -> (fingerprint, registered record or None)."""
        from . import hf

        path = Path(path_or_name).expanduser()
        repo_id = None
        if not path.is_dir() and hf.is_repo_id(str(path_or_name)):
            # A Hub repo id: its snapshot in the local Hugging Face cache, whose blob names are the sha256s.
            repo_id, path = str(path_or_name), hf.cached_snapshot(str(path_or_name))
        if path.is_dir():
            fp = {**self._fingerprint(path, reread), "hf_repo": repo_id}
            known = [b for b in self.bases() if b["sha256"] == fp["sha256"]]
            return fp, known[0] if known else None
        if os.sep in str(path_or_name) or str(path_or_name).startswith("."):
            raise NotFoundError(f"model folder {path} does not exist", hint="give a local model folder or a registered base name")
        record = self.base(str(path_or_name))
        return record, record

    def add_base(self, path: Path | str, name: str | None = None, reread: bool = False) -> tuple[dict, bool]:
        """Fingerprint and register a base model; returns (record, created)."""
        fp, existing = self.resolve_base(Path(path), reread)
        if existing:
            if name and name != existing["name"]:
                raise ConflictError(f"this model is already registered as base '{existing['name']}'",
                                    hint=f"use --base {existing['name']}")
            return existing, False
        with self._transaction():
            return self._register_base(fp, name, Path(path)), True

    def _register_base(self, fp: dict, name: str | None, path: Path) -> dict:
        db = open_db(self.catalog / "bases.json")
        same = db.get(Query().sha256 == fp["sha256"])
        if same:
            return dict(same)
        taken = {d["name"] for d in db.all()}
        if name:
            naming.check_name(name)
            if name in taken:
                raise ConflictError(f"base name '{name}' is taken by another model", hint="choose another --name")
        else:
            name = _unique(naming.suggest_name(path.resolve().name), taken)
        record = {**fp, "name": name, "hf_repo": fp.get("hf_repo"), "created_at": now()}
        validate(record, "base_model")
        db.insert(record)
        return record

    def datasets(self) -> list[dict]:
        return self._rows("datasets.json", "dataset")

    def _register_dataset(self, fp: dict, path: Path) -> dict:
        db = open_db(self.catalog / "datasets.json")
        same = db.get(Query().sha256 == fp["sha256"])
        if same:
            return dict(same)
        name = _unique(naming.suggest_name(path.resolve().name), {d["name"] for d in db.all()})
        record = {**fp, "name": name, "created_at": now()}
        validate(record, "dataset")
        db.insert(record)
        return record

    # ---- adapters -----------------------------------------------------------

    def resolve(self, ref: str) -> AdapterVersion:
        """The version a ref names: `name`, `name@3`, `name@alias`, or a sha256 prefix."""
        self._require()
        parsed = naming.parse_ref(ref)
        versions, aliases, removed = self._entry_with_removed(parsed.name) if parsed.name else ([], {}, {})
        if parsed.version in removed:
            gone = removed[parsed.version]
            raise NotFoundError(f"{parsed.name}@{parsed.version} was removed at {gone['removed_at']} "
                                f"(it was sha256 {gone['sha256'][:12]}); its number is never reused",
                                hint=f"run 'adapterhub list --name {parsed.name}' for the versions that remain")
        if versions:
            latest = max(v["version"] for v in versions)
            wanted = parsed.version if parsed.version is not None else (aliases.get(parsed.alias) if parsed.alias else latest)
            if parsed.alias and wanted is None:
                known = ", ".join(sorted(aliases)) or "none"
                raise NotFoundError(f"adapter '{parsed.name}' has no alias '{parsed.alias}' (aliases: {known})",
                                    hint=f"run 'adapterhub show {parsed.name}'")
            for v in versions:
                if v["version"] == wanted:
                    return self._version_obj(v, aliases)
            raise NotFoundError(f"adapter '{parsed.name}' has no version {wanted} (latest is {latest})",
                                hint=f"run 'adapterhub list --name {parsed.name}'")
        if parsed.sha_prefix:
            found = self._by_sha_prefix(parsed.sha_prefix)
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise NotFoundError(f"sha256 prefix '{parsed.sha_prefix}' matches {len(found)} versions: "
                                    + ", ".join(v.ref for v in found[:5]), hint="give a longer prefix or NAME@VERSION")
        raise NotFoundError(f"no adapter '{ref}'", hint="run 'adapterhub list' to see what is registered")

    def _by_sha_prefix(self, prefix: str) -> list[AdapterVersion]:
        rows = self._sha_db(prefix).search(Query().sha256.test(lambda s: s.startswith(prefix)) & (Query().file == mlx_format.WEIGHTS_FILE))
        found = {}
        for row in rows:
            # Rows are written before their record; one without a record is a leftover, not a version.
            record = next((v for v in self._versions(row["name"]) if v["version"] == row["version"]), None)
            if record and record["sha256"] == row["sha256"]:
                found[(row["name"], row["version"])] = self._version_obj(record)
        return list(found.values())

    def list(self, base: str | None = None, kind: str | None = None, tags: dict[str, str] | None = None,
             name_glob: str | None = None) -> list[AdapterVersion]:
        """Versions matching every filter given, by name then version."""
        self._require()
        if base:
            base_sha = self.base(base)["sha256"]
            names = sorted({d["name"] for d in self._by_base_db(base_sha).all()})
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
                result.append(self._version_obj(record, aliases))
        return result

    def import_adapter(self, folder: Path | str, name: str, base: str | Path | None = None, dataset: Path | str | None = None,
                       parent: str | None = None, relation: str = "resumed-from", tags: dict[str, str] | None = None,
                       description: str | None = None, checkpoint: str | None = None,
                       parents: list[dict] | None = None, training: dict | None = None,
                       source: dict | None = None) -> tuple[AdapterVersion, bool]:
        """Register an mlx-lm or PEFT adapter folder as the next version of `name`.

        Everything is read and checked before anything is written: a refused import
        leaves the registry exactly as it was.

        Args:
            parent, relation: one parent version, the common case.
            parents: full parent entries ({ref, sha256, relation[, weight]}) instead,
                for stacked and extracted adapters.
            training: what the trainer knows (losses, tokens, versions) instead of what
                the adapter_config.json says.
            source: where the weights came from, when not from `folder` itself.

        Returns:
            (the version, True if it was created; False if `name` already had these exact weights).
        """
        from .formats import peft as peft_format  # only imports read PEFT folders: keep it off list/show's start

        if peft_format.is_peft_folder(Path(folder)) and not checkpoint:
            return self._import_peft(Path(folder), name, base, dataset, parent, relation, tags, description, parents)
        tags = dict(tags or {})
        naming.check_tags(tags)
        parsed = mlx_format.read_adapter_folder(Path(folder), checkpoint)
        origin = None if checkpoint else _origin(Path(folder))
        if base is None and origin and origin.get("base"):
            # The record names its base by content: used when that very model is registered here.
            known = next((b for b in self.bases() if b["sha256"] == origin["base"]["sha256"]), None)
            base = known["name"] if known else None
        base_fp, base_record = self.resolve_base(base) if base else (None, None)
        dataset_fp = fingerprint_dataset(Path(dataset), self._hash_cache) if dataset else None
        parent_version = self.resolve(parent) if parent else None
        base_name = base_record["name"] if base_record else (naming.suggest_name(Path(base).resolve().name) if base else None)
        naming.check_name(name, self.policy, tags, base_name)
        if base_fp:
            report = compat.check(name, parsed.modules, list(parsed.layers), None, str(base), base_fp,
                                  hidden_size=(parsed.loreft or {}).get("hidden_size"))
            if not report.compatible:
                raise IncompatibleError(f"adapter {Path(folder)} does not fit base {base}: " + "; ".join(report.problems[:3]),
                                        hint="check --base; it must be the model the adapter was trained on")
        if parent_version and base_fp and parent_version.record.get("base") and parent_version.record["base"]["structure_sha256"] != base_fp["structure_sha256"]:
            raise IncompatibleError(f"parent {parent_version.ref} was trained on a different base model structure",
                                    hint="a parent must share the base model")

        def make_record(version: int, weights: tuple[str, int], config: tuple[str, int], base_ref: dict | None,
                        dataset_record: dict | None) -> dict:
            record = {
                "name": name, "version": version, "sha256": weights[0], "kind": parsed.kind, "rank": parsed.rank,
                "scale": parsed.scale, "dropout": parsed.dropout, "targets": list(parsed.targets),
                "layers": list(parsed.layers), "num_layers": len(parsed.layers), "dtype": parsed.dtype,
                "num_parameters": parsed.num_parameters, "base": base_ref,
                "dataset": ({"name": dataset_record["name"], "sha256": dataset_record["sha256"],
                             "examples": dataset_record["examples"]} if dataset_record else None),
                "training": training or ({"tool": "mlx_lm", "hyperparameters": parsed.hyperparameters, "losses": None}
                                         if parsed.hyperparameters else None),
                "parents": parents if parents is not None else (
                    [{"ref": parent_version.ref, "sha256": parent_version.sha256, "relation": relation}]
                    if parent_version else []),
                "files": [{"name": mlx_format.WEIGHTS_FILE, "sha256": weights[0], "size": weights[1]},
                          {"name": mlx_format.CONFIG_FILE, "sha256": config[0], "size": config[1]}],
                **({"loreft": parsed.loreft} if parsed.loreft else {}),
                "tags": tags, "description": description,
                "source": source or {"path": str(Path(folder).resolve()), "format": "mlx", "checkpoint": checkpoint},
                "created_at": now(),
            }
            validate(record, "adapter_version", what=f"record for {name}@{version}")
            return record

        # A draft with placeholder hashes is validated before anything is written, so a
        # record that cannot be stored never leaves an orphan blob behind.
        placeholder = ("0" * 64, 0)
        draft_base = base_ref({**base_fp, "name": base_name}) if base_fp else None
        make_record(1, placeholder, placeholder, draft_base, {**dataset_fp, "name": "draft"} if dataset_fp else None)

        with self._transaction():
            # Blobs deduplicate, so storing first costs nothing when these weights are already here.
            with self._progress(f"storing {parsed.weights_path.name}", parsed.weights_path.stat().st_size) as advance:
                weights = self.objects.put_file(parsed.weights_path, advance)
            versions, _, removed = self._entry_with_removed(name)
            existing = [v for v in versions if v["sha256"] == weights[0]]
            if existing:
                return self._version_obj(existing[0]), False
            if origin and not parent_version and origin["sha256"] == weights[0]:
                # An exported folder names the version it was exported from; the same weights prove the claim.
                parents = [*(parents or []), _imported_from(origin)]
            config = self.objects.put_file(parsed.config_path)
            base_record = self._register_base(base_fp, None, Path(base)) if base_fp and not base_record else base_record
            dataset_record = self._register_dataset(dataset_fp, Path(dataset)) if dataset_fp else None
            # The high-water mark counts removed versions too: a number means one set of bytes forever.
            version = max([v["version"] for v in versions] + list(removed), default=0) + 1
            record = make_record(version, weights, config, base_ref(base_record) if base_record else None, dataset_record)
            self._index(record)
            self._adapter_db(name).table("versions").insert(Document(record, doc_id=version))
            return self._version_obj(record), True

    def _import_peft(self, folder: Path, name: str, base, dataset, parent, relation, tags, description,
                     parents) -> tuple[AdapterVersion, bool]:
        """Convert a PEFT folder to mlx-lm's layout in a scratch folder, then import that."""
        import tempfile

        from .formats import peft as peft_format

        with tempfile.TemporaryDirectory(prefix="adapterhub-peft-") as scratch:
            config = peft_format.to_mlx(folder, Path(scratch))
            if base is None and config.get("base_model_name_or_path"):
                # The base PEFT names is used when it is here (a folder, a registered base, a cached Hub repo).
                try:
                    self.resolve_base(config["base_model_name_or_path"])
                    base = config["base_model_name_or_path"]
                except AdapterHubError:
                    pass
            origin = _origin(folder)
            if origin and not parent and self._same_tensors(origin, Path(scratch)):
                # Exported from a version here: the converted tensors are that version's, bit for bit.
                parents = [*(parents or []), _imported_from(origin)]
            hyperparameters = {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                                                      "use_dora", "base_model_name_or_path", "peft_version") if k in config}
            return self.import_adapter(Path(scratch), name, base, dataset, parent, relation, tags, description,
                                       parents=parents, training={"tool": "peft", "hyperparameters": hyperparameters, "losses": None},
                                       source={"path": str(folder.resolve()), "format": "peft", "checkpoint": None})

    def _same_tensors(self, origin: dict, folder: Path) -> bool:
        """Whether `folder`'s adapters.safetensors holds exactly the tensors of the version `origin` names."""
        from .safetensors_io import read_bits

        try:
            version = self.resolve(origin["ref"])
        except AdapterHubError:
            return False
        if version.sha256 != origin["sha256"]:
            return False
        ours, theirs = read_header(folder / mlx_format.WEIGHTS_FILE), read_header(self.objects.path(version.sha256))
        if ours.structure() != theirs.structure():
            return False
        return all((read_bits(ours, k) == read_bits(theirs, k)).all() for k in ours.tensors)

    def register_records(self, records: list[dict]) -> int:
        """Register many finished version records at once, for migrations and benchmarks.

        Each record is validated and must reference blobs already in the object store
        (not checked here: `verify` does). Writes are batched per catalogue file, in the
        same order as import: index rows first, version records last.
        """
        by_shard: dict[str, list[dict]] = {}
        by_base: dict[str, set[str]] = {}
        by_name: dict[str, list[dict]] = {}
        for record in records:
            validate(record, "adapter_version", what=f"record for {record.get('name')}@{record.get('version')}")
            for f in record["files"]:
                by_shard.setdefault(f["sha256"][:2], []).append(
                    {"sha256": f["sha256"], "name": record["name"], "version": record["version"], "file": f["name"]})
            if record["base"]:
                by_base.setdefault(record["base"]["sha256"], set()).add(record["name"])
            by_name.setdefault(record["name"], []).append(record)
        with self._transaction():
            for shard, rows in by_shard.items():
                self._sha_db(shard).insert_multiple(rows)
            for base_sha, names in by_base.items():
                db = self._by_base_db(base_sha)
                known = {d["name"] for d in db.all()}
                db.insert_multiple({"name": n} for n in sorted(names - known))
            for name, versions in by_name.items():
                table = self._adapter_db(name).table("versions")
                taken = {d.doc_id for d in table.all()} | {d.doc_id for d in self._adapter_db(name).table("removed").all()}
                clash = [r["version"] for r in versions if r["version"] in taken]
                if clash:
                    raise ConflictError(f"{name} already has or had version(s) {clash}", hint="version numbers are never reused")
                table.insert_multiple(Document(r, doc_id=r["version"]) for r in versions)
        return len(records)

    def _index(self, record: dict) -> None:
        for f in record["files"]:
            self._sha_db(f["sha256"]).insert({"sha256": f["sha256"], "name": record["name"],
                                              "version": record["version"], "file": f["name"]})
        if record["base"]:
            db = self._by_base_db(record["base"]["sha256"])
            if not db.contains(Query().name == record["name"]):
                db.insert({"name": record["name"]})

    def weights(self, version: AdapterVersion) -> Path:
        """The path of a version's weights, for reading them: its record's claim and the blob's bytes checked first.

        Listing, showing and removing a version never read its weights, so a damaged record
        stays visible and removable; everything that uses the tensors comes through here.
        """
        _check_weights_claim(version.record)
        return self.objects.verified(version.sha256, f"weights of {version.ref}")

    def modules(self, version: AdapterVersion) -> dict[str, tuple[int, int]]:
        """Module path -> (in, out) of a stored adapter, from its weight header alone."""
        header = read_header(self.weights(version))
        config = self.objects.verified(version.file_sha(mlx_format.CONFIG_FILE), f"config of {version.ref}")
        return mlx_format.derive(config, header.path, read_json(config), header, check_values=False).modules

    def check(self, ref: str, base: str | Path, allow_different_weights: bool = False) -> compat.CompatReport:
        """Compatibility report of an adapter with a base given as a path or a registered name."""
        version = self.resolve(ref)
        base_fp, _ = self.resolve_base(base)
        recorded = version.record.get("base")
        recorded_full = next((b for b in self.bases() if recorded and b["sha256"] == recorded["sha256"]), None)
        adapter_base = {**recorded, "config": recorded_full["config"]} if recorded and recorded_full else recorded
        return compat.check(version.ref, self.modules(version), version.record["layers"], adapter_base, str(base), base_fp,
                            recorded_full["files"] if recorded_full else None, allow_different_weights,
                            hidden_size=(version.record.get("loreft") or {}).get("hidden_size"))

    def alias(self, ref: str, alias: str) -> AdapterVersion:
        """Point `name@alias` at the version `ref` names (aliases move, versions do not)."""
        naming.check_alias(alias)
        with self._transaction():
            version = self.resolve(ref)
            table = self._adapter_db(version.name).table("aliases")
            table.upsert({"alias": alias, "version": version.version}, Query().alias == alias)
            return self.resolve(version.ref)

    def tag(self, ref: str, key: str, value: str) -> AdapterVersion:
        naming.check_tags({key: value})
        with self._transaction():
            version = self.resolve(ref)
            record = {**version.record, "tags": {**version.record["tags"], key: value}}
            validate(record, "adapter_version", what=f"record for {version.ref}")
            self._adapter_db(version.name).table("versions").update({"tags": record["tags"]}, doc_ids=[version.version])
            return self.resolve(version.ref)

    def children(self, version: AdapterVersion) -> list[str]:
        """Refs of versions that list `version` as a parent. A full scan: rm is rare, the index is not worth it."""
        return [f"{r['name']}@{r['version']}" for name in self._names() for r in self._versions(name)
                if any(p["sha256"] == version.sha256 and p["ref"] == version.ref for p in r["parents"])]

    def remove(self, ref: str, force: bool = False) -> AdapterVersion:
        """Remove one version; refused while others name it as parent, unless forced.

        Its number is kept as removed (with its sha256), so it is never given to other bytes.
        """
        with self._transaction():
            version = self.resolve(ref)
            dependants = self.children(version)
            if dependants and not force:
                raise ConflictError(f"{version.ref} is the parent of {', '.join(dependants[:5])}",
                                    hint="remove those first, or pass --force to keep them with a dangling parent")
            # Check, then write: every catalogue file this touches is read (and so parsed) first,
            # so a damaged one refuses the removal before anything has changed.
            sha_dbs = {f["sha256"]: self._sha_db(f["sha256"]) for f in version.record["files"]}
            for db in sha_dbs.values():
                db.all()
            base_sha = (version.record["base"] or {}).get("sha256")
            by_base = self._by_base_db(base_sha) if base_sha else None
            if by_base is not None:
                by_base.all()
            number = str(version.version)

            def drop(tables: dict) -> None:
                tables.setdefault("removed", {})[number] = {"version": version.version, "sha256": version.sha256,
                                                           "removed_at": now()}
                tables["versions"].pop(number)
                tables["aliases"] = {i: a for i, a in tables.get("aliases", {}).items() if a["version"] != version.version}

            # The record goes first, in one write with its tombstone and aliases: a crash after it leaves
            # stale index rows and orphan blobs, both harmless, and never a version both present and removed.
            rewrite_tables(self.catalog / "adapters" / f"{version.name}.json", drop)
            for sha, sha_db in sha_dbs.items():
                sha_db.remove((Query().sha256 == sha) & (Query().name == version.name) & (Query().version == version.version))
                if not sha_db.contains(Query().sha256 == sha):
                    self.objects.remove(sha)
            if by_base is not None and not any((v.get("base") or {}).get("sha256") == base_sha for v in self._versions(version.name)):
                by_base.remove(Query().name == version.name)
            return version

    def dataset_name_for(self, fingerprint: dict, path: Path) -> str:
        """The registered name of a dataset, or the one it would get."""
        known = next((d for d in self.datasets() if d["sha256"] == fingerprint["sha256"]), None)
        return known["name"] if known else naming.suggest_name(Path(path).resolve().name)

    # ---- training runs ------------------------------------------------------

    def start_run(self, record: dict) -> dict:
        validate(record, "training_run", what=f"run {record.get('id')}")
        with self._transaction():
            open_db(self.catalog / "runs.json").insert(record)
        return record

    def update_run(self, run_id: str, **fields) -> dict:
        with self._transaction():
            db = open_db(self.catalog / "runs.json")
            record = {**self.run(run_id), **fields}
            validate(record, "training_run", what=f"run {run_id}")
            db.update(fields, Query().id == run_id)
        return record

    def run(self, run_id: str) -> dict:
        found = open_db(self.catalog / "runs.json").get(Query().id == run_id)
        if found is None:
            raise NotFoundError(f"no training run '{run_id}'", hint="run 'adapterhub runs' to list them")
        return dict(found)

    def run_status(self, record: dict) -> str:
        """A run recorded as running whose process is gone is interrupted, whatever the record says."""
        if record["status"] != "running":
            return record["status"]
        import socket

        if record.get("host") == socket.gethostname() and record.get("pid"):
            try:
                os.kill(record["pid"], 0)
            except ProcessLookupError:
                return "interrupted"
            except PermissionError:
                return "running"
            if _is_zombie(record["pid"]):
                return "interrupted"
        return "running"

    def runs(self, status: str | None = None) -> list[dict]:
        self._require()
        found = []
        for record in open_db(self.catalog / "runs.json").all():
            record = {**record, "status": self.run_status(record)}
            if status is None or record["status"] == status:
                found.append(record)
        return sorted(found, key=lambda r: r["started_at"])

    # ---- fused models -------------------------------------------------------

    def register_fused(self, record: dict) -> dict:
        """Catalogue a fused model folder (written first by the caller: files before the row)."""
        validate(record, "fused_model", what="fused model record")
        with self._transaction():
            db = open_db(self.catalog / "fused.json")
            db.upsert(record, Query().sha256 == record["sha256"])
        return record

    def fused_models(self) -> list[dict]:
        self._require()
        return [dict(d) for d in open_db(self.catalog / "fused.json").all()]

    def fused(self, sha256: str) -> dict | None:
        return next((f for f in self.fused_models() if f["sha256"] == sha256), None)

    # ---- user-named outputs -------------------------------------------------

    @contextmanager
    def staged_output(self, out: Path | str, purpose: str, inputs: tuple[Path, ...] = (), force: bool = False) -> Iterator[Path]:
        """A staging folder for a command's output (fuse, unfuse, export), journalled in the catalogue.

        The staging folder sits beside `out`, outside the registry, so a process killed
        mid-write would leave it where nothing looks; the journal row lets `verify` report
        it and `verify --repair` remove it. The row goes in before the folder exists and
        leaves after the rename, so no staging folder is ever unaccounted for.
        """
        import socket

        out = Path(out).expanduser().absolute()
        protected = (*inputs, *self.protected_paths())
        check_output(out, protected, force)
        row = {"path": str(staging_path(out, purpose, os.getpid())), "out": str(out), "purpose": purpose,
               "pid": os.getpid(), "host": socket.gethostname(), "started_at": now()}
        with self._transaction():
            open_db(self.catalog / "staging.json").insert(row)
        try:
            with staged_folder(out, purpose, protected, force) as staging:
                yield staging
        finally:
            with self._transaction():
                journal = open_db(self.catalog / "staging.json")
                journal.remove(Query().path == row["path"])
                if not len(journal):
                    # An empty journal is no journal: a refused command leaves the registry byte-identical.
                    (self.catalog / "staging.json").unlink(missing_ok=True)

    def staging_rows(self) -> tuple[list[dict], list[dict]]:
        """The staging journal as (rows of live processes, rows of killed ones), each row checked first.

        A row is text anyone can edit and repair deletes the folder it names: a row is only
        believed when its path is exactly the staging folder of its `out`, outside the registry.

        Raises:
            CorruptRegistryError: a row that is not such a journal row, before anything is removed.
        """
        journal = self.catalog / "staging.json"
        live, killed = [], []
        for r in open_db(journal).all():
            try:
                validate(dict(r), "staging", what=f"{journal} row {r.doc_id}")
            except AdapterHubError as e:
                raise CorruptRegistryError(e.message, hint="remove that row from the journal by hand") from None
            out = Path(r["out"])
            if Path(r["path"]) != staging_path(out, r["purpose"], r["pid"]) or enclosing_registry(out) is not None:
                raise CorruptRegistryError(f"{journal} row {r.doc_id} names {r['path']}, which is not the staging folder "
                                           f"of an output outside the registry", hint="remove that row from the journal by hand")
            status = self.run_status({"status": "running", "pid": r["pid"], "host": r["host"]})
            (killed if status == "interrupted" else live).append({**r, "doc_id": r.doc_id})
        return live, killed

    def protected_paths(self) -> list[Path]:
        """What no output may overwrite, even with --force: the registry and every folder it records models in."""
        folders = [b["path"] for b in self.bases() if b.get("path")] + [f["path"] for f in self.fused_models() if f.get("path")]
        return [self.root, *map(Path, folders)]

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

        self._require()  # never create a registry just to repair it
        with self._transaction():
            return repair(self)


# What readers index records by; the full schema is checked on write and by verify, too slow for every list.
_ROW_KEYS = {"versions": {"name": str, "version": int, "sha256": str},
             "aliases": {"alias": str, "version": int},
             "removed": {"version": int, "sha256": str, "removed_at": str}}


def _check_shapes(path: Path, tables: dict) -> None:
    for table, docs in tables.items():
        keys = _ROW_KEYS.get(table, {})
        for doc in docs.values():
            bad = [k for k, kind in keys.items() if not isinstance(doc.get(k), kind) or isinstance(doc.get(k), bool)]
            if bad:
                raise CorruptRegistryError(f"{path} is damaged: a row of table '{table}' has no valid {', '.join(bad)}",
                                           hint="restore it from a backup, or run 'adapterhub verify' to see the damage")


def _check_weights_claim(record: dict) -> None:
    problem = weights_claim_problem(record)
    if problem:
        raise CorruptRegistryError(problem, hint="run 'adapterhub verify'; restore the catalogue file from a backup "
                                                 "or remove the version")


def _is_zombie(pid: int) -> bool:
    """A killed child not yet reaped still answers kill(pid, 0); its state in /proc says it is dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def _origin(folder: Path) -> dict | None:
    """The version record an exported folder carries (adapterhub.json), if any."""
    record = read_json(folder / RECORD_FILE)
    # Untrusted text: only a well-formed claim is weighed (and import still proves it by the weights' hash).
    if isinstance(record, dict) and isinstance(record.get("ref"), str) and naming.is_sha256(record.get("sha256")):
        return record
    return None


def _imported_from(origin: dict) -> dict:
    return {"ref": origin["ref"], "sha256": origin["sha256"], "relation": "imported-from"}


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate

