"""Experiment trackers a run reports to with --report-to: Weights & Biases, as mlx-lm's --report-to wandb.

wandb is never a dependency: it is imported when a run asks for it, and a run that asks for it
without it installed is refused before anything loads.
"""

from __future__ import annotations

import importlib.util

from ..errors import AdapterHubError
from .callbacks import TrainingCallback, TrainReport


def installed(package: str) -> bool:
    """Whether `package` can be imported, found without importing it."""
    return importlib.util.find_spec(package) is not None


def check_available(report_to: str | None) -> None:
    """Refuse --report-to wandb when wandb is not installed."""
    if report_to == "wandb" and not installed("wandb"):
        raise AdapterHubError("--report-to wandb needs the wandb package, which is not installed here",
                              hint="pip install wandb (and run 'wandb login'), or drop --report-to")


class WandbCallback(TrainingCallback):
    """Losses, learning rate, speed and peak memory to a wandb run, under the training run's id."""

    def __init__(self, project: str, run_id: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_id, id=run_id, resume="allow", config=config)

    def on_train_report(self, report: TrainReport) -> None:
        self.wandb.log({"train_loss": report.train_loss, "learning_rate": report.learning_rate,
                        "tokens_per_second": report.tokens_per_second,
                        "peak_memory_gb": report.peak_memory / 1e9}, step=report.step)

    def on_val_report(self, step: int, val_loss: float) -> None:
        self.wandb.log({"val_loss": val_loss}, step=step)

    def on_test(self, test_loss: float, test_perplexity: float) -> None:
        self.run.summary.update({"test_loss": test_loss, "test_perplexity": test_perplexity})

    def on_finish(self, ref: str) -> None:
        self.run.summary.update({"version": ref})
        self.run.finish()


def callbacks_for(config, run_id: str) -> list[TrainingCallback]:
    """The trackers `config.report_to` names (none by default)."""
    if config.report_to == "wandb":
        return [WandbCallback(config.project_name or config.name, run_id, config.to_dict())]
    return []
