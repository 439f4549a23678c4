import json

import jsonschema
import pytest

from adapterhub.errors import SchemaError
from adapterhub.schemas import names, schema_dir, validate
from adapterhub.store import open_db

EXPECTED = {"adapter_version", "base_model", "dataset", "fused_model", "training_run", "checkpoint", "policy",
            "registry", "mlx_adapter_config", "evaluation", "staging"}


def test_every_record_kind_has_a_schema_that_is_itself_valid():
    assert EXPECTED <= set(names())
    for name in names():
        schema = json.loads((schema_dir() / f"{name}.schema.json").read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)


def test_every_record_a_real_import_writes_validates(registry, lora_adapter, tiny_model, tiny_data):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model, dataset=tiny_data)
    validate(json.loads((registry.root / "registry.json").read_text()), "registry")
    validate(json.loads((registry.root / "policy.json").read_text()), "policy")
    for record in open_db(registry.catalog / "bases.json").all():
        validate(dict(record), "base_model")
    for record in open_db(registry.catalog / "datasets.json").all():
        validate(dict(record), "dataset")
    validate(registry.resolve("stories").record, "adapter_version")
    validate(json.loads((lora_adapter / "adapter_config.json").read_text()), "mlx_adapter_config")


def test_a_broken_record_fails_with_the_field_named(registry, lora_adapter):
    record = dict(registry.import_adapter(lora_adapter, "stories")[0].record, rank=0)
    with pytest.raises(SchemaError, match="at rank"):
        validate(record, "adapter_version")
    with pytest.raises(SchemaError, match="'sha256' is a required property"):
        validate({k: v for k, v in record.items() if k != "sha256"}, "adapter_version")


def test_schemas_ship_inside_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).parent.parent
    # Offline: hatchling comes with the [test] extra, so no build environment is downloaded.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("adapterhub-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("adapterhub/schemas/")}
    assert {f"adapterhub/schemas/{n}.schema.json" for n in EXPECTED} <= shipped
