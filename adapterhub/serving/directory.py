"""What a request's `model` names, and what GET /v1/models lists.

A `model` is a served base's name, or an adapter ref (`sql-lora`, `sql-lora@3`, `sql-lora@prod`, a
sha256 prefix) resolved in the registry at request time, so moving an alias moves traffic with no
restart. The adapter then runs on the served base it was registered on, or else on the first served
base the compatibility check accepts (a quantized variant of it, say); the verdict is kept per
adapter and base, as neither changes. Errors are the registry's own, so the HTTP reply says what the
CLI would print.
"""

from __future__ import annotations

import threading
from datetime import datetime

from ..errors import AdapterHubError, IncompatibleError, NotFoundError
from ..records import AdapterVersion
from .adapters import cache_key
from .protocol import RequestError
from .jobs import Target

# Refs joined this way ask for several adapters at once: one adapter per request is served.
_SEVERAL = ("+", ",")


class Directory:
    """Served bases by name, and the registry they take adapters from.

    Args:
        registry: the Registry.
        bases: served base name -> its registered record (bases.json row).
    """

    def __init__(self, registry, bases: dict[str, dict]):
        self.registry = registry
        self.bases = dict(bases)
        self._verdicts: dict[tuple, str | IncompatibleError] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> Target:
        """The base and adapter version `model` names now."""
        if model in self.bases:
            return Target(model)
        if any(mark in model for mark in _SEVERAL):
            self._refuse_several(model)
        try:
            version = self.registry.resolve(model)
        except NotFoundError:
            if any(b["name"] == model for b in self.registry.bases()):
                raise NotFoundError(f"base {model} is registered but not served here (serving: {', '.join(sorted(self.bases))})",
                                    hint=f"restart the server with --base {model}", kind="base", key=model) from None
            raise
        return Target(self._base_for(version), version)

    def _refuse_several(self, model: str) -> None:
        from ..algebra.fuse import refuse_related

        refs = [r.strip() for r in model.replace(",", "+").split("+") if r.strip()]
        versions = [self.registry.resolve(r) for r in refs]
        # An adapter with its own ancestor would apply the parent's update twice: that reason comes first.
        refuse_related(self.registry, versions, "serving them together")
        raise RequestError(f"'{model}' names {len(versions)} adapters; a request is served with one",
                           hint=f"stack them into one first: adapterhub stack {' '.join(v.ref for v in versions)} --name NAME",
                           param="model")

    def _base_for(self, version: AdapterVersion) -> str:
        key = cache_key(version)
        with self._lock:
            known = self._verdicts.get(key)
        if isinstance(known, str):
            return known
        if isinstance(known, IncompatibleError):
            raise known
        recorded = (version.record.get("base") or {}).get("sha256")
        own = [name for name, b in self.bases.items() if recorded in (b["sha256"], *b.get("previous_sha256", ()))]
        candidates = own or sorted(self.bases)
        problems = []
        for name in candidates:
            # By sha256, not by name: a folder of that name in the working directory is not the registered base.
            report = self.registry.check(version.ref, self.bases[name]["sha256"])  # re-hashes the adapter's weights
            if report.compatible:
                with self._lock:
                    self._verdicts[key] = name
                return name
            problems.append((name, report.problems[0]))
        if len(problems) == 1:
            name, problem = problems[0]
            error = IncompatibleError(f"{version.ref} is not compatible with {name}: {problem}",
                                      hint=f"run 'adapterhub check {version.ref} --base {name}'")
        else:
            recorded_name = (version.record.get("base") or {}).get("name")
            error = IncompatibleError(f"{version.ref} is not compatible with any served base: "
                                      + "; ".join(f"{name}: {problem}" for name, problem in problems),
                                      hint=f"serve its base: adapterhub serve --base {recorded_name}" if recorded_name
                                      else f"run 'adapterhub check {version.ref} --base BASE'")
        with self._lock:
            self._verdicts[key] = error
        raise error

    def models(self) -> list[dict]:
        """Every served base, then every ref that names a version registered on it: `name` when its latest
        version is there, `name@N`, and `name@alias` for each alias pointing there."""
        listed = []
        for base in sorted(self.bases):
            record = self.bases[base]
            listed.append({"id": base, "object": "model", "created": _epoch(record.get("created_at")),
                           "owned_by": "adapterhub", "root": base, "parent": None})
            versions = self.registry.list(base=base)
            latest = {}
            for name in sorted({v.name for v in versions}):
                try:
                    latest[name] = self.registry.resolve(name).version
                except AdapterHubError:
                    continue  # removed or damaged since the listing was read: its versions are still listed
            for v in versions:
                refs = ([v.name] if latest.get(v.name) == v.version else []) + [v.ref] + [f"{v.name}@{a}" for a in v.aliases]
                for ref in refs:
                    listed.append({"id": ref, "object": "model", "created": _epoch(v.record.get("created_at")),
                                   "owned_by": "adapterhub", "root": base, "parent": base,
                                   "adapter": {"ref": v.ref, "sha256": v.sha256, "kind": v.kind, "rank": v.rank}})
        return listed


def _epoch(timestamp: str | None) -> int:
    if not timestamp:
        return 0
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
