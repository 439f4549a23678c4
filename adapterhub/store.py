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
from typing import Iterator

from tinydb import TinyDB
from tinydb.storages import Storage

from .errors import CorruptRegistryError, AdapterHubError
from .safetensors_io import Progress, copy_hashed, sha256_file

TMP_SUFFIX = ".tmp"
LOCK_TIMEOUT_S = float(os.environ.get("ADAPTERHUB_LOCK_TIMEOUT", "300"))


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


def require_new_folder(out: Path) -> None:
    """Refuse to write into a folder that already has something in it."""
    from .errors import ConflictError

    if out.exists() and any(out.iterdir()):
        raise ConflictError(f"{out} exists and is not empty", hint="give a new folder for --out")


@contextmanager
def staged_folder(out: Path, purpose: str) -> Iterator[Path]:
    """A hidden sibling folder to fill, renamed to `out` when the block succeeds and removed when it fails,
    so `out` is either complete or absent."""
    import shutil

    out = Path(out)
    require_new_folder(out)
    staging = out.parent / f".{out.name}.{purpose}-{os.getpid()}.tmp"
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, doc: object) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, default: object = None) -> object:
    """Read a JSON file; a missing file gives `default`, a damaged one CorruptRegistryError."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptRegistryError(
            f"{path} is damaged: {e.msg} at line {e.lineno}",
            hint="restore it from a backup or remove it; then run 'adapterhub verify'",
        ) from None


class AtomicJSONStorage(Storage):
    """TinyDB storage that never creates a file on read and replaces it atomically on write.

    TinyDB's own JSONStorage rewrites the file in place, which a crash or a second
    process can leave truncated (tinydb issues #529, #537).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self):
        return read_json(self.path)

    def write(self, data) -> None:
        # json.dumps, not json.dump: only the one-shot path uses the C encoder.
        with atomic_write(self.path, "w") as f:
            f.write(json.dumps(data, separators=(",", ":"), sort_keys=True))

    def close(self) -> None:
        pass


def open_db(path: Path) -> TinyDB:
    return TinyDB(path, storage=AtomicJSONStorage)


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
            self._lock = FileLock(str(self.path), timeout=LOCK_TIMEOUT_S)
        try:
            with self._lock:
                yield
        except Timeout:
            raise AdapterHubError(
                f"the registry is locked by another process (waited {LOCK_TIMEOUT_S:.0f} s for {self._lock.lock_file})",
                hint="wait for the other adapterhub command to finish, or raise ADAPTERHUB_LOCK_TIMEOUT",
            ) from None


class ObjectStore:
    """Content-addressed blobs: `objects/<sha[:2]>/<sha>`, written once, deduplicated."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
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
                if not blob.name.endswith(TMP_SUFFIX):
                    yield blob.name

    def leftovers(self) -> list[Path]:
        """Temporary files a killed writer left behind."""
        return sorted(p for p in self.root.rglob(f"*{TMP_SUFFIX}"))
