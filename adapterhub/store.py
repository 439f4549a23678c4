"""The only module that imports TinyDB: catalogue files, the registry lock, the object store.

The catalogue is many small TinyDB files rather than one big one, so the cost
of a read or write follows the size of what it touches, not of the registry.
Every file is replaced by an atomic rename (files.atomic_write).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tinydb import TinyDB
from tinydb.storages import Storage

from .errors import AdapterHubError, CorruptRegistryError
# Re-exported while callers move to files: the file helpers used to live here.
from .files import (REGISTRY_MARKER, TMP_SUFFIX, _fsync_dir, atomic_write, check_output, dump_json,  # noqa: F401
                    enclosing_registry, parse_json, read_json, require_new_folder, staged_folder, staging_path,
                    temp_path_for, write_json, write_output_file, writer_pid)
from .naming import is_sha256
from .safetensors_io import Progress, copy_hashed, sha256_file

ENV_LOCK_TIMEOUT = "ADAPTERHUB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 300.0


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
