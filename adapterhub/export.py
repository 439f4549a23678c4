"""export: a registered version as a folder that mlx_lm or PEFT loads as is, with its card and record.

Beside the weights go `README.md` (the model card) and `adapterhub.json` (the
version record), so the folder carries its own lineage wherever it travels:
imported into another registry, it is recorded as `imported-from` this version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .card import adapter_card
from .errors import AdapterHubError
from .formats import peft as peft_format
from .lineage import safe_member
from .records import RECORD_FILE
from .registry import Registry
from .files import atomic_write, write_json


def export(registry: Registry, ref: str, out_dir: Path | str, format: str = "mlx", force: bool = False) -> list[Path]:
    """Write the folder; mlx weights are byte-identical to what was imported, PEFT's are their exact transpose.

    `out_dir` follows store.check_output: never in the registry, never over an existing
    folder unless `force`.
    """
    version = registry.resolve(ref)
    if format == "peft" and version.kind == "loreft":
        raise AdapterHubError(f"{version.ref} is a LoReFT adapter, which PEFT's LoRA format cannot hold",
                              hint="export it with --format mlx; adapterhub generate and adapterhub.loreft.load_folder load it")
    out = Path(out_dir)
    weights = registry.weights(version)  # the record's claim and the bytes, checked before anything is written
    with registry.staged_output(out, "export", force=force) as staging:
        if format == "mlx":
            copy_stored_files(registry, version, staging)
        else:
            peft_format.from_mlx(weights, version.record, staging, base_reference(registry, version))
        write_json(staging / RECORD_FILE, version.to_dict())
        with atomic_write(staging / "README.md", "w") as f:
            f.write(adapter_card(registry, version, library=format))
        written = sorted(p.name for p in staging.iterdir())
    return [out / name for name in written]


def copy_stored_files(registry: Registry, version, folder: Path) -> None:
    """The version's files as imported (adapters.safetensors, adapter_config.json), byte for byte."""
    for f in version.files:
        # A catalogue file edited by hand must not steer the copy outside `folder`.
        safe_member(f.name, f"the record of {version.ref}")
        blob = registry.objects.verified(f.sha256, f"{f.name} of {version.ref}")
        with open(blob, "rb") as src, atomic_write(Path(folder) / f.name) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def base_reference(registry: Registry, version) -> str | None:
    """What PEFT's base_model_name_or_path should say: the Hub repo when known, else the local folder."""
    ref = version.record.get("base")
    if not ref:
        return None
    record = next((b for b in registry.bases() if b["sha256"] == ref["sha256"]), None)
    return (record or {}).get("hf_repo") or (record or {}).get("path") or ref["name"]
