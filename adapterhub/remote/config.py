"""Remotes of a registry: names for shared registries in S3-compatible buckets, kept in `remotes.json`.

Only where a remote lives is stored (bucket, prefix, endpoint, region); how to sign in never is:
credentials come from the AWS environment and config files when a command connects, so a
registry folder can be copied or shared without leaking them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConflictError, CorruptRegistryError, InvalidNameError, NotFoundError
from ..files import read_json, write_json
from ..naming import is_remote_name
from ..records import now
from ..schemas import validate

REMOTES_FILE = "remotes.json"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[^/\\\x00\n]+")
_ENDPOINT = re.compile(r"https?://\S+")
_REGION = re.compile(r"[a-z0-9-]{1,32}")


@dataclass(frozen=True)
class Remote:
    """One configured remote: `s3://bucket/prefix`, and the endpoint of an S3-compatible store when not AWS."""

    name: str
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def to_dict(self) -> dict:
        return {"name": self.name, "url": self.url, "endpoint_url": self.endpoint_url, "region": self.region}


def check_remote_name(name: str) -> None:
    if not is_remote_name(name):
        raise InvalidNameError(f"invalid remote name '{name}': 1–32 lowercase letters, digits, '-' or '_', "
                               "starting with a letter", hint="try 'team' or 'prod-bucket'")


def parse_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` -> (bucket, prefix); the prefix has no empty, `.` or `..` parts."""
    if not url.startswith("s3://"):
        raise InvalidNameError(f"'{url}' is not an s3:// URL", hint="write it as s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidNameError(f"'{bucket}' in {url} is not a bucket name",
                               hint="a bucket is 3–63 lowercase letters, digits, '.' and '-'")
    parts = prefix.split("/") if prefix else []
    if any(p in (".", "..") or not _PREFIX_PART.fullmatch(p) for p in parts):
        raise InvalidNameError(f"the prefix of {url} has an empty, '.' or '..' part",
                               hint="write it as s3://BUCKET/FOLDER/FOLDER")
    return bucket, prefix


class Remotes:
    """The registry's remotes.json, read and written under the registry lock."""

    def __init__(self, registry):
        self.registry = registry
        self.path = Path(registry.root) / REMOTES_FILE

    def _read(self, full: bool = False) -> dict:
        """remotes.json; `full` checks its schema (writes), otherwise the fields reads use, so `list --remote`
        never imports jsonschema."""
        doc = read_json(self.path, {"remotes": {}})
        if full:
            validate(doc, "remotes", what=str(self.path))
        elif not (isinstance(doc, dict) and isinstance(doc.get("remotes"), dict) and all(
                isinstance(e, dict) and isinstance(e.get("url"), str) for e in doc["remotes"].values())):
            raise CorruptRegistryError(f"{self.path} is damaged: it is not a remotes file",
                                       hint="fix it, or remove it and add the remotes again")
        return doc

    def all(self) -> list[Remote]:
        self.registry.require()
        return [_remote(name, entry) for name, entry in sorted(self._read()["remotes"].items())]

    def get(self, name: str) -> Remote:
        self.registry.require()
        entries = self._read()["remotes"]
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none yet"
            raise NotFoundError(f"no remote '{name}' in {self.registry.root} (remotes: {known})",
                                hint=f"add it with 'adapterhub remote add {name} s3://BUCKET/PREFIX'",
                                kind="remote", key=name)
        return _remote(name, entries[name])

    def add(self, name: str, url: str, endpoint_url: str | None = None, region: str | None = None) -> Remote:
        check_remote_name(name)
        bucket, prefix = parse_url(url)
        if endpoint_url is not None and not _ENDPOINT.fullmatch(endpoint_url):
            raise InvalidNameError(f"'{endpoint_url}' is not an http(s) URL", hint="give --endpoint-url as http(s)://HOST[:PORT]")
        if region is not None and not _REGION.fullmatch(region):
            raise InvalidNameError(f"'{region}' is not a region name", hint="give --region as e.g. us-east-1")
        remote = Remote(name, bucket, prefix, endpoint_url.rstrip("/") if endpoint_url else None, region)
        with self.registry.transaction():
            doc = self._read(full=True)
            if name in doc["remotes"]:
                raise ConflictError(f"remote '{name}' already exists ({doc['remotes'][name]['url']})",
                                    hint=f"remove it first with 'adapterhub remote rm {name}', or choose another name")
            doc["remotes"][name] = {"url": remote.url, "endpoint_url": remote.endpoint_url, "region": region,
                                    "added_at": now()}
            validate(doc, "remotes", what=str(self.path))
            write_json(self.path, doc)
        return remote

    def remove(self, name: str) -> Remote:
        """Forget a remote; the bucket and what it holds are untouched."""
        self.registry.require()
        with self.registry.transaction():
            remote = self.get(name)
            doc = self._read(full=True)
            del doc["remotes"][name]
            if doc["remotes"]:
                write_json(self.path, doc)
            else:
                # No remotes is no file, so adding then removing one leaves the registry as it was.
                self.path.unlink(missing_ok=True)
        return remote


def _remote(name: str, entry: dict) -> Remote:
    bucket, prefix = parse_url(entry["url"])
    return Remote(name, bucket, prefix, entry.get("endpoint_url"), entry.get("region"))
