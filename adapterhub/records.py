"""The records adapterhub stores, and the small rules about them that every layer shares.

Pure: no I/O. A version record is a dict validated against schemas/adapter_version.schema.json;
`AdapterVersion` is its read-only face.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

# mlx-lm's adapter folder: the two files every version stores.
WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
RECORD_FILE = "adapterhub.json"  # a record written beside weights (fused models, exports) so they carry their lineage
# Relations whose parent is a version of this registry (others name models or remote repos).
VERSION_RELATIONS = ("resumed-from", "stacked-from", "promoted-from")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AdapterVersion:
    """One registered adapter version, as `show` reports it."""

    record: dict
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def version(self) -> int:
        return self.record["version"]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    def file_sha(self, filename: str) -> str:
        return next(f["sha256"] for f in self.record["files"] if f["name"] == filename)

    def to_dict(self) -> dict:
        return {"ref": self.ref, **self.record, "aliases": list(self.aliases)}


def weights_claim_problem(record: dict) -> str | None:
    """A record's `sha256` names its weights; it must be the sha256 its files[] lists for them."""
    listed = next((f["sha256"] for f in record.get("files", ()) if f.get("name") == WEIGHTS_FILE), None)
    if listed == record.get("sha256"):
        return None
    ref = f"{record.get('name')}@{record.get('version')}"
    return f"record {ref} claims weights {str(record.get('sha256'))[:12]} but its files[] list {str(listed)[:12]}"


def unapplied(version: AdapterVersion, created: bool, tags: dict, description: str | None) -> dict:
    """What an import of weights already registered asked for and did not get: versions are immutable,
    so its tags and description are the first import's."""
    if created:
        return {}
    ignored = {}
    changed_tags = {k: v for k, v in tags.items() if version.record["tags"].get(k) != v}
    if changed_tags:
        ignored["tags"] = changed_tags
    if description and description != version.record.get("description"):
        ignored["description"] = description
    return ignored


def base_ref(record: dict) -> dict:
    """The four fields of a base that a version or fused model records about it."""
    return {k: record[k] for k in ("name", "sha256", "structure_sha256", "model_type")}
