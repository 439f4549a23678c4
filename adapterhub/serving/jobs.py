"""What passes between the HTTP side and the model runner: a request's target, its job, and the events it gets back."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ..records import AdapterVersion
from .protocol import Sampling


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: a served base, and the adapter version on it (None: the base alone)."""

    base: str
    version: AdapterVersion | None = None

    @property
    def ref(self) -> str:
        return self.version.ref if self.version else self.base


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    text: str


@dataclass(frozen=True)
class Failed:
    error: BaseException


class Job:
    """One request's generation. `emit` receives Delta events (when `stream`), then one Done or Failed; it is
    called on the runner's thread and must not block."""

    def __init__(self, target: Target, tokens: list[int], max_tokens: int, sampling: Sampling,
                 stop: tuple[str, ...], emit: Callable[[object], None], stream: bool = True):
        self.target, self.tokens, self.max_tokens = target, tokens, max_tokens
        self.sampling, self.stop, self._emit, self.stream = sampling, stop, emit, stream
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this job (its client left); harmless once it has finished."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: object) -> None:
        try:
            self._emit(event)
        except RuntimeError:
            pass  # the HTTP side's event loop is gone (shutdown): nobody is waiting for this event
