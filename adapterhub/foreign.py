"""Adapter folders that did not come from mlx-lm as is: PEFT folders, and folders exported with their record.

A part of `Registry` (it is mixed in): PEFT is converted exactly to mlx-lm's layout, then
imported; an exported folder's adapterhub.json is believed only when the weights prove it.
"""

from __future__ import annotations

from pathlib import Path

from . import naming
from .errors import NotFoundError
from .files import read_json
from .formats import mlx as mlx_format
from .records import RECORD_FILE, AdapterVersion
from .safetensors_io import read_header


class ForeignFolders:
    """PEFT imports and exported-record claims (mixed into Registry)."""

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
                except NotFoundError:  # not here: imported without a base, as PEFT does not say which weights
                    pass
            origin = origin_of(folder)
            if origin and not parent and self._same_tensors(origin, Path(scratch)):
                # Exported from a version here: the converted tensors are that version's, bit for bit.
                parents = [*(parents or []), imported_from(origin)]
            hyperparameters = {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                                                      "use_dora", "base_model_name_or_path", "peft_version") if k in config}
            return self.import_adapter(Path(scratch), name, base, dataset, parent, relation, tags, description,
                                       parents=parents, training={"tool": "peft", "hyperparameters": hyperparameters, "losses": None},
                                       source={"path": str(folder.resolve()), "format": "peft", "checkpoint": None})

    def _same_tensors(self, origin: dict, folder: Path) -> bool:
        """Whether `folder`'s adapters.safetensors holds exactly the tensors of the version `origin` names."""
        from .safetensors_io import read_bits

        version = self.find(origin["ref"])
        if version is None or version.sha256 != origin["sha256"]:
            return False
        ours, theirs = read_header(folder / mlx_format.WEIGHTS_FILE), read_header(self.objects.path(version.sha256))
        if ours.structure() != theirs.structure():
            return False
        return all((read_bits(ours, k) == read_bits(theirs, k)).all() for k in ours.tensors)


def origin_of(folder: Path) -> dict | None:
    """The version record an exported folder carries (adapterhub.json), if any."""
    record = read_json(folder / RECORD_FILE)
    # Untrusted text: only a well-formed claim is weighed (and import still proves it by the weights' hash).
    if isinstance(record, dict) and isinstance(record.get("ref"), str) and naming.is_sha256(record.get("sha256")):
        return record
    return None


def imported_from(origin: dict) -> dict:
    return {"ref": origin["ref"], "sha256": origin["sha256"], "relation": "imported-from"}
