"""Adapter folders that did not come from mlx-lm as is: PEFT folders, and folders exported with their record.

A part of `Registry` (it is mixed in): PEFT is converted exactly to mlx-lm's tensors in memory, then
added; an exported folder's adapterhub.json is believed only when the weights prove it.
"""

from __future__ import annotations

from pathlib import Path

from . import naming
from .errors import NotFoundError
from .files import read_json
from .records import RECORD_FILE, AdapterVersion, ParentEdge
from .safetensors_io import read_header


class ForeignFolders:
    """PEFT imports and exported-record claims (mixed into Registry)."""

    def _import_peft(self, folder: Path, name: str, base, dataset, parent, relation, tags, description,
                     parents) -> tuple[AdapterVersion, bool]:
        """Convert a PEFT folder to mlx-lm's tensors in memory, then add them as a version."""
        from .formats import peft as peft_format

        converted = peft_format.to_mlx(folder)
        config = converted.peft_config
        if base is None and config.get("base_model_name_or_path"):
            # The base PEFT names is used when it is here (a folder, a registered base, a cached Hub repo).
            try:
                self.resolve_base(config["base_model_name_or_path"])
                base = config["base_model_name_or_path"]
            except NotFoundError:  # not here: imported without a base, as PEFT does not say which weights
                pass
        if parents is None and parent:
            resumed = self.resolve(parent)
            parents = [ParentEdge(resumed.ref, resumed.sha256, relation).to_dict()]
        origin = origin_of(folder)
        if origin and not parent and self._same_tensors(origin, converted.tensors):
            # Exported from a version here: the converted tensors are that version's, bit for bit.
            parents = [*(parents or []), imported_from(origin)]
        hyperparameters = {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                                                  "use_dora", "base_model_name_or_path", "peft_version") if k in config}
        return self.add_version(name, converted.tensors, converted.config, base, dataset, parents,
                                training={"tool": "peft", "hyperparameters": hyperparameters, "losses": None},
                                tags=tags, description=description,
                                source={"path": str(folder.resolve()), "format": "peft", "checkpoint": None})

    def _same_tensors(self, origin: dict, tensors: dict) -> bool:
        """Whether `tensors` are exactly, bit for bit, the tensors of the version `origin` names."""
        import mlx.core as mx
        import numpy as np

        from .safetensors_io import read_bits

        version = self.find(origin["ref"])
        if version is None or version.sha256 != origin["sha256"]:
            return False
        theirs = read_header(self.objects.path(version.sha256))
        if set(tensors) != set(theirs.tensors):
            return False
        for key, array in tensors.items():
            bits = read_bits(theirs, key)
            ours = np.asarray(array.view(getattr(mx, f"uint{8 * array.dtype.size}")))
            if ours.shape != bits.shape or not np.array_equal(ours, bits):
                return False
        return True


def origin_of(folder: Path) -> dict | None:
    """The version record an exported folder carries (adapterhub.json), if any."""
    record = read_json(folder / RECORD_FILE)
    # Untrusted text: only a well-formed claim is weighed (and import still proves it by the weights' hash).
    if isinstance(record, dict) and isinstance(record.get("ref"), str) and naming.is_sha256(record.get("sha256")):
        return record
    return None


def imported_from(origin: dict) -> dict:
    return {"ref": origin["ref"], "sha256": origin["sha256"], "relation": "imported-from"}
