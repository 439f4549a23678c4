"""The object store: content-addressed blobs, `objects/<sha[:2]>/<sha>`, hashed as written, moved in by rename.

Blobs are immutable and deduplicated; a blob is read for weights only after its bytes are hashed
again (`verified`), so one overwritten on disk stops a command instead of being used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from .errors import CorruptRegistryError
from .files import TMP_SUFFIX, _fsync_dir, temp_path_for
from .naming import is_sha256
from .safetensors_io import Progress, copy_hashed, sha256_file


class StagedBlob(NamedTuple):
    """Bytes written into the object store's staging area and hashed while written, not yet at their address."""

    path: Path
    sha256: str
    size: int


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

    def stage(self, chunks: Iterable[bytes]) -> StagedBlob:
        """Write `chunks` into objects/tmp, hashing them as they go; the caller adopts the result or unlinks it."""
        staging = self.root / "tmp"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(staging / "blob")
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedBlob(tmp, digest.hexdigest(), size)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        staged = self.stage([data])
        self.adopt(staged.path, staged.sha256)
        return staged.sha256, staged.size

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
