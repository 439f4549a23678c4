"""Writing files of tensors; reading and checking them is safetensors_io's.

StreamingWriter writes a safetensors file front to back, hashed as it goes, renamed into
place when done. ShardWriter writes a file whose layout is fixed before the first byte (as
fuse and unfuse know theirs from lazy graphs), so copying, hashing and writing run on threads
of their own while the caller computes. ByteBudget bounds what is handed over and not yet
written; Profile says where a pipeline's seconds went.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import InvalidAdapterError
from .safetensors_io import CHUNK, Progress


class _Lane:
    """One background thread draining a bounded queue of chunks (hashlib and file writes release the GIL).

    The queue is deep (32 chunks of 8 MB, shared by both lanes of a writer) so hashing keeps
    going while the producer computes a tensor, instead of the two taking turns.
    """

    def __init__(self, consume: Callable[[bytes], None], depth: int = 32):
        import queue
        import threading

        self._queue: "queue.Queue[bytes | None]" = queue.Queue(depth)
        self._consume = consume
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._consume(chunk)
                except BaseException as e:  # noqa: BLE001 - re-raised in the producer by finish()
                    self._error = e

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class StreamingWriter:
    """Writes a safetensors file front to back: header first, then each tensor in order.

    Bytes go to a temporary file and are hashed as they are written, each on its
    own thread so hashing, writing and the caller's work overlap; `close()`
    renames the file into place, so a crash never leaves a truncated file under
    its name.
    """

    SYNC_EVERY = 256 << 20  # flush as we go, so close() does not wait for the whole file

    def __init__(self, path: Path, header: bytes, progress: Progress | None = None):
        from .files import temp_path_for

        self.path = Path(path)
        self._tmp = temp_path_for(self.path)
        self._file = open(self._tmp, "wb", buffering=0)
        self._digest = hashlib.sha256()
        self._size = self._unsynced = 0
        self._progress = progress
        self._hashing = _Lane(self._digest.update)
        self._writing = _Lane(self._write_chunk)
        self.write(header)

    def _write_chunk(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[self._file.write(view):]
        self._unsynced += len(chunk)
        if self._unsynced >= self.SYNC_EVERY:
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def write(self, data: bytes | memoryview) -> None:
        chunk = bytes(data)
        self._hashing.put(chunk)
        self._writing.put(chunk)
        self._size += len(chunk)
        if self._progress:
            self._progress(len(chunk))

    def copy_range(self, source: BinaryIO, offset: int, length: int) -> None:
        """Copy bytes from another file without decoding them."""
        source.seek(offset)
        while length:
            chunk = source.read(min(length, CHUNK))
            if not chunk:
                raise InvalidAdapterError(f"{source.name} ended early", hint="the file is truncated")
            self.write(chunk)
            length -= len(chunk)

    def close(self) -> tuple[str, int]:
        self._hashing.finish()
        self._writing.finish()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self._digest.hexdigest(), self._size

    def abort(self) -> None:
        for lane in (self._hashing, self._writing):
            try:
                lane.finish()
            except BaseException:  # noqa: BLE001 - the original error matters, not this one
                pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


# ---- the fuse / unfuse pipeline: files whose layout is known before the first byte ----

PROFILE_FIELDS = ("reading", "computing", "restore", "copying", "writing", "hashing", "waiting")
COPY_BLOCK = 64 << 20  # one kernel copy call: large, so the per-call cost vanishes
WRITEBACK_EVERY = 256 << 20  # how often a writer asks the kernel to start writing its dirty pages


class Profile:
    """Seconds per activity, summed over the threads that did it.

    The pipeline overlaps its activities, so they may add up to more than the wall time;
    "waiting" is the computing thread blocked on the writers (memory budget, final flush).
    With `activities` False only the wall time is kept: nobody asked, so the writer threads
    skip the shared lock they would otherwise take for every block.
    """

    def __init__(self, activities: bool = True):
        import threading
        import time

        self._clock = time.perf_counter
        self.started = self._clock()
        self.activities = activities
        self.seconds = dict.fromkeys(PROFILE_FIELDS, 0.0)
        self._lock = threading.Lock()

    def add(self, what: str, seconds: float) -> None:
        if self.activities:
            with self._lock:
                self.seconds[what] += seconds

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        if not self.activities:
            yield
            return
        start = self._clock()
        try:
            yield
        finally:
            self.add(what, self._clock() - start)

    def to_dict(self) -> dict[str, float]:
        activities = {k: round(v, 3) for k, v in self.seconds.items()} if self.activities else {}
        return {"wall": round(self._clock() - self.started, 3), **activities}


def format_profile(profile: dict[str, float]) -> str:
    """One line for a person: `profile  wall 12.3 s | reading 1.0 | computing 5.2 | ...`."""
    rest = " | ".join(f"{k} {v:.2f}" for k, v in profile.items() if k != "wall")
    return f"profile  wall {profile['wall']:.2f} s | {rest}  (seconds per activity, summed over threads)"


class ByteBudget:
    """Bytes handed to writer threads and not yet written, shared by every file of one command.

    The producer waits while the budget is spent, so memory stays bounded however far
    ahead it computes; one item always passes, so a tensor larger than the budget still goes.
    """

    def __init__(self, limit: int):
        import threading

        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._changed:
            while self.used and self.used + n > self.limit:
                self._changed.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._changed:
            self.used -= n
            self._changed.notify_all()


@lru_cache(maxsize=1)
def writeback():
    """A call (fd, offset, length) that starts writing a file's dirty pages to disk without waiting
    for them (Linux's sync_file_range with SYNC_FILE_RANGE_WRITE; length 0: to the end), or None
    where the C library lacks it. The fsync that ends a file then finds little left to do."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, offset, length: call(fd, offset, length, 2)


class _Stopped(Exception):
    pass


class ShardWriter:
    """Writes one file from a layout fixed before the first byte, on two threads of its own.

    `parts` is the file after `header`, in order: ("copy", offset, length) for bytes taken
    unchanged from `source`, ("put", length) for bytes the caller hands over with `put`, in
    that order, while it goes on computing the next ones. Every part's place in the file is
    known up front, so the copying needs no order: one thread copies the unchanged ranges in
    large blocks in the kernel (copy_file_range: no trip through Python, a reflink where the
    filesystem has one; large reads and writes where the call is missing), while the other
    walks the file in order, hashing the same ranges as it reads them from the source (one
    read, which the copy's has just brought into the page cache) and hashing and writing what
    `put` hands over. hashlib releases the GIL, so the writers of several files hash on
    several cores. The file is fsynced before `close` returns its sha256 and size; it is
    written directly under `path`, which suits a staging folder renamed into place (or
    removed) as a whole.
    """

    def __init__(self, path: Path, header: bytes, parts: list[tuple], source: Path | None = None,
                 budget: ByteBudget | None = None, profile: Profile | None = None, progress: Progress | None = None):
        import queue
        import threading

        self.path = Path(path)
        self._header, self._parts, self._source = header, parts, source
        self._budget = budget or ByteBudget(512 << 20)
        self._profile = profile or Profile(activities=False)
        self._progress = progress
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._digest = hashlib.sha256()
        self._size = sum(p[-1] for p in parts) + len(header)
        self._written = self._synced = 0
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._stop = False
        self._src = os.open(source, os.O_RDONLY) if any(p[0] == "copy" for p in parts) else None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except BaseException:
            self._fd = None
            self._close_files()
            raise
        self._ended = False  # the hashing thread took close's or abort's end mark
        self._hash_buffer: memoryview | None = None
        self._threads = [threading.Thread(target=self._guarded, args=(run,), name=f"{run.__name__} {self.path.name}",
                                          daemon=True) for run in (self._hash_in_order, self._copy_ranges)]
        for thread in self._threads:
            thread.start()

    # -- the caller's side --------------------------------------------------

    def put(self, data) -> None:
        """Hand over the next "put" part: any C-contiguous buffer, kept alive until it is written."""
        view = memoryview(data).cast("B")
        if self._errors:
            raise self._errors[0]
        with self._profile.timing("waiting"):
            self._budget.acquire(view.nbytes)
        self._queue.put(view)

    def close(self) -> tuple[str, int]:
        """Wait for the file to be written and synced; returns (sha256, size)."""
        self._queue.put(None)
        with self._profile.timing("waiting"):
            for thread in self._threads:
                thread.join()
            if not self._errors:
                with self._profile.timing("writing"):
                    os.fsync(self._fd)
        self._close_files()
        if self._errors:
            raise self._errors[0]
        if self._written != self._size:  # a planning error, never a short file under a good hash
            raise ValueError(f"{self.path.name}: {self._written} bytes written of {self._size} planned")
        return self._digest.hexdigest(), self._size

    def abort(self) -> None:
        """Stop at the next block and delete the partial file."""
        self._stop = True
        self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._close_files()
        self.path.unlink(missing_ok=True)

    def _close_files(self) -> None:
        for fd in (self._fd, self._src):
            if fd is not None:
                os.close(fd)
        self._fd = self._src = None

    # -- the two threads ----------------------------------------------------

    def _guarded(self, run) -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - raised in the caller by put() or close()
            self._errors.append(e)
            self._stop = True  # the other thread stops at its next block
            if run == self._hash_in_order and not self._ended:
                # Keep taking what the caller hands over, so it never waits for memory this thread holds.
                while (view := self._queue.get()) is not None:
                    self._budget.release(view.nbytes)

    def _hash_in_order(self) -> None:
        self._hash(memoryview(self._header))
        self._write(memoryview(self._header), 0)
        offset = len(self._header)
        for part in self._parts:
            if part[0] == "copy":
                self._hash_source(part[1], part[2])
            else:
                view = self._queue.get()
                if view is None:  # closed or aborted before every part came
                    self._ended = True
                    raise _Stopped(f"{self.path.name} was closed before every part was written")
                try:
                    if view.nbytes != part[1]:
                        raise ValueError(f"{self.path.name}: a part of {view.nbytes} bytes where {part[1]} were planned")
                    self._hash(view)
                    self._write(view, offset)
                finally:
                    self._budget.release(view.nbytes)
            offset += part[-1]

    def _copy_ranges(self) -> None:
        offset = len(self._header)
        kernel = hasattr(os, "copy_file_range")
        buffer = None
        for part in self._parts:
            if part[0] == "copy":
                source, length, done = part[1], part[2], 0
                while done < length:
                    if self._stop:
                        return
                    n = min(COPY_BLOCK, length - done)
                    if not (kernel and self._copy_in_kernel(source + done, offset + done, n)):
                        kernel = False  # another filesystem (older kernels), or one without the call
                        buffer = buffer or memoryview(bytearray(CHUNK))
                        n = min(CHUNK, n)
                        with self._profile.timing("reading"):
                            if os.preadv(self._src, [buffer[:n]], source + done) != n:
                                raise self._truncated()
                        self._write(buffer[:n], offset + done)
                    done += n
            offset += part[-1]

    def _hash(self, view: memoryview) -> None:
        with self._profile.timing("hashing"):
            self._digest.update(view)

    def _hash_source(self, offset: int, length: int) -> None:
        """Hash a range of the source, read in blocks into one reused buffer.

        Not through a mapping: unmapping a window makes the kernel flush the other cores'
        TLBs, which stalled every thread of the process (a third slower in all, on 2 cores).
        """
        buffer = self._hash_buffer = self._hash_buffer or memoryview(bytearray(CHUNK))
        done = 0
        while done < length:
            if self._stop:
                raise _Stopped(f"{self.path.name} was aborted")
            with self._profile.timing("reading"):
                n = os.preadv(self._src, [buffer[:min(CHUNK, length - done)]], offset + done)
            if n == 0:
                raise self._truncated()
            with self._profile.timing("hashing"):
                self._digest.update(buffer[:n])
            done += n

    def _write(self, view: memoryview, offset: int) -> None:
        n = view.nbytes
        with self._profile.timing("writing"):
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        self._advance(n)

    def _advance(self, n: int) -> None:
        """Count bytes in place; start their writeback every WRITEBACK_EVERY bytes, so close's fsync has little left."""
        with self._lock:
            self._written += n
            due = self._written - self._synced >= WRITEBACK_EVERY
            if due:
                self._synced = self._written
        if self._progress:
            self._progress(n)
        start = writeback()
        if due and start:
            start(self._fd, 0, 0)  # the whole file: the two threads write in different places

    def _copy_in_kernel(self, source: int, target: int, n: int) -> bool:
        """Copy n bytes of the source in the kernel; False where the call is not supported (then nothing was copied)."""
        import errno

        done = 0
        with self._profile.timing("copying"):
            try:
                while done < n:
                    copied = os.copy_file_range(self._src, self._fd, n - done, source + done, target + done)
                    if copied == 0:
                        raise self._truncated()
                    done += copied
            except OSError as e:
                if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                return False
        self._advance(n)
        return True

    def _truncated(self) -> InvalidAdapterError:
        return InvalidAdapterError(f"{self._source} ended early", hint="the file is truncated")


