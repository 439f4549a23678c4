"""The model runner: one thread owns every base model and does all MLX work, batching requests as they come.

That thread is the one that calls `Engine.load` and `Engine.run` (the main thread under `serve`).
Requests arrive as Jobs from the HTTP side (any thread) and leave as events (text pieces, then the end).
Each loop of the thread admits waiting jobs into their base's batch (first come, first served: a job
that cannot join yet holds back the ones behind it) and decodes one token for every row of every batch.

- A prompt is prefilled alone, as mlx-lm's generate_step does (all but the last token in steps of
  2048), with the adapter's own layers; its last token then goes through the batch's next decoding
  step (as mlx-lm's BatchGenerator does), which samples the first new token. A request alone computes
  what `adapterhub generate` computes, token for token. A LoReFT prompt goes through its interventions
  in one forward, as loreft.generate does; its tokens then decode as the base's.
- Decoding rows share one forward, their KV caches merged into mlx-lm's batch caches; each row reads
  its own adapter (layers.py). A batch holds any mix of base, LoRA, DoRA and LoReFT rows; an adapter
  that touches expert or embedding layers decodes with rows of its own only.
- A job whose client went away is dropped before the next forward, and its adapter unpinned.
- Adapters come from each base's AdapterCache; a job whose adapter cannot be made resident (every slot
  in use by running requests) waits for a slot.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..errors import AdapterHubError
from .adapters import AdapterCache, ResidentAdapter, interventions, load_adapter
from .decoding import RowSampler, TextStream, sample
from .layers import AdapterRouter
from .jobs import Delta, Done, Failed, Job
from .protocol import Limits, RequestError

PREFILL_STEP = 2048  # mlx-lm's prefill_step_size: the same steps give the same numbers
IDLE_WAIT = 0.05  # seconds an idle runner waits for a job before it checks whether to stop
MIXED = "mixed"  # the batch key of rows that may decode together whatever adapter they read
log = logging.getLogger("adapterhub.serving")


@dataclass
class _Row:
    job: Job
    adapter: ResidentAdapter | None
    cache: list | None
    stream: TextStream
    sampler: RowSampler
    next_token: int = 0

    @property
    def slot(self) -> int:
        return self.adapter.row_slot if self.adapter else 0

    @property
    def batch_key(self):
        return _batch_key(self.adapter)


@dataclass
class _Batch:
    """The rows decoding together on one base, and their KV caches: one row keeps its own cache (the exact
    single-request computation); more rows share mlx-lm's batch caches, merged and filtered as rows come and go.

    `ahead` holds the tokens the last forward is computing for the first len(ahead) rows (rows that joined
    since come after them): they are read while the next forward already runs, as mlx-lm's generate_step
    and BatchGenerator overlap the host's work with the device's.
    """

    rows: list[_Row] = field(default_factory=list)
    cache: list | None = None
    merged: bool = False
    ahead: mx.array | None = None

    def inputs(self) -> mx.array:
        """(rows, 1): each row's token in flight, or the known next token of a row that joined since."""
        known = [[r.next_token] for r in self.rows[0 if self.ahead is None else self.ahead.size:]]
        if self.ahead is None:
            return mx.array(known)
        return mx.concatenate([self.ahead[:, None], mx.array(known, dtype=self.ahead.dtype)]) if known else self.ahead[:, None]

    @property
    def key(self):
        return self.rows[0].batch_key if self.rows else None

    def add(self, row: _Row) -> None:
        if not self.rows:
            self.rows, self.cache, self.merged = [row], row.cache, False
        else:
            if not self.merged:
                self.cache, self.merged = [type(c).merge([c]) for c in self.cache], True
            for mine, theirs in zip(self.cache, row.cache):
                mine.extend(type(theirs).merge([theirs]))
            self.rows.append(row)
        row.cache = None

    def add_together(self, rows: list[_Row], cache: list) -> None:
        """Rows prefilled together, with their batch caches."""
        if not self.rows:
            self.rows, self.cache, self.merged = list(rows), cache, True
            return
        if not self.merged:
            self.cache, self.merged = [type(c).merge([c]) for c in self.cache], True
        for mine, theirs in zip(self.cache, cache):
            mine.extend(theirs)
        self.rows.extend(rows)

    def remove(self, indices: set[int]) -> list[_Row]:
        gone = [r for i, r in enumerate(self.rows) if i in indices]
        keep = [i for i in range(len(self.rows)) if i not in indices]
        if not gone:
            return gone
        if not keep:
            self.rows, self.cache, self.merged, self.ahead = [], None, False, None
            return gone
        if self.ahead is not None:
            kept = [i for i in keep if i < self.ahead.size]
            self.ahead = self.ahead[mx.array(kept)] if kept else None
        if self.merged and len(keep) == 1:
            self.cache, self.merged = [c.extract(keep[0]) for c in self.cache], False
        elif self.merged:
            for c in self.cache:
                c.filter(keep)
        self.rows = [self.rows[i] for i in keep]
        return gone


@dataclass
class _Base:
    name: str
    model: object
    tokenizer: object
    router: AdapterRouter
    adapters: AdapterCache
    batchable: bool
    pending: deque = field(default_factory=deque)
    batch: _Batch = field(default_factory=_Batch)


class Engine:
    """The bases and the loop that serves them: `load` and `run` on the model thread, `submit` from any.

    Args:
        registry: where adapters are read from (hash-checked on every load).
        bases: served base name -> model folder.
        max_adapters: resident adapters per base.
    """

    def __init__(self, registry, bases: dict[str, Path], max_adapters: int = 8, limits: Limits = Limits()):
        self.registry, self.limits, self.max_adapters = registry, limits, max_adapters
        self._paths = dict(bases)
        self._bases: dict[str, _Base] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._snapshot: dict = {}
        self.completed = 0

    # ---- the model thread: the one that calls load and run -----------------------------------------------

    def load(self) -> None:
        """Load every base on this thread, which must then call `run`: MLX work stays on one thread, and on the
        main thread where there is one (random arrays made on another thread can abort the process at exit)."""
        for name, path in self._paths.items():
            self._bases[name] = self._load_base(name, path)
        self._publish()

    def run(self, keep_going: Callable[[], bool]) -> None:
        """Serve jobs until `keep_going()` is false and every admitted job has finished. Jobs submitted while
        it ends are refused; jobs submitted after it returned wait for the next `run`."""
        while True:
            busy = any(b.pending or b.batch.rows for b in self._bases.values())
            if not busy and self._inbox.empty() and not keep_going():
                with self._lock:
                    self._stopping.set()
                if self._inbox.empty():
                    self._stopping.clear()
                    break
            self._take_jobs(block=not busy)
            for base in self._bases.values():
                self._guarded(base, self._admit)
            for base in self._bases.values():
                if base.batch.rows:
                    self._guarded(base, self._step)
            self._publish()

    # ---- any thread ------------------------------------------------------------------------------------

    def tokenizer(self, base: str):
        return self._bases[base].tokenizer

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise RequestError("the server is shutting down", hint="retry on another server", status=503,
                                   kind="server_error")
            if self._in_flight >= self.limits.max_pending:
                raise RequestError(f"the server has {self._in_flight} requests queued or running, its limit",
                                   hint="retry later", status=503, kind="server_error")
            self._in_flight += 1
        self._inbox.put(job)

    def stats(self) -> dict:
        """Per base: resident adapters (least recently used first), loads, evictions, rows running and queued."""
        return dict(self._snapshot)

    # ---- the model thread ------------------------------------------------------------------------------

    def _load_base(self, name: str, path: Path) -> _Base:
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        model, tokenizer = load(str(path))
        router = AdapterRouter(model, self.max_adapters + 1)

        def unload(adapter: ResidentAdapter) -> None:
            router.clear(adapter.slot)

        adapters = AdapterCache(self.max_adapters, lambda v, slot: load_adapter(self.registry, v, router, slot), unload)
        batchable = all(hasattr(type(c), "merge") for c in make_prompt_cache(model))
        return _Base(name, model, tokenizer, router, adapters, batchable)

    def _take_jobs(self, block: bool) -> None:
        try:
            # A short wait when idle, so `run` notices keep_going() turning false.
            job = self._inbox.get(timeout=IDLE_WAIT) if block else self._inbox.get_nowait()
            while True:
                if job is not None:
                    self._bases[job.target.base].pending.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _guarded(self, base: _Base, work: Callable[[_Base], None]) -> None:
        """A failure inside a forward fails the rows of that base, never the thread (and so the server)."""
        try:
            work(base)
        except Exception as e:  # noqa: BLE001 - reported to each request, logged with its traceback
            log.exception("generation failed on base %s", base.name)
            rows = base.batch.remove(set(range(len(base.batch.rows))))
            for row in rows:
                self._finish(base, row, error=e)

    def _admit(self, base: _Base) -> None:
        limit = self.limits.max_batch if base.batchable else 1
        fresh: list[_Row] = []
        while base.pending and len(base.batch.rows) + len(fresh) < limit:
            job = base.pending[0]
            if job.cancelled:
                base.pending.popleft()
                self._end(job, Done("cancelled", len(job.tokens), 0, ""))
                continue
            adapter = None
            try:
                if job.target.version is not None:
                    adapter = base.adapters.acquire(job.target.version)
                    if adapter is None:
                        break  # every slot holds an adapter a running request reads: wait for one to finish
                joining = base.batch.rows or fresh
                if joining and _batch_key(adapter) != joining[0].batch_key:
                    if adapter is not None:
                        base.adapters.release(adapter)
                    break  # rows of an adapter with expert or embedding updates decode apart: wait for the batch
                base.pending.popleft()
                stream = TextStream(base.tokenizer.detokenizer, frozenset(base.tokenizer.eos_token_ids), job.max_tokens,
                                    job.stop)
                row = _Row(job, adapter, None, stream, RowSampler(job.sampling))
                if adapter is not None and adapter.interventions:
                    self._prefill_intervened(base, row)
                else:
                    fresh.append(row)
            except Exception as e:  # noqa: BLE001 - a corrupt blob, a bad tensor, a failed prefill: this request's error
                if not isinstance(e, AdapterHubError):
                    log.exception("admitting a request failed on base %s", base.name)
                if base.pending and base.pending[0] is job:
                    base.pending.popleft()
                if adapter is not None:
                    base.adapters.release(adapter)
                self._end(job, Failed(e))
        if fresh:
            try:
                self._prefill(base, fresh)
            except Exception as e:  # noqa: BLE001 - these requests fail, the batch goes on
                log.exception("prefill failed on base %s", base.name)
                for row in fresh:
                    self._finish(base, row, error=e)

    def _prefill_intervened(self, base: _Base, row: _Row) -> None:
        """A LoReFT prompt: all of it in one forward through its interventions, as loreft.generate does; the
        first token is sampled here, and the row decodes as the base's."""
        from mlx_lm.models.cache import make_prompt_cache

        row.cache = make_prompt_cache(base.model)
        base.router.use(0)
        with interventions(base.model, row.adapter, len(row.job.tokens)):
            logits = base.model(mx.array([row.job.tokens]), cache=row.cache)
        self._accept(row, sample([row.sampler], _logprobs(logits)).item())
        if row.stream.done:
            self._finish(base, row)
        else:
            base.batch.add(row)

    def _prefill(self, base: _Base, rows: list[_Row]) -> None:
        """All but the last prompt token of each row, through its adapter; the last one goes through the batch's
        next step, which samples the first new token (one forward fewer per request, as mlx-lm's BatchGenerator).

        One request is prefilled alone, in generate_step's steps, so it computes what `adapterhub generate`
        computes; requests that arrived together share forwards, right-padded as BatchGenerator pads them."""
        from mlx_lm.models.cache import make_prompt_cache

        model = base.model
        for row in rows:
            row.next_token = row.job.tokens[-1]
        if len(rows) == 1:
            row = rows[0]
            row.cache = make_prompt_cache(model)
            base.router.use(row.slot)
            prompt = row.job.tokens[:-1]
            for start in range(0, len(prompt), PREFILL_STEP):
                model(mx.array([prompt[start:start + PREFILL_STEP]]), cache=row.cache)
                mx.eval([c.state for c in row.cache])
            base.batch.add(row)
            return
        cache = [type(layer[0]).merge(list(layer)) for layer in zip(*(make_prompt_cache(model) for _ in rows))]
        prompts = [row.job.tokens[:-1] for row in rows]
        longest = max(len(p) for p in prompts)
        padding = [longest - len(p) for p in prompts]
        if longest:
            if any(padding):
                for c in cache:
                    c.prepare(lengths=[len(p) for p in prompts], right_padding=padding)
            tokens = mx.array([p + [0] * pad for p, pad in zip(prompts, padding)])
            base.router.use_rows([r.slot for r in rows], dora=any(r.adapter is not None and r.adapter.dora for r in rows))
            for start in range(0, longest, PREFILL_STEP):
                model(tokens[:, start:start + PREFILL_STEP], cache=cache)
                mx.eval([c.state for c in cache])
            if any(padding):
                for c in cache:
                    c.finalize()
        base.batch.add_together(rows, cache)

    def _step(self, base: _Base) -> None:
        batch = base.batch
        for row in batch.remove({i for i, row in enumerate(batch.rows) if row.job.cancelled}):
            self._finish(base, row, reason="cancelled")
        rows = batch.rows
        if not rows:
            return
        base.router.use_rows([r.slot for r in rows], dora=any(r.adapter is not None and r.adapter.dora for r in rows))
        logits = base.model(batch.inputs(), cache=batch.cache)
        ready, batch.ahead = batch.ahead, sample([r.sampler for r in rows], _logprobs(logits))
        mx.async_eval(batch.ahead)
        if ready is None:
            return
        # The previous forward's tokens, read while this one runs. A row they finish was in this forward too:
        # its extra token is dropped with it.
        for row, token in zip(rows, ready.tolist()):
            self._accept(row, token)
        for row in batch.remove({i for i, row in enumerate(rows) if row.stream.done}):
            self._finish(base, row)

    def _accept(self, row: _Row, token: int) -> None:
        text = row.stream.add(token)
        row.next_token = token
        if text and row.job.stream:
            # Only streams take pieces: each event wakes the HTTP thread, which competes with this one for the GIL.
            row.job.emit(Delta(text))

    def _finish(self, base: _Base, row: _Row, reason: str | None = None, error: BaseException | None = None) -> None:
        if row.adapter is not None:
            base.adapters.release(row.adapter)
            row.adapter = None
        stream = row.stream
        self._end(row.job, Failed(error) if error is not None else
                  Done(reason or stream.finish_reason or "stop", len(row.job.tokens), len(stream.tokens), stream.text))

    def _end(self, job: Job, event: object) -> None:
        job.emit(event)
        with self._lock:
            self._in_flight -= 1
            self.completed += 1

    def _publish(self) -> None:
        self._snapshot = {name: {"adapters": base.adapters.resident(), "adapter_loads": base.adapters.loads,
                                 "evictions": base.adapters.evictions, "max_adapters": base.adapters.capacity,
                                 "running": len(base.batch.rows), "queued": len(base.pending)}
                          for name, base in self._bases.items()}


def _batch_key(adapter: ResidentAdapter | None):
    """Rows with equal keys may share a forward: the base and every mixable adapter one key, the others their own."""
    return MIXED if adapter is None or adapter.mixable else adapter.key


def _logprobs(logits: mx.array) -> mx.array:
    """The last position's log-probabilities, as generate_step computes them."""
    logits = logits[:, -1, :]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
