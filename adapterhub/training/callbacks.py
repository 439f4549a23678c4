"""What a training run tells whoever started it: one method per event, as mlx-lm's `TrainingCallback`.

The trainer calls these and nothing else; the CLI's progress bar and plain report lines, and
tests that stop a run at a given step, are subclasses. Each method does nothing here, so a
subclass overrides only what it shows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainReport:
    """One report window of training (every --steps-per-report steps, and at checkpoints and the end)."""

    step: int
    iters: int
    train_loss: float
    tokens_per_second: float
    learning_rate: float
    # Bytes, from MLX's allocator, the largest of any process, over this window alone (the peak is reset after each).
    peak_memory: int = 0


class TrainingCallback:
    def on_resume(self, step: int) -> None:
        """A resumed run continues after `step`."""

    def on_train_report(self, report: TrainReport) -> None:
        """Mean training loss and speed over the last report window."""

    def on_val_report(self, step: int, val_loss: float) -> None:
        """Validation loss measured at `step`."""

    def on_checkpoint(self, step: int, removed: list[int], seconds: float) -> None:
        """A checkpoint of `step` was saved (and the run record updated); `removed` are the steps retention pruned."""

    def on_test(self, test_loss: float, test_perplexity: float) -> None:
        """Loss on test.jsonl after the last step."""

    def on_finish(self, ref: str) -> None:
        """The run registered its result as `ref`."""


class Fanout(TrainingCallback):
    """Every event to each of several callbacks, in order (the CLI's report lines and a tracker, say)."""

    def __init__(self, *callbacks: TrainingCallback):
        self.callbacks = callbacks

    def on_resume(self, step: int) -> None:
        for c in self.callbacks:
            c.on_resume(step)

    def on_train_report(self, report: TrainReport) -> None:
        for c in self.callbacks:
            c.on_train_report(report)

    def on_val_report(self, step: int, val_loss: float) -> None:
        for c in self.callbacks:
            c.on_val_report(step, val_loss)

    def on_checkpoint(self, step: int, removed: list[int], seconds: float) -> None:
        for c in self.callbacks:
            c.on_checkpoint(step, removed, seconds)

    def on_test(self, test_loss: float, test_perplexity: float) -> None:
        for c in self.callbacks:
            c.on_test(test_loss, test_perplexity)

    def on_finish(self, ref: str) -> None:
        for c in self.callbacks:
            c.on_finish(ref)
