"""Base models and datasets in a registry: fingerprinted, named, found again by path, name or hash.

A part of `Registry` (it is mixed in): the registry holds the lock, the catalogue and the
hash cache; this owns what a base and a dataset are to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import naming
from .errors import ConflictError, CorruptRegistryError, NotFoundError
from .fingerprint import fingerprint_model
from .records import BaseModel, ResolvedBase, now
from .schemas import validate


# The fields readers of each row file index by.
_ROW_FIELDS = {"base_model": {"name": str, "sha256": str, "structure_sha256": str, "config": dict, "files": list,
                              "tensors": dict},
               "dataset": {"name": str, "sha256": str, "files": list, "examples": dict}}


class BaseModels:
    """Registration and resolution of base models and datasets (mixed into Registry)."""

    def bases(self) -> list[dict]:
        return sorted(self._rows("bases.json", "base_model"), key=lambda b: b["name"])

    def bases_by_sha(self) -> dict[str, dict]:
        """Registered bases by sha256, also under the hashes older formats gave them (records written then use those)."""
        bases = self.bases()
        found = {sha: b for b in bases for sha in b.get("previous_sha256", [])}
        return found | {b["sha256"]: b for b in bases}

    def _rows(self, filename: str, schema: str) -> list[dict]:
        """Every row of a catalogue file, each with the fields readers use: a hand-edited row is named, not
        tripped over. The full schema is checked on write and by verify (jsonschema is too slow for `list`)."""
        self.require()
        rows = [{k: v for k, v in row.items() if k != "doc_id"} for row in self.catalogue.rows(filename)]
        for row in rows:
            bad = [k for k, kind in _ROW_FIELDS[schema].items() if not isinstance(row.get(k), kind)]
            if bad:
                raise CorruptRegistryError(f"{self.catalog / filename} row {row.get('name')!r} does not match schema "
                                           f"'{schema}': no valid {', '.join(bad)}", hint="run 'adapterhub verify'")
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
                            hint=f"give a model folder path, or register it with 'adapterhub base add PATH --name {name_or_sha}'",
                            kind="base", key=name_or_sha)

    def _fingerprint(self, path: Path, reread: bool = False) -> dict:
        from .fingerprint import weight_files

        total = sum(p.stat().st_size for p in weight_files(path)) if Path(path).is_dir() else 0
        with self._progress(f"fingerprinting {Path(path).name}", total) as advance:
            return fingerprint_model(path, self._hash_cache, reread, advance)

    def resolve_base(self, path_or_name: str | Path, reread: bool = False, need_files: bool = False) -> ResolvedBase:
        """A base given as a folder path, a Hub repo id in the local cache, or a registered name or sha256 prefix.

        need_files: the caller reads the weights, so a registered base must have its folder on this machine
            (one registered from a fingerprint alone has none; a folder may have moved). Checking
            compatibility needs only the fingerprint.
        """
        from . import hf

        path = Path(path_or_name).expanduser()
        repo_id = None
        if not path.is_dir() and hf.is_repo_id(str(path_or_name)):
            # A Hub repo id: its snapshot in the local Hugging Face cache, whose blob names are the sha256s.
            repo_id, path = str(path_or_name), hf.cached_snapshot(str(path_or_name))
        if path.is_dir():
            fp = {**self._fingerprint(path, reread), "hf_repo": repo_id}
            known = next((b for b in self.bases() if b["sha256"] == fp["sha256"]), None)
            return ResolvedBase(fp, BaseModel(known) if known else None, path)
        if os.sep in str(path_or_name) or str(path_or_name).startswith("."):
            raise NotFoundError(f"model folder {path} does not exist", hint="give a local model folder or a registered base name")
        record = BaseModel(self.base(str(path_or_name)))
        if need_files and not local_folder(record.record):
            where = f"its folder {record.path} is gone" if record.path else "only its fingerprint was registered"
            raise NotFoundError(f"base {record.name} is registered, but its files are not on this machine ({where})",
                                hint=f"add the model with 'adapterhub base add PATH --name {record.name}', or pass --base PATH",
                                kind="base", key=record.sha256)
        return ResolvedBase(record.record, record, record.path)

    def add_base(self, path: Path | str, name: str | None = None, reread: bool = False) -> tuple[dict, bool]:
        """Fingerprint and register a base model; returns (record, created)."""
        resolved = self.resolve_base(Path(path), reread)
        if resolved.record:
            if name and name != resolved.name:
                raise ConflictError(f"this model is already registered as base '{resolved.name}'",
                                    hint=f"use --base {resolved.name}")
            known = resolved.record.path
            if known is None or not known.is_dir():
                # Registered from elsewhere (a pull records the remote's address) or moved: these bytes are here now.
                with self.transaction():
                    self.catalogue.update("bases.json", {"path": str(Path(path).resolve())}, sha256=resolved.sha256)
                return self.catalogue.find("bases.json", sha256=resolved.sha256), False
            return resolved.record.record, False
        with self.transaction():
            return self.register_base_row(resolved.fingerprint, name, Path(path)), True

    def register_base_row(self, fp: dict, name: str | None, path: Path) -> dict:
        """Under the lock: the base row for a fingerprint, registered unless it already is."""
        same = self.catalogue.find("bases.json", sha256=fp["sha256"])
        if same:
            return same
        taken = {b["name"] for b in self.catalogue.rows("bases.json")}
        if name:
            naming.check_name(name)
            if name in taken:
                raise ConflictError(f"base name '{name}' is taken by another model", hint="choose another --name")
        else:
            name = unique_name(naming.suggest_name(path.resolve().name), taken)
        record = {**fp, "name": name, "hf_repo": fp.get("hf_repo"), "created_at": now()}
        validate(record, "base_model")
        self.catalogue.insert("bases.json", record)
        return record

    def datasets(self) -> list[dict]:
        return self._rows("datasets.json", "dataset")

    def register_dataset_row(self, fp: dict, path: Path) -> dict:
        """Under the lock: the dataset row for a fingerprint, registered unless it already is."""
        same = self.catalogue.find("datasets.json", sha256=fp["sha256"])
        if same:
            return same
        name = unique_name(naming.suggest_name(path.resolve().name), {d["name"] for d in self.catalogue.rows("datasets.json")})
        record = {**fp, "name": name, "created_at": now()}
        validate(record, "dataset")
        self.catalogue.insert("datasets.json", record)
        return record

    def dataset_name_for(self, fingerprint: dict, path: Path) -> str:
        """The registered name of a dataset, or the one it would get."""
        known = next((d for d in self.datasets() if d["sha256"] == fingerprint["sha256"]), None)
        return known["name"] if known else naming.suggest_name(Path(path).resolve().name)


def local_folder(row: dict | None) -> Path | None:
    """A registered base's or dataset's folder when it is on this machine: a row keeps the path it was
    registered from, which may be another machine's (a pull) or a folder since moved."""
    path = row.get("path") if row else None
    return Path(path) if path and Path(path).is_dir() else None


def unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate

