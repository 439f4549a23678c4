"""The records adapterhub stores, and the small rules about them that every layer shares.

Pure: no I/O. A version record is a dict validated against schemas/adapter_version.schema.json;
`AdapterVersion` is its read-only face.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

# mlx-lm's adapter folder: the two files every version stores.
WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
RECORD_FILE = "adapterhub.json"  # a record written beside weights (fused models, exports) so they carry their lineage
# Relations whose parent is a version of this registry (others name models or remote repos).
VERSION_RELATIONS = ("resumed-from", "stacked-from", "promoted-from")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _View:
    """A read-only view of a stored record: fields set once, then only read, compared by value.

    A plain class, not a frozen dataclass: creating one costs every command's start-up about a
    millisecond each (generated methods are exec'd at import), and `show` is mostly start-up.
    `__slots__` names the fields, in the order positional arguments take them.
    """

    __slots__ = ()
    _defaults: tuple = ()  # values of the trailing fields a caller may leave out
    __hash__ = None  # records hold dicts: as unhashable as a frozen dataclass of them

    def __init__(self, *values, **named) -> None:
        names = self.__slots__
        if len(values) == len(names) and not named:  # the common call, made once per listed version
            for name, value in zip(names, values):
                object.__setattr__(self, name, value)
            return
        defaults = self._defaults
        given = {**dict(zip(names[len(names) - len(defaults):], defaults)), **dict(zip(names, values)), **named}
        if len(values) > len(names) or given.keys() != set(names):
            raise TypeError(f"{type(self).__name__} takes {', '.join(names)}")
        for name in names:
            object.__setattr__(self, name, given[name])

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    __delattr__ = __setattr__

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


class _Fields(_View):
    """A record that is exactly its fields, with from_dict/to_dict; an optional field (one with a default
    of None) left at None is omitted from the dict, as the schemas expect (a stack weight appears only
    on stack edges)."""

    __slots__ = ()

    @classmethod
    def from_dict(cls, doc: dict):
        names, defaults = cls.__slots__, cls._defaults
        required = len(names) - len(defaults)
        return cls(*(doc[n] for n in names[:required]), *(doc.get(n, d) for n, d in zip(names[required:], defaults)))

    def to_dict(self) -> dict:
        optional = self.__slots__[len(self.__slots__) - len(self._defaults):]
        out = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            out[name] = dict(value) if isinstance(value, dict) else value
        return out


class FileEntry(_Fields):
    """A stored file: its name in the folder it belongs to, its sha256 and its size in bytes."""

    __slots__ = ("name", "sha256", "size")
    name: str
    sha256: str
    size: int


class ParentEdge(_Fields):
    """Where a version came from: a parent's ref and sha256, how (`relation`), and a stack weight if any."""

    __slots__ = ("ref", "sha256", "relation", "weight")
    _defaults = (None,)
    ref: str
    sha256: str
    relation: str
    weight: float | None


class BaseRef(_Fields):
    """What a version or fused model records of its base: enough to find it and to tell its structure."""

    __slots__ = ("name", "sha256", "structure_sha256", "model_type")
    name: str
    sha256: str
    structure_sha256: str
    model_type: str | None


class DatasetRef(_Fields):
    """What a version records of the data it was trained on: name, content hash, examples per split."""

    __slots__ = ("name", "sha256", "examples")
    name: str
    sha256: str
    examples: dict


class BaseModel(_View):
    """A registered base model (schemas/base_model.schema.json): its row, read through properties."""

    __slots__ = ("record",)
    record: dict

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    @property
    def structure_sha256(self) -> str:
        return self.record["structure_sha256"]

    @property
    def config(self) -> dict:
        return self.record["config"]

    @property
    def path(self) -> Path | None:
        return Path(self.record["path"]) if self.record.get("path") else None

    def to_dict(self) -> dict:
        return dict(self.record)


class ResolvedBase(_View):
    """A base as a command names it (folder, Hub id or registered name), resolved once.

    `fingerprint` is what the bytes say (for a name, the registered row's own fields), `record`
    the registered base it matches if any, `path` the folder its weights are read from.
    """

    __slots__ = ("fingerprint", "record", "path")

    fingerprint: dict
    record: BaseModel | None
    path: Path | None

    @property
    def sha256(self) -> str:
        return self.fingerprint["sha256"]

    @property
    def structure_sha256(self) -> str:
        return self.fingerprint["structure_sha256"]

    @property
    def config(self) -> dict:
        return self.fingerprint["config"]

    @property
    def name(self) -> str | None:
        """The registered name, or None for a folder not registered yet."""
        return self.record.name if self.record else None



class TrainingRun(_View):
    """One training run (schemas/training_run.schema.json): where it is, how far, how it ended."""

    __slots__ = ("record",)

    record: dict

    @property
    def run_id(self) -> str:
        return self.record["id"]

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def step(self) -> int:
        return self.record.get("step") or 0

    @property
    def folder(self) -> Path:
        return Path(self.record["dir"])

    @property
    def config(self) -> dict:
        return self.record["config"]

    @property
    def result(self) -> str | None:
        return self.record.get("result")

    def to_dict(self) -> dict:
        return dict(self.record)


class AdapterVersion(_View):
    """One registered adapter version, as `show` reports it: the stored record and its typed views.

    `record` stays the dict the schema describes (and `--json` prints); the properties are
    how code reads it, so a field's name is spelled in one place.
    """

    __slots__ = ("record", "aliases")
    _defaults = ((),)

    def __init__(self, record: dict, aliases: tuple[str, ...] = ()) -> None:
        # Made once per listed version: the two fields set directly, without _View's general path.
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "aliases", aliases)

    record: dict
    aliases: tuple[str, ...]  # default ()

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

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def rank(self) -> int:
        return self.record["rank"]

    @property
    def scale(self) -> float:
        return self.record["scale"]

    @property
    def layers(self) -> list[int]:
        return list(self.record["layers"])

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.record["tags"])

    @property
    def base(self) -> BaseRef | None:
        return BaseRef.from_dict(self.record["base"]) if self.record.get("base") else None

    @property
    def dataset(self) -> DatasetRef | None:
        return DatasetRef.from_dict(self.record["dataset"]) if self.record.get("dataset") else None

    @property
    def parents(self) -> tuple[ParentEdge, ...]:
        return tuple(ParentEdge.from_dict(p) for p in self.record["parents"])

    @property
    def files(self) -> tuple[FileEntry, ...]:
        return tuple(FileEntry.from_dict(f) for f in self.record["files"])

    @property
    def modules(self) -> dict[str, tuple[int, ...]] | None:
        """Module path -> (in, out[, experts]); None in records written before versions kept it."""
        modules = self.record.get("modules")
        return {m: tuple(shape) for m, shape in modules.items()} if modules is not None else None

    def file_sha(self, filename: str) -> str:
        return next(f.sha256 for f in self.files if f.name == filename)

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


# Scores that improve downwards; every other recorded score (exact_match, token_accuracy) improves upwards.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


class EvalResult(_View):
    """One recorded evaluation (schemas/evaluation.schema.json), and whether this call reused it.

    `row` stays the dict the schema describes; readers use the properties.
    """

    __slots__ = ("row", "reused")
    _defaults = (False,)

    row: dict
    reused: bool  # default False

    @classmethod
    def from_dict(cls, doc: dict, reused: bool = False) -> "EvalResult":
        return cls(dict(doc), reused)

    def to_dict(self) -> dict:
        return dict(self.row)

    @property
    def metric(self) -> str:
        return self.row["metric"]

    @property
    def split(self) -> str:
        return self.row["split"]

    @property
    def value(self) -> float:
        return self.row["value"]

    @property
    def subject_sha256(self) -> str:
        return self.row["subject"]["sha256"]

    @property
    def measure(self) -> tuple:
        """What was measured, whatever it was measured on: the same measure on two subjects compares them."""
        s = self.row["settings"]
        return (self.row["dataset"]["sha256"], self.split, self.metric, s["batch_size"], s["max_seq_length"],
                s["completion_only"])

    @property
    def key(self) -> tuple:
        """A recorded evaluation is reused for the same subject, measure and base."""
        return (self.subject_sha256, *self.measure, self.row["base"]["sha256"])

    @property
    def scores(self) -> dict[str, float]:
        """`{split}_{score}` -> value, the names `list --sort eval:` and `compare` use (test_loss, test_exact_match)."""
        return {f"{self.split}_{name}": value for name, value in self.row["scores"].items()}

    def summary(self) -> str:
        s = self.row["scores"]
        if self.metric == "loss":
            shown = f"loss {s['loss']:.4f}" + (f", perplexity {s['perplexity']:.2f}" if "perplexity" in s else "")
        else:
            correct = self.row.get("correct")
            shown = (f"exact match {100 * s['exact_match']:.1f} %"
                     + (f" ({correct}/{self.row['examples']})" if correct is not None else "")
                     + f", token accuracy {100 * s['token_accuracy']:.1f} %")
        return f"{self.split} {shown} on {self.row['dataset']['name']} ({self.row['examples']} examples)"
