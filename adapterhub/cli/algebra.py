"""Adapter algebra: fuse, unfuse, stack, extract (the tensor work is in adapterhub.algebra)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdapterHubError
from .context import COUNT, FORCE_OPTION, Context, FiniteFloat, parse_tags, pass_ctx

PROFILE_ENV = "ADAPTERHUB_PROFILE"
# The variable as well as the flag: a benchmark drives the real command line and reads the line from stderr.
PROFILE_OPTION = click.option("--profile", is_flag=True, envvar=PROFILE_ENV,
                              help=f"Time each activity (reading, computing, writing, ...) and print it on stderr "
                                   f"(also with {PROFILE_ENV}=1); --json reports it under 'profile'.")


def _show_profile(profile: dict | None) -> None:
    """On stderr, so it never mixes with --json on stdout; printed under --quiet too, which silences what
    was not asked for (progress, notes), while a profile only comes when asked for."""
    if profile:
        from ..tensor_writers import format_profile

        click.echo(format_profile(profile), err=True)


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [FiniteFloat().convert(w.strip(), None, None) for w in text.split(",")]
    except click.BadParameter as e:
        raise click.BadParameter(e.message, param_hint="--weights") from None


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--base", "base_", required=True, help="Base model folder or registered base name.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the fused model.")
@click.option("--dequantize", is_flag=True, help="Write a dequantized (float) model from a quantized base.")
@click.option("--no-restore", is_flag=True, help="Keep no restore data (unfuse is then approximate).")
@click.option("--allow-different-weights", is_flag=True, help="Accept a base with other weights of the same structure.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--no-fidelity", is_flag=True,
              help="Skip the check of the fused model against base + adapter on a few prompts (it loads both models).")
@FORCE_OPTION
@PROFILE_OPTION
@pass_ctx
def fuse(ctx: Context, refs: tuple[str, ...], base_: str, out: Path, dequantize: bool, no_restore: bool,
         allow_different_weights: bool, dry_run: bool, no_fidelity: bool, force: bool, profile: bool) -> None:
    """Bake adapters into a base model (streamed; bit-identical to mlx_lm.fuse), then check it against base + adapter."""
    from ..algebra.fuse import execute_fuse, plan_fuse
    from ..card import fused_card
    from ..fidelity import fidelity

    plan = plan_fuse(ctx.registry, list(refs), base_, out, dequantize, not no_restore, allow_different_weights, force=force)
    if dry_run:
        ctx.emit(plan.to_dict(), plan.describe())
        return
    total = sum(f["size"] for f in plan.base["files"])
    with ctx.progress(f"fusing into {out.name}", total) as advance:
        record = execute_fuse(plan, ctx.registry, advance, card=fused_card, profile=profile,
                              fidelity=None if no_fidelity else fidelity)
    _show_profile(record.get("profile"))
    restore = record["restore"]
    size = sum(f["size"] for f in record["files"])
    ctx.emit(record, "\n".join([
        f"fused {', '.join(a['ref'] for a in record['adapters'])} into {record['base']['name']} -> {out}  ({record['seconds']:.2f} s)",
        f"  sha256  {record['sha256']}",
        f"  restore {restore['size']:,} bytes ({100 * restore['size'] / size:.2f} % of the model), unfuse is exact"
        if restore else "  restore none: unfuse will be approximate",
    ] + _fidelity_lines(record, plan) + [f"  · {n}" for n in plan.notes]))


def _fidelity_lines(record: dict, plan) -> list[str]:
    from ..eval_settings import DEFAULT_TOLERANCE

    measured = record.get("fidelity")
    if not measured:
        return []
    lines = [f"  fidelity greedy tokens agree at {100 * measured['token_agreement']:.1f} % of {measured['positions']} "
             f"positions on {measured['prompts']} prompts, largest logit difference {measured['max_logit_diff']:.3g}"
             + (" — exact" if measured["exact"] else "")]
    if 1 - measured["token_agreement"] > DEFAULT_TOLERANCE and plan.base["config"].get("quantization") and not plan.dequantize:
        lines.append(f"  warning  re-quantizing the fused weights moved {100 * (1 - measured['token_agreement']):.1f} % of "
                     "greedy tokens away from base + adapter; fuse with --dequantize to keep the adapter's accuracy")
    return lines


@click.command()
@click.argument("fused_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the base model.")
@click.option("--adapter", "adapters", multiple=True, metavar="REF",
              help="Adapters that were fused (for a model fused elsewhere; subtracts them, approximately).")
@click.option("--base", "base_", help="Base to measure the result against (default: the one recorded).")
@FORCE_OPTION
@PROFILE_OPTION
@pass_ctx
def unfuse(ctx: Context, fused_dir: Path, out: Path, adapters: tuple[str, ...], base_: str | None, force: bool,
           profile: bool) -> None:
    """The base model back from a fused one: exact with restore data, measured without."""
    from ..algebra.unfuse import unfuse as run_unfuse

    total = sum(p.stat().st_size for p in fused_dir.glob("*.safetensors"))
    with ctx.progress(f"unfusing into {out.name}", total) as advance:
        report = run_unfuse(ctx.registry, fused_dir, out, list(adapters) or None, base_, advance, force=force,
                            profile=profile)
    _show_profile(report.profile)
    if report.exact:
        verdict = f"exact: the base is back, bit for bit (matches {report.base})"
    elif report.exact is None:
        verdict = "exactness unknown"
    else:
        share = f"{100 * report.inexact_fraction:.2f} %" if report.inexact_fraction is not None else "some"
        verdict = f"approximate: {share} of updated elements differ from {report.base}, largest error {report.max_abs_error:.3g}"
    ctx.emit(report.to_dict(), "\n".join([f"unfused {fused_dir} -> {out}", f"  {verdict}"] + [f"  · {n}" for n in report.notes]))
    if report.exact is False and not adapters:
        raise AdapterHubError(f"the base rebuilt from {fused_dir} does not match base {report.base}",
                              hint="the fused files or the restore data changed; run 'adapterhub verify'")


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--name", required=True, help="Name of the stacked adapter (becomes its next version).")
@click.option("--weights", help="One weight per adapter, comma-separated (default 1 each).")
@click.option("--method", type=click.Choice(["cat", "linear", "svd"]), default="cat", show_default=True)
@click.option("--rank", type=COUNT, help="Rank of the result (needed by --method svd).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--description")
@pass_ctx
def stack(ctx: Context, refs: tuple[str, ...], name: str, weights: str | None, method: str, rank: int | None,
          tags: tuple[str, ...], description: str | None) -> None:
    """Combine adapters into one that plain mlx-lm loads."""
    from ..algebra.stack import stack as run_stack

    version, report = run_stack(ctx.registry, list(refs), name, _floats(weights), method, rank, parse_tags(tags), description)
    lines = [f"stacked {', '.join(refs)} -> {version.ref}  ({method}, rank {report.rank})"]
    if method == "cat":
        lines.append("  exact: the stacked update is the weighted sum of the sources' updates")
    elif report.per_module:
        label = "energy kept" if method == "svd" else "relative error"
        values = list(report.per_module.values())
        lines.append(f"  {label} per module: min {min(values):.4f}, mean {sum(values) / len(values):.4f}, max {max(values):.4f}")
    ctx.emit(version.to_dict() | {"report": report.to_dict()}, "\n".join(lines + [f"  · {n}" for n in report.notes]))


@click.command()
@click.option("--base", "base_", required=True, help="Base model folder or registered base name.")
@click.option("--fused", "fused_dir", required=True, type=click.Path(path_type=Path), help="The fused model folder.")
@click.option("--rank", required=True, type=COUNT)
@click.option("--name", required=True)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@pass_ctx
def extract(ctx: Context, base_: str, fused_dir: Path, rank: int, name: str, tags: tuple[str, ...]) -> None:
    """Recover a LoRA from a fused model (truncated SVD of fused - base)."""
    from ..algebra.extract import extract as run_extract

    version, report = run_extract(ctx.registry, base_, fused_dir, rank, name, parse_tags(tags))
    errors = list(report.relative_error.values())
    lines = [f"extracted {version.ref} from {fused_dir}  (rank {report.rank}, {len(errors)} modules)",
             f"  relative error per module: max {max(errors):.2e}, mean {sum(errors) / len(errors):.2e}"]
    if report.not_representable:
        lines.append(f"  · {len(report.not_representable)} changed tensors are not linear layers and were left out: "
                     + ", ".join(report.not_representable[:5]))
    ctx.emit(version.to_dict() | {"report": report.to_dict()}, "\n".join(lines))


COMMANDS = [fuse, unfuse, stack, extract]
