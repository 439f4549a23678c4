"""Typed records read exactly what the stored dicts hold, and write back the same dicts."""

import pytest

from adapterhub.records import BaseRef, DatasetRef, FileEntry, ParentEdge
from adapterhub.schemas import validate


@pytest.fixture
def chained(registry, lora_adapter, lora_adapter_b, tiny_model, tiny_data):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model, dataset=tiny_data, tags={"task": "tell"})
    version, _ = registry.import_adapter(lora_adapter_b, "stories", base=tiny_model, parent="stories@1")
    return registry.resolve("stories@1"), version


def test_typed_views_round_trip_the_stored_record(chained):
    first, second = chained
    record = first.record
    assert first.base == BaseRef.from_dict(record["base"]) and first.base.to_dict() == record["base"]
    assert first.dataset.to_dict() == record["dataset"] and first.dataset.examples["train"] == 64
    assert [f.to_dict() for f in first.files] == record["files"]
    assert (first.kind, first.rank, first.scale, first.layers, first.tags) == (
        record["kind"], record["rank"], record["scale"], record["layers"], {"task": "tell"})
    assert second.parents == (ParentEdge("stories@1", first.sha256, "resumed-from"),)
    assert [p.to_dict() for p in second.parents] == second.record["parents"] and second.dataset is None
    validate(second.record, "adapter_version")


@pytest.mark.parametrize("kind,doc", [
    (FileEntry, {"name": "adapters.safetensors", "sha256": "a" * 64, "size": 3}),
    (ParentEdge, {"ref": "x@1", "sha256": "b" * 64, "relation": "stacked-from", "weight": 0.5}),
    (ParentEdge, {"ref": "x@1", "sha256": "b" * 64, "relation": "resumed-from"}),
    (BaseRef, {"name": "tiny", "sha256": "c" * 64, "structure_sha256": "d" * 64, "model_type": None}),
    (DatasetRef, {"name": "data", "sha256": "e" * 64, "examples": {"train": 4}}),
])
def test_each_part_writes_back_what_it_read(kind, doc):
    assert kind.from_dict(doc).to_dict() == doc
