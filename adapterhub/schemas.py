"""The JSON Schemas in `schemas/`: loaded once, used to validate every record."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import SchemaError

_PACKAGED = Path(__file__).parent / "schemas"
_CHECKOUT = Path(__file__).parent.parent / "schemas"


def schema_dir() -> Path:
    """The folder holding the schemas: inside the wheel, or the checkout's."""
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


@lru_cache(maxsize=None)
def _validator(name: str):
    # jsonschema is imported lazily: `list` and `show` only read records.
    import jsonschema

    path = schema_dir() / f"{name}.schema.json"
    schema = json.loads(path.read_text())
    # The schemas are checked against their metaschema by the test suite, not on every run.
    return jsonschema.validators.validator_for(schema)(schema)


def validate(document: object, name: str, what: str | None = None) -> None:
    """Raise SchemaError with the most relevant violation when `document` breaks schema `name`."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(document))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    raise SchemaError(
        f"{what or name} does not match schema '{name}': {error.message} at {where}",
        hint=f"see {schema_dir() / (name + '.schema.json')}",
    )


def names() -> list[str]:
    """Every schema shipped, by name."""
    return sorted(p.name.removesuffix(".schema.json") for p in schema_dir().glob("*.schema.json"))
