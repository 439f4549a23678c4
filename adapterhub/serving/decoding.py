"""What each request's row does with the model's output: pick the next token, turn tokens into text, stop.

Sampling is mlx-lm's (its greedy argmax and its top-p filter); a `seed` gives the request its own random
key, so its draws do not depend on what else is in the batch. Text is mlx-lm's streaming detokenizer;
stop strings are matched on that text, and any tail that could still become one is held back, so a
stream never sends a piece of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .protocol import Sampling


class RowSampler:
    """One request's way of choosing tokens from log-probabilities (a (1, vocabulary) row)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self._key = mx.random.key(sampling.seed) if sampling.seed is not None else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        from mlx_lm.sample_utils import apply_top_p

        if self.sampling.greedy:
            return mx.argmax(logprobs, axis=-1)
        if self.sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.sampling.top_p)
        scaled = logprobs * (1 / self.sampling.temperature)
        if self._key is None:
            return mx.random.categorical(scaled)
        self._key, draw = mx.random.split(self._key)
        return mx.random.categorical(scaled, key=draw)


def sample(samplers: list[RowSampler], logprobs: mx.array) -> mx.array:
    """The next token of every row of `logprobs` (batch, vocabulary), not yet computed: one argmax when every
    row is greedy."""
    if all(s.sampling.greedy for s in samplers):
        return mx.argmax(logprobs, axis=-1)
    return mx.concatenate([s(logprobs[i:i + 1]) for i, s in enumerate(samplers)])


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


@dataclass
class TextStream:
    """Tokens in, text out: what may be sent now, when the request is done, and why.

    Mirrors mlx-lm's stream_generate: an end-of-sequence token ends the text without being part of it,
    and `max_tokens` tokens end it with "length".
    """

    detokenizer: object
    eos_token_ids: frozenset[int]
    max_tokens: int
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _pending: str = ""  # decoded, not yet sent: it may still turn out to start a stop string
    _sent: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._sent)

    def add(self, token: int) -> str:
        """Take one generated token; returns the text that can be sent now (may be empty)."""
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            self.detokenizer.add_token(token)
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        if self.done:
            self.detokenizer.finalize()
        self._pending += self.detokenizer.last_segment
        return self._release(final=self.done)

    def _release(self, final: bool) -> str:
        if self.stops:
            found = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
            if found:
                at = min(i for i, _ in found)
                self.finish_reason = "stop"
                return self._send(self._pending[:at])
        if final:
            return self._send(self._pending)
        return self._send(self._pending[:len(self._pending) - held_back(self._pending, self.stops)])

    def _send(self, text: str) -> str:
        self._pending = self._pending[len(text):]
        if text:
            self._sent.append(text)
        return text
