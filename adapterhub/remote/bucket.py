"""The bucket behind a remote: obstore's S3 client, narrowed to what a shared registry needs.

obstore (Rust's object_store) sends the conditional headers a registry relies on:
`create` puts carry `If-None-Match: *` and `replace` puts `If-Match: <etag>`. Its multipart
uploads take no precondition, so large blobs are guarded by a create-only lease (cas.py).
Credentials come from the AWS environment (AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, web
identity, instance roles, which object_store reads itself) or, when the environment has no
key, from the static keys of the AWS_PROFILE section of ~/.aws/credentials or ~/.aws/config.
They are handed to the client in memory only: never written, never part of a message.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import AdapterHubError, NotFoundError
from .config import Remote

try:
    import obstore as obs
    from obstore.exceptions import (AlreadyExistsError, GenericError, NotFoundError as MissingError,
                                    PermissionDeniedError, PreconditionError, UnauthenticatedError)
    from obstore.store import S3Store
except ImportError:  # an optional extra: only remotes need it
    raise AdapterHubError("remotes need the S3 client obstore, which is not installed",
                          hint="pip install 'adapterhub[s3]'") from None

PART_SIZE = 16 << 20  # multipart part size: big enough that a 13 GB base is under S3's 10,000-part cap
PART_CONCURRENCY = 8
SINGLE_PUT_LIMIT = 64 << 20  # below this a blob is one create-only PUT; above, a multipart upload under a lease
READ_CHUNK = 8 << 20
GET_CONCURRENCY = 64


@dataclass(frozen=True)
class Meta:
    """What a HEAD or a listing says of an object."""

    key: str
    size: int
    etag: str | None
    last_modified: datetime | None


@dataclass
class Stats:
    """Requests and bytes this process sent to and read from the bucket: the push report, tests and the bench read them."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1
            self.bytes_up += up
            self.bytes_down += down

    def to_dict(self) -> dict:
        return {"requests": dict(self.requests), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


class Bucket:
    """A remote's prefix in its bucket; every key below is relative to that prefix."""

    def __init__(self, remote: Remote):
        self.remote = remote
        self.stats = Stats()
        endpoint = (remote.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or _profile().get("endpoint_url"))
        config: dict = {}
        if endpoint:
            config["endpoint"] = endpoint
            config["allow_http"] = endpoint.startswith("http://")
        region = (remote.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or _profile().get("region"))
        if region:
            config["region"] = region
        self.endpoint = endpoint or "AWS S3"
        self._store = S3Store(remote.bucket, prefix=remote.prefix or None, config=config,
                              credential_provider=_profile_credentials(),
                              client_options={"connect_timeout": "5s", "timeout": "600s"},
                              retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=60),
                                            "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                        "max_backoff": timedelta(seconds=5), "base": 2}})

    def where(self, key: str = "") -> str:
        """The object's URL, for messages."""
        return f"{self.remote.url}/{key}" if key else self.remote.url

    # ---- reads ---------------------------------------------------------------

    def head(self, key: str) -> Meta | None:
        with self._errors(f"read {key}"):
            try:
                meta = obs.head(self._store, key)
            except (MissingError, FileNotFoundError):
                return None
            finally:
                self.stats.count("head")
        return _meta(meta)

    def get(self, key: str) -> tuple[bytes, Meta] | None:
        """The object's bytes and what the store says of them (ETag, time), or None when there is none."""
        with self._errors(f"read {key}"):
            try:
                result = obs.get(self._store, key)
                data = bytes(result.bytes())
            except (MissingError, FileNotFoundError):
                self.stats.count("get")
                return None
        self.stats.count("get", down=len(data))
        return data, _meta(result.meta)

    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Many small objects at once (refs documents, records): one round trip's latency, not one per key."""
        if not keys:
            return {}

        async def fetch_all() -> list[bytes | None]:
            gate = asyncio.Semaphore(GET_CONCURRENCY)

            async def fetch(key: str) -> bytes | None:
                async with gate:
                    try:
                        result = await obs.get_async(self._store, key)
                        data = bytes(await result.bytes_async())
                    except (MissingError, FileNotFoundError):
                        self.stats.count("get")
                        return None
                    self.stats.count("get", down=len(data))
                    return data

            return await asyncio.gather(*(fetch(k) for k in keys))

        with self._errors(f"read {len(keys)} objects"):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return dict(zip(keys, asyncio.run(fetch_all())))
            # Called from inside an event loop (a notebook): the same reads on threads.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=16) as pool:
                found = list(pool.map(lambda k: self.get(k), keys))
            return {k: got[0] if got else None for k, got in zip(keys, found)}

    def stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks, as they arrive; NotFoundError naming it when it is missing."""
        with self._errors(f"read {key}"):
            try:
                result = obs.get(self._store, key)
            except (MissingError, FileNotFoundError):
                raise NotFoundError(f"{self.where(key)} is missing", hint=f"run 'adapterhub verify --remote {self.remote.name}'",
                                    kind="object", key=key) from None
            self.stats.count("get")
            for chunk in result.stream(min_chunk_size=READ_CHUNK):
                self.stats.count("chunk", down=len(chunk))
                yield chunk

    def list(self, prefix: str) -> Iterator[Meta]:
        with self._errors(f"list {prefix}"):
            for batch in obs.list(self._store, prefix=prefix, chunk_size=1000):
                self.stats.count("list")
                for meta in batch:
                    yield _meta(meta)

    # ---- writes --------------------------------------------------------------

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist (If-None-Match: *); False when it already did."""
        with self._errors(f"write {key}"):
            try:
                obs.put(self._store, key, data, mode="create")
            except (AlreadyExistsError, PreconditionError):
                self.stats.count("put-refused")
                return False
            except GenericError as e:
                if _status(e) == 409:  # S3's answer to two conditional writes in flight at once: try again later
                    self.stats.count("put-refused")
                    return False
                raise
        self.stats.count("put", up=len(data))
        return True

    def replace(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write `key` only if it still has `etag` (If-Match), or does not exist when `etag` is None."""
        if etag is None:
            return self.create(key, data)
        with self._errors(f"write {key}"):
            try:
                obs.put(self._store, key, data, mode={"e_tag": etag})
            except (PreconditionError, AlreadyExistsError, MissingError, FileNotFoundError):
                self.stats.count("put-refused")
                return False
            except GenericError as e:
                if _status(e) == 409:
                    self.stats.count("put-refused")
                    return False
                raise
        self.stats.count("put", up=len(data))
        return True

    def upload(self, key: str, chunks: Iterable[bytes]) -> None:
        """A multipart upload of `chunks`, parts sent in parallel. An exception raised by `chunks` aborts it, so
        nothing appears under `key` (the caller's hash check runs inside the iterator, before the last part)."""
        def counted() -> Iterator[bytes]:
            for chunk in chunks:
                self.stats.count("part", up=len(chunk))
                yield chunk

        with self._errors(f"upload {key}"):
            obs.put(self._store, key, counted(), use_multipart=True, chunk_size=PART_SIZE, max_concurrency=PART_CONCURRENCY)
        self.stats.count("put")

    def delete(self, key: str) -> None:
        with self._errors(f"delete {key}"):
            try:
                obs.delete(self._store, key)
            except (MissingError, FileNotFoundError):
                pass
        self.stats.count("delete")

    # ---- errors --------------------------------------------------------------

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """obstore's exceptions as one line that says what to do; messages carry the URL, never credentials."""
        try:
            yield
        except (PermissionDeniedError, UnauthenticatedError):
            raise self._denied(what) from None
        except GenericError as e:
            text = str(e)
            if _status(e) in (401, 403):
                raise self._denied(what) from None
            if "NoSuchBucket" in text:
                raise NotFoundError(f"remote '{self.remote.name}': bucket '{self.remote.bucket}' does not exist at "
                                    f"{self.endpoint}", hint="create the bucket, or fix the remote with 'adapterhub remote "
                                                             "rm' and 'remote add'", kind="bucket", key=self.remote.bucket) from None
            if "169.254.169.254" in text or "169.254.170.2" in text or "credential" in text.lower():
                # object_store fell back to the instance-metadata service: nothing else gave it a key.
                raise AdapterHubError(f"remote '{self.remote.name}': no AWS credentials to {what} (none in the "
                                      "environment or the AWS config files, and no instance role answered)",
                                      hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming "
                                           "a profile with keys in ~/.aws/credentials") from None
            if "error sending request" in text or "tcp connect" in text or "Connect" in text:
                raise AdapterHubError(f"remote '{self.remote.name}': cannot reach {self.endpoint} to {what}",
                                      hint="check the network and --endpoint-url (adapterhub remote list)") from None
            raise AdapterHubError(f"remote '{self.remote.name}' failed to {what}: {_first_line(text)}",
                                  hint="retry; if it persists, check the endpoint and the bucket's settings") from None

    def _denied(self, what: str) -> AdapterHubError:
        return AdapterHubError(f"remote '{self.remote.name}' ({self.where()}) refused to {what}: access denied",
                               hint="check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                                    "and that they may read and write this bucket")


def _meta(meta: dict) -> Meta:
    return Meta(meta["path"], meta["size"], meta.get("e_tag"), meta.get("last_modified"))


def _status(error: Exception) -> int | None:
    match = re.search(r"status code: (\d{3})", str(error))
    return int(match.group(1)) if match else None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    return line if len(line) <= 300 else line[:300] + "…"


def _profile() -> dict[str, str]:
    """The AWS_PROFILE section of ~/.aws/config, then ~/.aws/credentials (the files the AWS CLI writes)."""
    name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    found: dict[str, str] = {}
    files = ((os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config", "default" if name == "default" else f"profile {name}"),
             (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", name))
    for path, section in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(Path(path).expanduser())
        except configparser.Error:
            continue  # a file the AWS CLI could not read either: the environment must do
        if parser.has_section(section):
            found.update(parser.items(section))
    return found


def _profile_credentials():
    """A static-key provider from the AWS config files, or None to let object_store look (env, roles)."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return None
    profile = _profile()
    key, secret = profile.get("aws_access_key_id"), profile.get("aws_secret_access_key")
    if not (key and secret):
        return None
    credential = {"access_key_id": key, "secret_access_key": secret, "token": profile.get("aws_session_token"),
                  "expires_at": None}
    return lambda: credential
