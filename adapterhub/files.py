"""Files a command writes or reads outside TinyDB: atomic writes, staged folders, the output-path rule, strict JSON.

Below everything that writes (the catalogue, the formats, fuse, export, the trainer):
a file is written through a temporary sibling and an atomic rename, so a reader never
sees half a file and a killed writer leaves at worst an orphan temporary file.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import jsonio
from .errors import AdapterHubError, ConflictError, CorruptRegistryError, InvalidAdapterError

TMP_SUFFIX = ".tmp"
REGISTRY_MARKER = "registry.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique hidden sibling of `path`, so concurrent writers never share a temp file."""
    return path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator:
    """Write `path` through a temporary file and an atomic rename; nothing is left on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def enclosing_registry(path: Path) -> Path | None:
    """The registry folder `path` is in (or is), found by its marker file; None outside any registry."""
    for folder in (path, *path.parents):
        if (folder / REGISTRY_MARKER).is_file() and (folder / "objects").is_dir():
            return folder
    return None


def check_output(out: Path, inputs: tuple[Path, ...] = (), force: bool = False, folder: bool = True) -> Path:
    """The one rule for every path a user names for output (--out, export DIR, card --out).

    Never inside a registry or over one, never inside or over a folder the command reads,
    never over an existing file or non-empty folder unless `force` (which never lifts the
    first two rules). Returns the resolved path.

    Raises:
        ConflictError: naming the rule broken and what to give instead.
    """
    target = Path(out).expanduser().resolve()
    registry = enclosing_registry(target)
    if registry is not None:
        raise ConflictError(f"{out} is inside the registry at {registry}; adapterhub never writes there on request",
                            hint="give a path outside the registry")
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source or source in target.parents:
            raise ConflictError(f"{out} is inside {given}, which this command reads or the registry records",
                                hint="give a path outside it")
        if target in source.parents:
            raise ConflictError(f"{out} contains {given}, which this command reads or the registry records",
                                hint="give a path outside it")
    if target.exists():
        if target.is_dir() != folder:
            raise ConflictError(f"{out} exists and is a {'folder' if target.is_dir() else 'file'}",
                                hint=f"give the path of a new {'folder' if folder else 'file'}")
        occupied = any(target.iterdir()) if folder else True
        if occupied and not force:
            what = "is not empty" if folder else "already exists"
            raise ConflictError(f"{out} {what}", hint="give a new path, or pass --force to replace it")
        if occupied and folder and any(target.rglob(REGISTRY_MARKER)):
            # --force replaces the folder: never one that holds a registry.
            raise ConflictError(f"{out} holds a registry, which --force would destroy", hint="give a path outside it")
    return target


def require_new_folder(out: Path, inputs: tuple[Path, ...] = (), force: bool = False) -> None:
    """check_output for a folder, for plans that refuse early (before any work) and write later."""
    check_output(out, inputs, force, folder=True)


def staging_path(out: Path, purpose: str, pid: int) -> Path:
    """Where the process `pid` stages `out` for `purpose`: the one name a staging folder can have."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.{purpose}-{pid}{TMP_SUFFIX}"


def writer_pid(temporary: Path) -> int | None:
    """The pid in a temporary file's name (temp_path_for's `.name.PID.RANDOM.tmp`), None when it has none."""
    parts = Path(temporary).name.split(".")
    return int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None


@contextmanager
def staged_folder(out: Path, purpose: str, inputs: tuple[Path, ...] = (), force: bool = False) -> Iterator[Path]:
    """A hidden sibling folder to fill, renamed to `out` when the block succeeds and removed when it fails,
    so `out` is either complete or absent (with `force`, what was there stays until the new one is whole)."""
    import shutil

    out = Path(out)
    check_output(out, inputs, force, folder=True)
    staging = staging_path(out, purpose, os.getpid())
    staging.mkdir(parents=True)
    try:
        yield staging
        replaced = None
        if out.exists():
            if any(out.iterdir()):
                replaced = out.parent / f".{out.name}.replaced-{os.getpid()}{TMP_SUFFIX}"
                os.replace(out, replaced)
            else:
                out.rmdir()
        os.replace(staging, out)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_output_file(out: Path, text: str, inputs: tuple[Path, ...] = (), force: bool = False) -> Path:
    """A user-named output file (card --out), under check_output's rule, written atomically."""
    check_output(out, inputs, force, folder=False)
    with atomic_write(Path(out), "w") as f:
        f.write(text)
    return Path(out)


def dump_json(doc: object, where: object, **options) -> str:
    """Standard JSON only: a NaN or infinity would be written as tokens no other reader accepts (nor read_json)."""
    try:
        return json.dumps(doc, allow_nan=False, sort_keys=True, **options)
    except ValueError as e:
        raise AdapterHubError(f"refusing to write {where}: {e}", hint="a non-finite number came from the input; fix it there") from None


def write_json(path: Path, doc: object) -> None:
    text = dump_json(doc, path, indent=2) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)


def parse_json(text: str | bytes, where: object, own_output: bool = False) -> object:
    """Strict JSON (jsonio): no NaN/Infinity, no overflow, bounded nesting (own_output: see jsonio.loads).

    Raises:
        CorruptRegistryError: "`where` is damaged: …", when `where` lies in a registry.
        InvalidAdapterError: the same, for a user's file (a config, an index, a folder's record).
    """
    try:
        return jsonio.loads(text, own_output)
    except jsonio.JSONError as e:
        problem = str(e)
    if isinstance(where, Path) and enclosing_registry(where.absolute()) is None:
        raise InvalidAdapterError(f"{where} is damaged: {problem}", hint="fix the file, or write it again with the tool that made it")
    raise CorruptRegistryError(f"{where} is damaged: {problem}",
                               hint="restore it from a backup or remove it; then run 'adapterhub verify'")


def read_json(path: Path, default: object = None, own_output: bool = False) -> object:
    """Read a JSON file; a missing file gives `default`, a damaged one CorruptRegistryError.
    own_output: a file this program wrote (see jsonio.loads)."""
    try:
        text = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return default
    except IsADirectoryError:
        raise CorruptRegistryError(f"{path} is a folder, not a JSON file", hint="remove it or give the file") from None
    return parse_json(text, Path(path), own_output)
