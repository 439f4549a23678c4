"""Scoring a model on data: the target loaded as mlx-lm loads it, the loss as `mlx_lm lora --test` computes it,
greedy exact-match and token accuracy from the same forward passes, each result recorded through
`Registry.record_eval`.

Datasets, batches and the loss are mlx-lm's own (`load_local_dataset`, `iterate_batches`, `evaluate` with
`default_loss`, or LoReFT's `loreft.loss`), so a loss here is the loss `mlx_lm lora --test` reports for the
same data and batch size. Prompt/completion and chat data are scored on the completion alone (mlx-lm's
`--mask-prompt`): an answer is what is scored, not the question.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from .errors import AdapterHubError
from .eval_inputs import EvalData, Target
from .eval_settings import SPLITS
from .records import CONFIG_FILE, WEIGHTS_FILE, AdapterVersion, EvalResult, now
from .training.data import DataError

# (description, total steps) -> a context manager yielding advance(n), as Registry's byte progress.
Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]


def no_progress(description: str, total: int) -> ContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


@contextmanager
def _adapter_folder(registry, version: AdapterVersion) -> Iterator[Path]:
    """The version's two stored files, hash-checked, in a folder mlx-lm's `load(adapter_path=)` reads."""
    with tempfile.TemporaryDirectory(prefix="adapterhub-eval-") as tmp:
        folder = Path(tmp)
        # Links, not copies: the blobs are read-only and were just re-hashed. Absolute, because a link's
        # target is read from the folder it sits in, and a registry may be named relative to this one.
        os.symlink(registry.weights(version).absolute(), folder / WEIGHTS_FILE)
        config = registry.objects.verified(version.file_sha(CONFIG_FILE), f"config of {version.ref}")
        os.symlink(config.absolute(), folder / CONFIG_FILE)
        yield folder


def load_target(registry, target: Target):
    """(model, tokenizer), in eval mode: mlx-lm's load, with the adapter applied as mlx-lm or LoReFT applies it."""
    from mlx_lm import load

    if target.kind == "fused":
        model, tokenizer = load(str(target.folder))
    elif target.kind == "base":
        model, tokenizer = load(str(target.base_path))
    elif target.version.kind == "loreft":
        from .generation import load_loreft

        model, tokenizer = load(str(target.base_path))
        load_loreft(registry, target.version, model)
    else:
        with _adapter_folder(registry, target.version) as folder:
            model, tokenizer = load(str(target.base_path), adapter_path=str(folder))
    model.eval()
    return model, tokenizer


def _loss_fn(target: Target):
    if target.version is not None and target.version.kind == "loreft":
        from . import loreft

        return loreft.loss
    from mlx_lm.tuner.trainer import default_loss

    return default_loss


class _Capture:
    """The model, keeping the logits of its last call: one forward gives both mlx-lm's loss and the argmax."""

    def __init__(self, model):
        self._model = model
        self.logits = None

    def __getattr__(self, key):
        return getattr(self._model, key)  # LoReFT's loss reaches the model's layers through here

    def __call__(self, *args, **kwargs):
        self.logits = self._model(*args, **kwargs)
        return self.logits


@contextmanager
def _seeded_numpy(seed: int = 0) -> Iterator[None]:
    """mlx-lm's iterate_batches shuffles with numpy's global state: a fixed order, and the caller's state kept."""
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _measure_loss(model, dataset, loss, batch_size: int, max_seq_length: int, advance) -> dict:
    from mlx_lm.tuner.trainer import evaluate

    counted = []

    def counting(model, batch, lengths):
        value, tokens = loss(model, batch, lengths)
        counted.append(tokens)
        return value, tokens

    with _seeded_numpy():
        value = float(evaluate(model=model, dataset=dataset, batch_size=batch_size, num_batches=-1,
                               max_seq_length=max_seq_length, loss=counting, progress_callback=lambda: advance(1)))
    tokens = int(sum(int(t.item()) for t in counted))
    return {"scores": _loss_scores(value), "value": value, "tokens": tokens, "examples": len(counted) * batch_size}


def _loss_scores(value: float) -> dict:
    if not math.isfinite(value):
        raise AdapterHubError(f"the loss is {value}: the model's outputs are not finite",
                              hint="check the weights ('adapterhub verify'); a NaN adapter cannot be scored")
    return {"loss": value, **({"perplexity": math.exp(value)} if value < 700 else {})}


def _measure_exact(model, dataset, loss, batch_size: int, max_seq_length: int, advance) -> dict:
    """Greedy exact-match and token accuracy of the completions, teacher-forced: greedy decoding reproduces a
    completion token for token exactly when, at every completion position, the argmax given the true prefix
    is the true next token. One forward per batch, on the batches the loss uses."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import iterate_batches

    capture = _Capture(model)
    hits, tokens, exact, rows = mx.array(0), mx.array(0), mx.array(0), 0
    with _seeded_numpy():
        for batch, lengths in iterate_batches(dataset, batch_size, max_seq_length):
            loss(capture, batch, lengths)
            targets = batch[:, 1:]
            steps = mx.arange(1, targets.shape[1] + 1)
            # default_loss's positions but its last: mlx-lm's loss also scores the padding after a sequence's
            # last token, which is no part of the completion (and a real model's token 0 is some word).
            mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
            right = mx.logical_and(mx.argmax(capture.logits, axis=-1) == targets, mask)
            scored = mask.sum(axis=1)
            hits = hits + right.sum()
            tokens = tokens + scored.sum()
            exact = exact + mx.logical_and(right.sum(axis=1) == scored, scored > 0).sum()
            mx.eval(hits, tokens, exact)
            rows += batch.shape[0]
            advance(1)
    hits, tokens, exact = int(hits.item()), int(tokens.item()), int(exact.item())
    return {"scores": {"exact_match": exact / rows, "token_accuracy": hits / tokens if tokens else 0.0},
            "value": exact / rows, "tokens": tokens, "examples": rows, "correct": exact}


def _dataset(data: EvalData, tokenizer):
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

    try:
        splits = dict(zip(SPLITS, load_local_dataset(data.folder, tokenizer, SimpleNamespace(mask_prompt=data.completion_only))))
        dataset = CacheDataset(splits[data.split])
        dataset[0]  # mlx-lm tokenizes lazily: a data/tokenizer mismatch surfaces here, not mid-run
    except ValueError as e:
        raise DataError(f"{data.folder} cannot be tokenized for this model: {e}".split("For information")[0].strip(),
                        hint="completions and chat data need a tokenizer with a chat template; use text data otherwise") from None
    return dataset


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    from .version import __version__

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "adapterhub": __version__}


def record_scores(registry, target: Target, data: EvalData, metrics: list[str], batch_size: int, max_seq_length: int,
                  progress: Progress) -> list[EvalResult]:
    """Load `target` once and score it on `data` for each metric; records each result."""
    import mlx.core as mx

    model, tokenizer = load_target(registry, target)
    dataset = _dataset(data, tokenizer)
    loss = _loss_fn(target)
    results = []
    for metric in metrics:
        started = time.perf_counter()
        with progress(f"{metric} of {target.label}", data.examples // batch_size) as advance:
            measured = (_measure_loss if metric == "loss" else _measure_exact)(model, dataset, loss, batch_size,
                                                                                max_seq_length, advance)
        row = {
            "subject": target.subject(), "dataset": data.to_dict(), "split": data.split, "metric": metric,
            "value": measured["value"], "scores": measured["scores"], "examples": measured["examples"],
            "examples_in_split": data.examples, **({"correct": measured["correct"]} if "correct" in measured else {}),
            "tokens": measured["tokens"], "base": target.base,
            "settings": {"batch_size": batch_size, "max_seq_length": max_seq_length, "completion_only": data.completion_only},
            "versions": _versions(), "device": str(mx.default_device()),
            "seconds": round(time.perf_counter() - started, 3), "created_at": now(),
        }
        results.append(EvalResult.from_dict(registry.record_eval(row)))
    return results
