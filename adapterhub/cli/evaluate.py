"""Evaluation: eval (a version, a base alone, a fused model; or a fused model against base + adapter) and compare."""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from ..errors import AdapterHubError
from ..eval_settings import AGAINST_PROMPTS, BATCH_SIZE, DEFAULT_TOLERANCE, MAX_SEQ_LENGTH, METRICS, SPLITS
from .context import COUNT, Context, FiniteFloat, pass_ctx


def _steps_progress(ctx: Context):
    """A bar of batches for a person at a terminal; nothing for pipes, --json or --quiet."""
    if ctx.quiet or ctx.as_json or not sys.stderr.isatty():
        return lambda description, total: nullcontext(lambda n: None)

    @contextmanager
    def bar(description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)
    return bar


def _fidelity_text(report: dict) -> str:
    verdict = "exact" if report["exact"] else \
        f"{'within' if report['passed'] else 'PAST'} --tolerance {report['tolerance']:g}"
    return (f"{report['fused']} against {report['against']} on {report['base']}: largest logit difference "
            f"{report['max_logit_diff']:.3g} (mean {report['mean_logit_diff']:.3g}), greedy tokens agree at "
            f"{100 * report['token_agreement']:.1f} % of {report['positions']} positions, same continuation on "
            f"{report['same_continuations']}/{report['prompts']} prompts — {verdict}")


@click.command("eval")
@click.argument("target", required=False, metavar="[REF|DIR]")
@click.option("--base", "base_", help="Base model folder or registered name: alone (no REF), or the base to apply REF to.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset folder (default: the one the version was trained on).")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--metric", type=click.Choice(METRICS), default="loss", show_default=True,
              help="loss: mlx-lm's loss and perplexity; exact-match: completions reproduced greedily, and token accuracy.")
@click.option("--batch-size", type=COUNT, default=BATCH_SIZE, show_default=True)
@click.option("--max-seq-length", type=COUNT, default=MAX_SEQ_LENGTH, show_default=True)
@click.option("--force", is_flag=True, help="Measure again although this evaluation is recorded (a new result is added).")
@click.option("--against", metavar="REF", help="Check the model folder DIR against base + REF: logits and greedy tokens.")
@click.option("--tolerance", type=FiniteFloat(min=0, max=1), default=None,
              help=f"With --against: the largest share of greedy tokens that may differ (default {DEFAULT_TOLERANCE:g}).")
@click.option("--prompts", "prompt_count", type=COUNT, default=None,
              help=f"With --against: prompts to compare on (default {AGAINST_PROMPTS}).")
@pass_ctx
def eval_(ctx: Context, target: str | None, base_: str | None, data: Path | None, split: str, metric: str, batch_size: int,
          max_seq_length: int, force: bool, against: str | None, tolerance: float | None, prompt_count: int | None) -> None:
    """Score a version, a fused model folder, or a base alone (--base) on held-out data; recorded on it, and
    reused unless --force. With --against REF, check a model folder against base + REF; exit 1 past --tolerance."""
    if against is None:
        if tolerance is not None or prompt_count is not None:
            raise click.UsageError("--tolerance and --prompts go with --against REF")
        from ..evaluation import evaluate

        result = evaluate(ctx.registry, target, base_, data, split, metric, batch_size, max_seq_length, force,
                          progress=_steps_progress(ctx))
        subject, base = result.row["subject"], result.row["base"]["name"]
        label = {"adapter": f"{subject.get('ref')} on {base}", "fused": f"{subject.get('path')} (fused into {base})",
                 "base": f"{base} alone"}[subject["kind"]]
        ctx.emit({**result.to_dict(), "reused": result.reused}, f"{label}: {result.summary()}"
                 + (f"  (recorded {result.row['created_at']}; --force measures again)" if result.reused else ""))
        return
    if target is None or not Path(target).expanduser().is_dir():
        raise click.UsageError("--against compares a model folder with base + REF: give the folder as DIR")
    from ..fidelity import check_fidelity

    report = check_fidelity(ctx.registry, target, against, DEFAULT_TOLERANCE if tolerance is None else tolerance, data,
                            split if data is not None else None, prompt_count or AGAINST_PROMPTS, base_)
    ctx.emit(report, _fidelity_text(report))
    if not report["passed"]:
        raise AdapterHubError(f"{target}'s greedy tokens differ from base + {report['against']} at "
                              f"{100 * report['disagreement']:.1f} % of positions, past --tolerance {report['tolerance']:g}",
                              hint="fuse again with --dequantize (re-quantizing the fused weights loses accuracy), "
                                   "or serve base + adapter unfused")


def _cell(field: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        short = ",".join(sorted({str(v).rsplit(".", 1)[-1] for v in value}))
        return short if len(short) <= 28 else f"{len(value)} modules"
    if isinstance(value, float) and field.endswith(("exact_match", "token_accuracy")):
        return f"{100 * value:.1f} %"
    if isinstance(value, float):
        return f"{value:.4f}" if field.endswith("loss") else f"{value:.2f}" if field.endswith("perplexity") else f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _comparison_text(comparison) -> str:
    header = ["", *[c["label"] for c in comparison.columns]]
    table = [header]
    for row in comparison.rows:
        label = row["field"] + (f" ({row['dataset']})" if row.get("dataset") else "")
        table.append([label, *[_cell(row["field"], v) + (" *" if i in row["best"] else "")
                               for i, v in enumerate(row["values"])]])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    notes = ["* best in its row"]
    if comparison.not_shared:
        notes.append(f"{comparison.not_shared} recorded evaluation(s) not shared by every column are left out; "
                     "--data DIR scores them all on one dataset")
    return "\n".join(lines + notes)


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--base", "base_", help="Add this base model alone as a column.")
@click.option("--data", type=click.Path(path_type=Path), help="First score every column on this dataset (recorded scores are reused).")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRICS),
              help="With --data (repeatable): default loss, and exact-match for prompt/completion or chat data.")
@click.option("--batch-size", type=COUNT, default=BATCH_SIZE, show_default=True)
@click.option("--max-seq-length", type=COUNT, default=MAX_SEQ_LENGTH, show_default=True)
@pass_ctx
def compare(ctx: Context, refs: tuple[str, ...], base_: str | None, data: Path | None, split: str, metrics: tuple[str, ...],
            batch_size: int, max_seq_length: int) -> None:
    """Versions side by side: what they are, how they trained, every evaluation they share; the best value marked."""
    from ..evaluation import compare as compare_versions

    comparison = compare_versions(ctx.registry, list(refs), base_, data, split, list(metrics) or None, batch_size,
                                  max_seq_length, progress=_steps_progress(ctx))
    ctx.emit(comparison.to_dict(), _comparison_text(comparison))


COMMANDS = [eval_, compare]
