"""Publishing safely to a bucket many machines write at once: compare-and-swap on refs documents, leases on blobs.

A refs document changes only through `update`: read it with its ETag, apply the change to
what was read, write it back with If-Match (If-None-Match: * when it did not exist), and on
a refusal (412, or 409 while another conditional write is in flight) read again and re-apply
after a random pause that doubles each time, a bounded number of times. The change is a
function of the document, so a retry decides again on what is there now (the next version
number, whether an alias still points where --expect says).

Blob uploads are claimed with a lease object written create-only: the first pusher uploads,
the others wait for the blob, so two pushes of the same bytes send them once. A multipart
upload cannot be made conditional through obstore, which is why large blobs need the claim
at all. A lease whose holder died is taken over (by compare-and-swap on the lease): at once
when the holder ran on this host and its pid is gone, else when it has not been renewed for
LEASE_TTL_S (a holder renews it every LEASE_RENEW_S while it uploads).
"""

from __future__ import annotations

import copy
import os
import random
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterator, TypeVar

from ..errors import AdapterHubError, ConflictError
from ..records import now
from ..runs import process_alive
from . import layout
from .bucket import Bucket

T = TypeVar("T")
MAX_ATTEMPTS = 24
FIRST_PAUSE_S = 0.02
MAX_PAUSE_S = 1.0
LEASE_TTL_S = 120.0
LEASE_RENEW_S = 30.0
LEASE_WAIT_S = 3600.0  # the longest a push waits for someone else's upload of one blob


def who() -> str:
    """user@host, recorded with what a writer changes, so a conflict can name the winner."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def update(bucket: Bucket, key: str, change: Callable[[dict | None], tuple[dict | None, T]],
           read: Callable[[bytes], dict], what: str) -> T:
    """Apply `change` to the document at `key` by compare-and-swap; returns what `change` returned.

    Args:
        change: given a private copy of the document (None when there is none), returns (the new
            document, or None to write nothing; a result). It may raise to refuse (ConflictError).
        read: bytes -> document, raising on a damaged one (nothing is written over damage).
    """
    for attempt in range(MAX_ATTEMPTS):
        got = bucket.get(key)
        doc, etag = (read(got[0]), got[1].etag) if got else (None, None)
        new, result = change(copy.deepcopy(doc))
        if new is None:
            return result
        new["updated_at"] = now()
        if bucket.replace(key, layout.canonical(new, bucket.where(key)), etag):
            return result
        time.sleep(random.uniform(0, min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** attempt)))
    raise ConflictError(f"{bucket.where(key)} kept changing under {what}: {MAX_ATTEMPTS} writes in a row were overtaken "
                        "by other writers", hint="retry in a moment; nothing of this attempt was published")


# ---- upload leases ---------------------------------------------------------------


def _lease_doc(token: str) -> bytes:
    return layout.canonical({"owner": token, "host": socket.gethostname(), "pid": os.getpid(), "by": who(),
                             "renewed_at": now()})


def lease_is_stale(doc: object, last_modified: datetime | None) -> bool:
    """A lease whose holder is gone: a dead pid on this host, or no renewal for LEASE_TTL_S (clocks are trusted
    to within a minute, as S3 itself requires for signatures)."""
    if isinstance(doc, dict) and isinstance(doc.get("pid"), int) and not process_alive(doc["pid"], doc.get("host")):
        return True
    if last_modified is None:
        return False
    return (datetime.now(timezone.utc) - last_modified).total_seconds() > LEASE_TTL_S


def upload_once(bucket: Bucket, sha256: str, send: Callable[[], None], renew: bool = False) -> bool:
    """Make sure blob `sha256` is in the bucket, uploading it with `send` only if no one else is or has.

    Returns True when this call uploaded it, False when it was there or another pusher put it there.
    """
    key, lease = layout.blob_key(sha256), layout.lease_key(sha256)
    waited, pause = 0.0, 0.05
    while True:
        if bucket.head(key):
            return False
        token = uuid.uuid4().hex
        taken = bucket.create(lease, _lease_doc(token))
        if not taken:
            got = bucket.get(lease)
            if got is None:
                continue  # released between our write and our read: try again at once
            holder = layout.parse(got[0], bucket.where(lease), "it is removed by 'adapterhub verify --remote --repair'")
            if lease_is_stale(holder, got[1].last_modified):
                taken = bucket.replace(lease, _lease_doc(token), got[1].etag)
        if taken:
            try:
                # The blob may have landed between our HEAD and our claim; the claim makes this look final.
                if bucket.head(key):
                    return False
                with _renewing(bucket, lease, token) if renew else _nothing():
                    send()
                return True
            finally:
                bucket.delete(lease)
        if waited > LEASE_WAIT_S:
            raise AdapterHubError(f"waited {waited:.0f} s for another push to upload {bucket.where(key)}",
                                  hint=f"retry; if that push died, its lease {bucket.where(lease)} expires after "
                                       f"{LEASE_TTL_S:.0f} s")
        time.sleep(pause)
        waited += pause
        pause = min(2.0, pause * 1.5)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _renewing(bucket: Bucket, lease: str, token: str) -> Iterator[None]:
    """Renew the lease every LEASE_RENEW_S while a long upload runs, so no one takes it over as stale."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                got = bucket.get(lease)
                holder = layout.parse(got[0], lease, "") if got else None
                if not isinstance(holder, dict) or holder.get("owner") != token:
                    return  # taken over: the other pusher uploads the same bytes; ours finishes anyway
                bucket.replace(lease, _lease_doc(token), got[1].etag)
            except AdapterHubError:
                continue  # a renewal that failed is tried again; the upload itself reports real trouble

    thread = threading.Thread(target=beat, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
