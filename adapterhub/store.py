"""The only module that imports TinyDB: atomic files, the registry lock, the object store.

The catalogue is many small TinyDB files rather than one big one, so the cost
of a read or write follows the size of what it touches, not of the registry.
Every file is replaced by an atomic rename, so a reader never sees half a file
and a killed writer leaves at worst an orphan temporary file.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tinydb import TinyDB
from tinydb.storages import Storage

from . import jsonio
from .errors import AdapterHubError, CorruptRegistryError, InvalidAdapterError
from .naming import is_sha256
from .safetensors_io import Progress, copy_hashed, sha256_file

TMP_SUFFIX = ".tmp"
ENV_LOCK_TIMEOUT = "ADAPTERHUB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 300.0
REGISTRY_MARKER = "registry.json"


def lock_timeout_s() -> float:
    """Seconds to wait for the registry lock; read when a lock is taken, so a bad value is one clear error."""
    raw = os.environ.get(ENV_LOCK_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")):
        raise AdapterHubError(f"{ENV_LOCK_TIMEOUT}={raw!r} is not a number of seconds",
                              hint="set it to a number of seconds such as 300, or unset it")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique hidden sibling of `path`, so concurrent writers never share a temp file."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


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
    from .errors import ConflictError

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
    """The pid in a temporary file's name (temp_path_for's `.name.PID.uuid.tmp`), None when it has none."""
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


def parse_json(text: str | bytes, where: object) -> object:
    """Strict JSON (jsonio): no NaN/Infinity, no overflow, bounded nesting.

    Raises:
        CorruptRegistryError: "`where` is damaged: …", when `where` lies in a registry.
        InvalidAdapterError: the same, for a user's file (a config, an index, a folder's record).
    """
    try:
        return jsonio.loads(text)
    except jsonio.JSONError as e:
        problem = str(e)
    if isinstance(where, Path) and enclosing_registry(where.absolute()) is None:
        raise InvalidAdapterError(f"{where} is damaged: {problem}", hint="fix the file, or write it again with the tool that made it")
    raise CorruptRegistryError(f"{where} is damaged: {problem}",
                               hint="restore it from a backup or remove it; then run 'adapterhub verify'")


def read_json(path: Path, default: object = None) -> object:
    """Read a JSON file; a missing file gives `default`, a damaged one CorruptRegistryError."""
    try:
        text = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return default
    except IsADirectoryError:
        raise CorruptRegistryError(f"{path} is a folder, not a JSON file", hint="remove it or give the file") from None
    return parse_json(text, Path(path))


class AtomicJSONStorage(Storage):
    """TinyDB storage that never creates a file on read and replaces it atomically on write.

    TinyDB's own JSONStorage rewrites the file in place, which a crash or a second
    process can leave truncated (tinydb issues #529, #537).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self):
        data = read_json(self.path)
        if data is not None:
            _check_tables(data, self.path)
        return data

    def write(self, data) -> None:
        # json.dumps, not json.dump: only the one-shot path uses the C encoder.
        text = dump_json(data, self.path, separators=(",", ":"))
        with atomic_write(self.path, "w") as f:
            f.write(text)

    def close(self) -> None:
        pass


def _check_tables(data: object, path: Path) -> None:
    """TinyDB's layout, {table: {doc id: document}}: valid JSON of another shape must not reach TinyDB's internals."""
    ok = isinstance(data, dict) and all(
        isinstance(docs, dict) and all(isinstance(i, str) and i.isdigit() and isinstance(d, dict) for i, d in docs.items())
        for docs in data.values())
    if not ok:
        raise CorruptRegistryError(f"{path} is damaged: not a catalogue file of tables of numbered documents",
                                   hint="restore it from a backup or remove it; then run 'adapterhub verify'")


def open_db(path: Path) -> TinyDB:
    return TinyDB(path, storage=AtomicJSONStorage)


def rewrite_tables(path: Path, change: Callable[[dict], None]) -> None:
    """Change several tables of one catalogue file in a single atomic write: `change` edits the raw
    {table: {doc id: document}} data in place. A kill leaves the file wholly before or wholly after."""
    storage = AtomicJSONStorage(path)
    data = storage.read() or {}
    change(data)
    storage.write(data)


def read_tables(path: Path) -> dict[str, dict[int, dict]]:
    """Every table of a TinyDB file from one read: table -> {doc_id: document}."""
    data = AtomicJSONStorage(path).read() or {}
    return {table: {int(i): doc for i, doc in docs.items()} for table, docs in data.items()}


class RegistryLock:
    """One lock per registry for every write transaction; reentrant within a process."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        # Imported here: read-only commands never lock, and filelock costs start-up time.
        from filelock import FileLock, Timeout

        if self._lock is None:
            self._lock = FileLock(str(self.path), timeout=lock_timeout_s())
        try:
            with self._lock:
                yield
        except Timeout:
            raise AdapterHubError(
                f"the registry is locked by another process (waited {self._lock.timeout:.0f} s for {self._lock.lock_file})",
                hint=f"wait for the other adapterhub command to finish, or raise {ENV_LOCK_TIMEOUT}",
            ) from None


class ObjectStore:
    """Content-addressed blobs: `objects/<sha[:2]>/<sha>`, written once, deduplicated."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        # A sha256 comes from records anyone can edit: anything but 64 hex digits could walk out of objects/.
        if not is_sha256(sha256):
            raise CorruptRegistryError(f"{str(sha256)[:80]!r} is not a sha256", hint="run 'adapterhub verify'")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def verified(self, sha256: str, what: str = "blob") -> Path:
        """The path of a blob whose bytes were just re-hashed to `sha256`.

        Every reader that feeds a blob into weights (export, fuse, stack, train, generate)
        goes through here: a blob overwritten on disk must stop the command, not be used.
        """
        path = self.path(sha256)
        if not path.is_file():
            raise CorruptRegistryError(f"{what} {sha256[:12]} is missing from the object store ({path})",
                                       hint="run 'adapterhub verify' to see what else is damaged")
        if sha256_file(path) != sha256:
            raise CorruptRegistryError(f"{what} {sha256[:12]} is corrupt: its bytes no longer hash to its sha256 ({path})",
                                       hint="run 'adapterhub verify'; re-import the original folder to repair it")
        return path

    def put_file(self, source: Path, progress: Progress | None = None) -> tuple[str, int]:
        """Copy `source` in, hashing it as it is written; returns (sha256, size)."""
        staging = self.root / "tmp"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(staging / "blob")
        try:
            with open(source, "rb", buffering=0) as src, open(tmp, "wb") as dst:
                sha, size = copy_hashed(src, dst, progress)
                dst.flush()
                os.fsync(dst.fileno())
            self.adopt(tmp, sha)
            return sha, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def adopt(self, path: Path, sha256: str) -> None:
        """Move a file already hashed while written (in objects/tmp) to its content address.

        A blob already there is kept only while its bytes still match: a corrupted one is
        replaced by these good bytes, so importing the genuine weights heals the store.
        """
        final = self.path(sha256)
        if final.is_file() and sha256_file(final) == sha256:
            Path(path).unlink()
            return
        final.parent.mkdir(exist_ok=True)
        os.chmod(path, 0o444)
        os.replace(path, final)
        _fsync_dir(final.parent)

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def all(self) -> Iterator[str]:
        for shard in sorted(self.root.glob("[0-9a-f][0-9a-f]")):
            for blob in sorted(shard.iterdir()):
                if is_sha256(blob.name) and blob.name.startswith(shard.name):
                    yield blob.name

    def strays(self) -> list[Path]:
        """Files in the blob shards that are neither blobs nor temporary files: put there by hand."""
        return sorted(p for shard in self.root.glob("[0-9a-f][0-9a-f]") for p in shard.iterdir()
                      if not (is_sha256(p.name) and p.name.startswith(shard.name)) and not p.name.endswith(TMP_SUFFIX))

    def leftovers(self) -> list[Path]:
        """Temporary files a killed writer left behind."""
        return sorted(p for p in self.root.rglob(f"*{TMP_SUFFIX}"))
