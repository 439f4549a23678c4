"""Training: train, runs, checkpoints list/prune/promote, and generate with a trained version."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import click

from ..errors import AdapterHubError
from ..training.optimizers import OPTIMIZERS, SCHEDULE_HELP
from .context import COUNT, Context, FiniteFloat, parse_tags, pass_ctx, train_number


def _size(count: int) -> str:
    """Bytes as mlx-lm reports memory (decimal GB), in MB below one GB."""
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def _report_lines():
    """Plain report lines on stderr, one per event, for logs and pipes."""
    from ..training.callbacks import TrainingCallback

    class Lines(TrainingCallback):
        def on_train_report(self, r) -> None:
            click.echo(f"step {r.step}/{r.iters}: train loss {r.train_loss:.4f}, {r.tokens_per_second:.0f} tok/s, "
                       f"lr {r.learning_rate:.2e}, peak memory {_size(r.peak_memory)}", err=True)

        def on_val_report(self, step: int, val_loss: float) -> None:
            click.echo(f"step {step}: validation loss {val_loss:.4f}", err=True)

        def on_checkpoint(self, step: int, removed: list[int], seconds: float) -> None:
            pruned = f" (pruned {', '.join(map(str, removed))})" if removed else ""
            click.echo(f"step {step}: checkpoint saved in {seconds:.3f} s{pruned}", err=True)

        def on_resume(self, step: int) -> None:
            click.echo(f"resumed at step {step}", err=True)

        def on_test(self, test_loss: float, test_perplexity: float) -> None:
            click.echo(f"test loss {test_loss:.4f}, perplexity {test_perplexity:.2f}", err=True)

    return Lines()


def _progress_bar(bar, task):
    """A rich progress bar with loss, tokens/s, the last validation loss and ETA, for a terminal."""
    from ..training.callbacks import TrainingCallback

    class Bar(TrainingCallback):
        val = ""

        def on_val_report(self, step: int, val_loss: float) -> None:
            self.val = f"val {val_loss:.3f}"

        def on_train_report(self, r) -> None:
            bar.update(task, completed=r.step, status=f"loss {r.train_loss:.3f} · {r.tokens_per_second:.0f} tok/s · "
                                                      f"{_size(r.peak_memory)} {self.val}")

        def on_resume(self, step: int) -> None:
            bar.update(task, completed=step, status=self.val)

    return Bar()


@contextmanager
def _training_callback(ctx: Context, iters: int):
    """A progress bar on a terminal; plain report lines otherwise; nothing when quiet or printing JSON."""
    from ..training.callbacks import TrainingCallback

    if ctx.quiet or ctx.as_json:
        yield TrainingCallback()
    elif not sys.stderr.isatty():
        yield _report_lines()
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                      TimeRemainingColumn(), transient=False) as bar:
            yield _progress_bar(bar, bar.add_task("train", total=iters, status=""))


@click.command()
@click.option("--base", "base_", help="Base model folder or registered base name.")
@click.option("--data", type=click.Path(path_type=Path), help="Folder with train.jsonl / valid.jsonl / test.jsonl.")
@click.option("--name", help="Adapter name; the result becomes its next version.")
@click.option("--from", "from_ref", help="Continue from this version's weights (chained training).")
@click.option("--kind", type=click.Choice(["lora", "dora", "loreft"]))
@click.option("--rank", type=train_number("rank"))
@click.option("--scale", type=train_number("scale"))
@click.option("--dropout", type=train_number("dropout"))
@click.option("--num-layers", type=train_number("num_layers"))
@click.option("--iters", type=train_number("iters"))
@click.option("--batch-size", type=train_number("batch_size"))
@click.option("--learning-rate", type=train_number("learning_rate"),
              help="Learning rate (default 1e-5 as in mlx-lm; 4e-3 for --kind loreft, in pyreft's range).")
@click.option("--lr-schedule", metavar="NAME[:ARGS]", help=SCHEDULE_HELP + ".")
@click.option("--warmup", type=click.IntRange(0), help="Steps of linear warm-up into --lr-schedule (mlx-lm's warmup).")
@click.option("--warmup-init", type=FiniteFloat(0), help="Learning rate the warm-up starts from (default 0).")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)),
              help="As mlx-lm's; their keyword arguments go in --config under optimizer_config.")
@click.option("--max-seq-length", type=train_number("max_seq_length"))
@click.option("--grad-accumulation-steps", type=train_number("grad_accumulation_steps"))
@click.option("--mask-prompt", is_flag=True, default=None)
@click.option("--seed", type=train_number("seed"))
@click.option("--val-batches", type=train_number("val_batches"))
@click.option("--steps-per-eval", type=train_number("steps_per_eval"))
@click.option("--steps-per-report", type=train_number("steps_per_report"))
@click.option("--grad-checkpoint", is_flag=True, default=None, help="Recompute each layer in the backward pass: less memory, more time.")
@click.option("--report-to", type=click.Choice(["wandb"]), help="Also log to Weights & Biases (needs the wandb package).")
@click.option("--project-name", help="--report-to project (default: the adapter name).")
@click.option("--save-every", type=train_number("save_every"))
@click.option("--keep-last", type=train_number("keep_last"), help="Keep the newest K checkpoints (default 3).")
@click.option("--keep-best", type=train_number("keep_best"), help="Keep the best M checkpoints by validation loss (default 1).")
@click.option("--keep-every", type=train_number("keep_every"), help="Also keep every P-th step.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML options, as mlx_lm.lora reads them.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--layers", help="LoReFT: decoder layers to intervene on, e.g. '8;16', or all.")
@click.option("--positions", help="LoReFT: prompt positions in pyreft's notation (default f1+l1: first and last token).")
@click.option("--share-weights", is_flag=True, default=None, help="LoReFT: one intervention for first and last positions.")
@click.option("--activation", type=click.Choice(["linear", "relu", "gelu", "tanh", "silu"]), help="LoReFT: on W h + b (default linear).")
@click.option("--resume", "resume_id", metavar="RUN_ID", help="Continue an interrupted run exactly.")
@pass_ctx
def train(ctx: Context, config_file: Path | None, tags: tuple[str, ...], resume_id: str | None, base_: str | None,
          data: Path | None, **options) -> None:
    """Train a new adapter version with the bundled MLX trainer (data-parallel under mlx.launch)."""
    from ..training import distributed, trainer
    from ..training.config import merge

    world = distributed.init()
    try:
        # Under mlx.launch, rank 0 alone opens the registry, reports and prints the result.
        registry = ctx.registry if world.writes else None
        if resume_id:
            iters = registry.run(resume_id)["iters"] if registry else 0
            with _training_callback(ctx, iters) as callback:
                version = trainer.resume(registry, resume_id, callback, world)
        else:
            cli_options = dict(options, base=base_, data=str(data) if data else None, tags=parse_tags(tags) or None)
            config, error = None, None
            try:
                config = merge(cli_options, config_file)
            except AdapterHubError as e:
                error = e
            distributed.refuse_together(world, error)  # every rank refuses a bad command line, rank 0 says why
            with _training_callback(ctx, config.iters) as callback:
                version = trainer.train(registry, config, callback, world)
    except distributed.PeerRefusal:
        if world.writes:
            raise
        sys.exit(1)  # rank 0 prints the one error line
    if version is None:
        return
    losses = version.record["training"]["losses"]
    val = losses.get("val") or []
    change = f", validation loss {val[0][1]:.4f} -> {val[-1][1]:.4f}" if len(val) > 1 else ""
    ctx.emit(version.to_dict(), f"trained {version.ref}  {version.sha256[:12]}  (run {version.record['training']['run_id']}{change})")


@click.command()
@click.option("--status", type=click.Choice(["running", "interrupted", "finished", "failed"]))
@pass_ctx
def runs(ctx: Context, status: str | None) -> None:
    """Training runs: id, name, status, step, iters, started."""
    found = ctx.registry.runs(status)
    header = f"{'ID':<44} {'NAME':<24} {'STATUS':<12} {'STEP':>6} {'ITERS':>6}  STARTED"
    ctx.emit(found, "\n".join([header] + [f"{r['id']:<44} {r['name']:<24} {r['status']:<12} {r['step']:>6} {r['iters']:>6}  "
                                          f"{r['started_at']}" for r in found]) if found else "no training runs")


@click.group("checkpoints")
def checkpoints_group() -> None:
    """List, prune and promote a run's checkpoints."""


def _run_dir(ctx: Context, run_id: str) -> tuple[dict, Path]:
    record = ctx.registry.run(run_id)
    return record, Path(record["dir"])


@checkpoints_group.command("list")
@click.argument("run_id")
@pass_ctx
def checkpoints_list(ctx: Context, run_id: str) -> None:
    """Step, losses and why each checkpoint is kept."""
    from ..training import checkpoints

    record, folder = _run_dir(ctx, run_id)
    config = record["config"]
    found = checkpoints.listing(folder)
    why = checkpoints.retained(found, config["keep_last"], config["keep_best"], config.get("keep_every"))
    rows = [{"step": c.step, "train_loss": float(c.metadata["train_loss"]), "val_loss": c.val_loss,
             "kept_because": why.get(c.step, []), "path": str(c.path)} for c in found]
    ctx.emit(rows, "\n".join([f"{'STEP':>8} {'TRAIN':>8} {'VAL':>8}  KEPT BECAUSE"] + [
        f"{r['step']:>8} {r['train_loss']:>8.4f} {r['val_loss'] if r['val_loss'] is not None else float('nan'):>8.4f}  "
        f"{', '.join(r['kept_because']) or '-'}" for r in rows]) if rows else "no checkpoints")


@checkpoints_group.command("prune")
@click.argument("run_id")
@click.option("--keep-last", type=train_number("keep_last"))
@click.option("--keep-best", type=train_number("keep_best"))
@click.option("--keep-every", type=train_number("keep_every"))
@pass_ctx
def checkpoints_prune(ctx: Context, run_id: str, keep_last: int | None, keep_best: int | None, keep_every: int | None) -> None:
    """Delete the checkpoints a retention policy does not keep (the run's own policy by default)."""
    from ..training import checkpoints

    record, folder = _run_dir(ctx, run_id)
    config = record["config"]
    removed = checkpoints.prune(folder, config["keep_last"] if keep_last is None else keep_last,
                                config["keep_best"] if keep_best is None else keep_best,
                                config.get("keep_every") if keep_every is None else keep_every)
    ctx.emit({"removed": removed}, f"removed {len(removed)} checkpoint(s)" + (f": {', '.join(map(str, removed))}" if removed else ""))


@checkpoints_group.command("promote")
@click.argument("run_id")
@click.argument("step", type=COUNT)
@click.option("--name", required=True)
@pass_ctx
def checkpoints_promote(ctx: Context, run_id: str, step: int, name: str) -> None:
    """Register one checkpoint as a version."""
    from ..training.checkpoints import promote

    version = promote(ctx.registry, run_id, step, name)
    ctx.emit(version.to_dict(), f"promoted step {step} of {run_id} -> {version.ref}")


@click.command()
@click.argument("ref")
@click.option("--base", "base_", help="Base model folder or registered base name (default: the adapter's own base).")
@click.option("--prompt", required=True)
@click.option("--max-tokens", type=COUNT, default=100, show_default=True)
@click.option("--allow-different-weights", is_flag=True)
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt as given, even when the tokenizer has a chat template.")
@pass_ctx
def generate(ctx: Context, ref: str, base_: str | None, prompt: str, max_tokens: int, allow_different_weights: bool,
             ignore_chat_template: bool) -> None:
    """Generate with a registered adapter applied (after the compatibility check)."""
    from ..generation import generate as run_generate

    result = run_generate(ctx.registry, ref, base_, prompt, max_tokens, allow_different_weights, not ignore_chat_template)
    ctx.emit(result, result["text"])


COMMANDS = [train, runs, checkpoints_group, generate]
