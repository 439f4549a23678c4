"""How versions come in: an adapter folder on disk, or tensors held in memory, become the next version of a name.

A part of `Registry` (it is mixed in). Both ways end in `_add`, which checks everything before
it writes anything and then writes in the registry's order: blobs, index rows, the record last.
In-memory tensors (stack, extract, promote, the trainer) are serialized once, straight into the
object store's staging area and hashed as they are written; no folder is made for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import compat, naming
from .errors import IncompatibleError
from .fingerprint import fingerprint_dataset
from .files import dump_json
from .foreign import imported_from, origin_of
from .formats import mlx as mlx_format
from .records import AdapterVersion, ParentEdge, base_ref, now
from .safetensors_io import read_header
from .schemas import validate
from .objects import StagedBlob

# Stores a blob and returns (sha256, size); called under the lock, only once the record is known to be valid.
StoreBlob = Callable[[], tuple[str, int]]


class Intake:
    """Folder import and in-memory add (mixed into Registry)."""

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
            parents: full parent entries ({ref, sha256, relation[, weight]}) instead.
            training: what the trainer knows (losses, tokens, versions) instead of what
                the adapter_config.json says.
            source: where the weights came from, when not from `folder` itself.

        Returns:
            (the version, True if it was created; False if `name` already had these exact weights).
        """
        from .formats import peft as peft_format  # only imports read PEFT folders: keep it off list/show's start

        folder = Path(folder)
        if peft_format.is_peft_folder(folder) and not checkpoint:
            return self._import_peft(folder, name, base, dataset, parent, relation, tags, description, parents)
        parsed = mlx_format.read_adapter_folder(folder, checkpoint)
        origin = None if checkpoint else origin_of(folder)
        if base is None and origin and origin.get("base"):
            # The record names its base by content: used when that very model is registered here.
            known = self.bases_by_sha().get(origin["base"]["sha256"])
            base = known["name"] if known else None
        if parents is None and parent:
            resumed = self.resolve(parent)
            parents = [ParentEdge(resumed.ref, resumed.sha256, relation).to_dict()]
        return self._add(parsed, name, base, dataset, parents or [], training, tags, description,
                         source or {"path": str(folder.resolve()), "format": "mlx", "checkpoint": checkpoint},
                         store_weights=lambda: self._store_file(parsed.weights_path),
                         store_config=lambda: self.objects.put_file(parsed.config_path),
                         # An exported folder names the version it came from; the same weights prove the claim.
                         claim=origin if origin and not parent else None)

    def _store_file(self, path: Path) -> tuple[str, int]:
        with self._progress(f"storing {path.name}", path.stat().st_size) as advance:
            return self.objects.put_file(path, advance)

    def add_version(self, name: str, tensors: dict, config: dict, base: str | Path | None = None,
                    dataset: Path | str | None = None, parents: list[dict] | None = None, training: dict | None = None,
                    tags: dict[str, str] | None = None, description: str | None = None,
                    source: dict | None = None) -> tuple[AdapterVersion, bool]:
        """Register adapter tensors held in memory (mlx or numpy arrays, mlx-lm's names) with their adapter config.

        The same checks and the same record as importing the folder mlx-lm would have written for them.
        """
        validate(config, "mlx_adapter_config", what=f"the adapter config for {name}")
        staged = self.objects.stage(mlx_format.safetensors_chunks(tensors))
        try:
            parsed = mlx_format.derive(Path(mlx_format.CONFIG_FILE), staged.path, config, read_header(staged.path))
            config_bytes = dump_json(config, mlx_format.CONFIG_FILE, indent=4).encode()
            return self._add(parsed, name, base, dataset, parents or [], training, tags, description, source,
                             store_weights=lambda: self._adopt(staged),
                             store_config=lambda: self.objects.put_bytes(config_bytes))
        finally:
            staged.path.unlink(missing_ok=True)  # gone already when adopted

    def _adopt(self, staged: StagedBlob) -> tuple[str, int]:
        self.objects.adopt(staged.path, staged.sha256)
        return staged.sha256, staged.size

    def _add(self, parsed: mlx_format.ParsedAdapter, name: str, base: str | Path | None, dataset: Path | str | None,
             parents: list[dict], training: dict | None, tags: dict | None, description: str | None, source: dict | None,
             store_weights: StoreBlob, store_config: StoreBlob, claim: dict | None = None) -> tuple[AdapterVersion, bool]:
        tags = dict(tags or {})
        naming.check_tags(tags)
        resolved = self.resolve_base(base) if base else None
        base_name = (resolved.name or naming.suggest_name(Path(base).resolve().name)) if resolved else None
        naming.check_name(name, self.policy, tags, base_name)
        dataset_fp = fingerprint_dataset(Path(dataset), self._hash_cache) if dataset else None
        if resolved:
            shape = compat.AdapterShape(name, parsed.modules, list(parsed.layers),
                                        hidden_size=(parsed.loreft or {}).get("hidden_size"))
            report = compat.check(shape, str(base), resolved.fingerprint)
            if not report.compatible:
                raise IncompatibleError(f"adapter {parsed.weights_path.parent} does not fit base {base}: "
                                        + "; ".join(report.problems[:3]),
                                        hint="check --base; it must be the model the adapter was trained on", report=report)
            for edge in parents:
                if edge["relation"] == "resumed-from":
                    parent = self.resolve(edge["ref"])
                    if parent.base and parent.base.structure_sha256 != resolved.structure_sha256:
                        raise IncompatibleError(f"parent {parent.ref} was trained on a different base model structure",
                                                hint="a parent must share the base model")

        def make_record(version: int, weights: tuple[str, int], config: tuple[str, int], base_row: dict | None,
                        dataset_row: dict | None, edges: list[dict]) -> dict:
            record = {
                "name": name, "version": version, "sha256": weights[0], "kind": parsed.kind, "rank": parsed.rank,
                "scale": parsed.scale, "dropout": parsed.dropout, "targets": list(parsed.targets),
                "layers": list(parsed.layers), "num_layers": len(parsed.layers), "dtype": parsed.dtype,
                "num_parameters": parsed.num_parameters, "base": base_row,
                "modules": {m: list(shape) for m, shape in parsed.modules.items()},
                "dataset": ({"name": dataset_row["name"], "sha256": dataset_row["sha256"],
                             "examples": dataset_row["examples"]} if dataset_row else None),
                "training": training or ({"tool": "mlx_lm", "hyperparameters": parsed.hyperparameters, "losses": None}
                                         if parsed.hyperparameters else None),
                "parents": edges,
                "files": [{"name": mlx_format.WEIGHTS_FILE, "sha256": weights[0], "size": weights[1]},
                          {"name": mlx_format.CONFIG_FILE, "sha256": config[0], "size": config[1]}],
                **({"loreft": parsed.loreft} if parsed.loreft else {}),
                "tags": tags, "description": description, "source": source, "created_at": now(),
            }
            validate(record, "adapter_version", what=f"record for {name}@{version}")
            return record

        # A draft with placeholder hashes is validated before anything is written, so a
        # record that cannot be stored never leaves an orphan blob behind.
        placeholder = ("0" * 64, 0)
        draft_base = base_ref({**resolved.fingerprint, "name": base_name}) if resolved else None
        make_record(1, placeholder, placeholder, draft_base, {**dataset_fp, "name": "draft"} if dataset_fp else None,
                    parents)

        with self.transaction():
            # Blobs deduplicate, so storing first costs nothing when these weights are already here.
            weights = store_weights()
            versions, _, removed = self.catalogue.entry(name)
            existing = [v for v in versions if v["sha256"] == weights[0]]
            if existing:
                return self.version_of(existing[0]), False
            edges = [*parents, imported_from(claim)] if claim and claim["sha256"] == weights[0] else parents
            config = store_config()
            base_row = None
            if resolved:
                base_row = (resolved.record.record if resolved.record
                            else self.register_base_row(resolved.fingerprint, None, Path(base)))
            dataset_row = self.register_dataset_row(dataset_fp, Path(dataset)) if dataset_fp else None
            # The high-water mark counts removed versions too: a number means one set of bytes forever.
            version = max([v["version"] for v in versions] + list(removed), default=0) + 1
            record = make_record(version, weights, config, base_ref(base_row) if base_row else None, dataset_row, edges)
            self.catalogue.index([record])
            self.catalogue.add_versions(name, [record])
            return self.version_of(record), True

    def register_records(self, records: list[dict]) -> int:
        """Register many finished version records at once, for migrations and benchmarks.

        Each record is validated and must reference blobs already in the object store
        (not checked here: `verify` does). Writes are batched per catalogue file, in the
        same order as import: index rows first, version records last.
        """
        by_name: dict[str, list[dict]] = {}
        for record in records:
            validate(record, "adapter_version", what=f"record for {record.get('name')}@{record.get('version')}")
            by_name.setdefault(record["name"], []).append(record)
        with self.transaction():
            self.catalogue.index(records)
            for name, versions in by_name.items():
                self.catalogue.add_versions(name, versions)
        return len(records)
