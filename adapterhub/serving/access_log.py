"""One structured line per request: who asked for what, which version answered, how much, how fast.

A JSON object per line (ref as asked, the version and adapter sha256 that answered, tokens in and out,
latency, status), so `jq` and log shippers read it without a parser of our own. Where the lines go
is the caller's choice (the CLI writes them to stderr).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .jobs import Target


@dataclass
class AccessRecord:
    method: str
    path: str
    client: str | None
    status: int = 0
    model: str | None = None  # as the request named it
    ref: str | None = None  # the version (or base) that answered: `sql-lora@3` for `sql-lora@prod`
    base: str | None = None
    adapter_sha256: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def target(self, target: Target) -> None:
        self.ref, self.base = target.ref, target.base
        self.adapter_sha256 = target.version.sha256 if target.version else None

    def line(self) -> str:
        """The record as one JSON line (no newline), with the time it ended and its latency."""
        fields = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        fields = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  **fields, "latency_ms": round(1000 * (time.perf_counter() - self._started), 1)}
        return json.dumps(fields, ensure_ascii=False)
