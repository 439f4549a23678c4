"""The `adapterhub` command: one library call per command, plus presentation.

Heavy modules (mlx, mlx_lm, transformers, jsonschema, rich) are imported inside
the commands that need them, so `--help`, `list` and `show` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from .errors import AdapterHubError, printable
from .records import AdapterVersion, unapplied
from .registry import Registry
from .store import dump_json

ENV_REGISTRY = "ADAPTERHUB_REGISTRY"


def default_registry() -> Path:
    value = os.environ.get(ENV_REGISTRY, "")
    if value:  # empty is unset, as shells export it; blank would quietly mean the current folder
        if not value.strip():
            raise AdapterHubError(f"{ENV_REGISTRY} is blank, which would mean the current folder",
                                  hint="set it to the registry folder, or unset it")
        return Path(value)
    if Path("registry").is_dir():
        return Path("registry")
    return Path.home() / ".adapterhub"


class Context:
    """The global options, wherever on the command line they were given."""

    def __init__(self, registry_path: Path | None, as_json: bool, quiet: bool):
        self.registry_path = registry_path
        self.as_json = as_json
        self.quiet = quiet
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        # Built on first use, after every option (before or after the command) has been read.
        if self._registry is None:
            self._registry = Registry(self.registry_path or default_registry(), progress=self.progress)
        return self._registry

    def progress(self, description: str, total: int):
        # Progress only for a person watching a terminal, and only when there is enough to watch.
        if self.quiet or not sys.stderr.isatty() or total < (64 << 20):
            return nullcontext(lambda n: None)
        return _rich_progress(description, total)

    def emit(self, data, text: str | None = None) -> None:
        """--json prints `data`; otherwise `text` unless --quiet."""
        if self.as_json:
            # Indented for a person at a terminal; compact for pipes, where json's C encoder
            # is ten times faster on a long listing (it only runs without indent).
            indent = 2 if sys.stdout.isatty() else None
            click.echo(dump_json(data, "the JSON report", indent=indent))
        elif text is not None and not self.quiet:
            click.echo(text)


@contextmanager
def _rich_progress(description: str, total: int):
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


pass_ctx = click.make_pass_decorator(Context)


def _registry_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    # Checked before it becomes a Path: Path("") is ".", and would quietly mean the current folder.
    if value is not None and not value.strip():
        raise click.BadParameter("an empty path would mean the current folder; give the registry folder", param_hint="--registry")
    return Path(value) if value is not None else None


class FiniteFloat(click.FloatRange):
    """A float in a range that is a real number: Click's FloatRange lets NaN through every bound."""

    name = "number"

    def _describe_range(self) -> str:
        return "finite" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _late_global_option(attribute: str, *decls: str, check=None, **kwargs) -> click.Option:
    """A global option repeated on each command, so `adapterhub list --json` means `adapterhub --json list`."""
    def store(ctx: click.Context, param: click.Parameter, value) -> None:
        if check:
            value = check(ctx, param, value)
        if value:
            setattr(ctx.find_object(Context), attribute, value)
    return click.Option(decls, expose_value=False, callback=store, **kwargs)


def _train_number(option: str) -> click.ParamType:
    """The click type for a training option, from the library's own ranges (one source of truth)."""
    from .training.config import FLOAT_OPTIONS, RANGES

    allowed = RANGES[option]
    if option in FLOAT_OPTIONS:
        return FiniteFloat(allowed.min, allowed.max, max_open=allowed.max_open)
    # A special value below the range (-1: all layers) is let through here for the library to accept.
    low = allowed.also if allowed.also is not None and allowed.also < allowed.min else allowed.min
    return click.IntRange(low, allowed.max)


def _accept_global_options_after_commands(group: click.Group) -> None:
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_global_options_after_commands(command)
            continue
        command.params += [
            _late_global_option("registry_path", "--registry", type=click.Path(), check=_registry_path,
                                help="Same as the global --registry."),
            _late_global_option("as_json", "--json", is_flag=True, help="Same as the global --json."),
            _late_global_option("quiet", "--quiet", "-q", is_flag=True, help="Same as the global --quiet."),
        ]
FORCE_OPTION = click.option("--force", is_flag=True,
                            help="Replace an existing output (never inside the registry or an input folder).")


def _parse_tags(pairs: tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{pair}' is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    return tags


def _version_line(v: AdapterVersion) -> str:
    base = (v.record.get("base") or {}).get("name") or "-"
    aliases = ",".join(v.aliases) or "-"
    tags = ",".join(f"{k}={val}" for k, val in sorted(v.record["tags"].items())) or "-"
    return f"{v.ref:<32} {v.record['kind']:<6} {v.record['rank']:>4}  {base:<24} {aliases:<12} {tags:<20} {v.record['created_at']}"


def _show_text(v: AdapterVersion) -> str:
    r = v.record
    base, data = r.get("base"), r.get("dataset")
    lines = [
        f"{v.ref}  ({r['kind']}, rank {r['rank']}, scale {r['scale']:g})",
        f"  sha256     {r['sha256']}",
        f"  targets    {', '.join(r['targets'])}",
        f"  layers     {r['num_layers']} ({', '.join(map(str, r['layers']))})",
        f"  parameters {r.get('num_parameters', 0):,} ({r.get('dtype', '?')})",
        f"  base       {base['name'] + '  ' + base['sha256'][:12] + '  (' + str(base['model_type']) + ')' if base else 'unknown'}",
        f"  dataset    {data['name'] + '  ' + data['sha256'][:12] + '  ' + json.dumps(data['examples']) if data else '-'}",
    ]
    if r.get("loreft"):
        lf = r["loreft"]
        lines.append(f"  loreft     positions {lf['positions']}, {lf['interventions']} intervention(s) per layer"
                     f"{' (shared)' if lf['share_weights'] else ''}, {lf['activation']}, hidden size {lf['hidden_size']}")
    for p in r["parents"]:
        lines.append(f"  parent     {p['relation']} {p['ref']}  {p['sha256'][:12]}")
    if v.aliases:
        lines.append(f"  aliases    {', '.join(v.aliases)}")
    if r["tags"]:
        lines.append(f"  tags       {', '.join(f'{k}={val}' for k, val in sorted(r['tags'].items()))}")
    if r.get("training"):
        hp = r["training"].get("hyperparameters") or {}
        shown = {k: hp[k] for k in ("iters", "batch_size", "learning_rate", "optimizer", "seed") if k in hp}
        lines.append(f"  training   {r['training'].get('tool')}: {', '.join(f'{k}={val}' for k, val in shown.items())}")
    if r.get("description"):
        lines.append(f"  about      {r['description']}")
    lines.append(f"  created    {r['created_at']}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", "registry_path", type=click.Path(), default=None, callback=_registry_path,
              help=f"Registry folder (else ${ENV_REGISTRY}, else ./registry when it exists, else ~/.adapterhub).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no report lines.")
@click.version_option(package_name="adapterhub")
@click.pass_context
def cli(ctx: click.Context, registry_path: Path | None, as_json: bool, quiet: bool) -> None:
    """Catalogue, check and manage LoRA / DoRA / LoReFT adapters for MLX models."""
    ctx.obj = Context(registry_path, as_json, quiet)


@cli.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@pass_ctx
def init(ctx: Context, path: Path | None) -> None:
    """Create a registry (at PATH, else the --registry / default one)."""
    registry = Registry(path) if path else ctx.registry
    created = registry.init()
    ctx.emit({"path": str(registry.root), "created": created},
             f"{'created' if created else 'already a registry:'} {registry.root}")


@cli.group()
def base() -> None:
    """Register and inspect base models."""


def _base_dict(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "tensors"} | {"num_tensors": len(record["tensors"])}


@base.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name for the base (default: from the folder name).")
@click.option("--verify", "reread", is_flag=True, help="Re-read every file instead of trusting caches.")
@pass_ctx
def base_add(ctx: Context, path: Path, name: str | None, reread: bool) -> None:
    """Fingerprint and register a base model folder."""
    record, created = ctx.registry.add_base(path, name, reread)
    size = sum(f["size"] for f in record["files"])
    ctx.emit(_base_dict(record), f"{'registered' if created else 'already registered:'} base {record['name']}  "
             f"{record['sha256'][:12]}  ({record['model_type']}, {len(record['files'])} files, {size / 1e6:.1f} MB)")


@base.command("list")
@pass_ctx
def base_list(ctx: Context) -> None:
    """List registered base models."""
    bases = ctx.registry.bases()
    ctx.emit([_base_dict(b) for b in bases], "\n".join(
        f"{b['name']:<28} {b['sha256'][:12]}  {str(b['model_type']):<10} {b['config']['num_hidden_layers']} layers  {b['path']}"
        for b in bases) or "no base models registered")


@base.command("show")
@click.argument("name_or_sha")
@pass_ctx
def base_show(ctx: Context, name_or_sha: str) -> None:
    """Show one base model's fingerprint."""
    b = ctx.registry.base(name_or_sha)
    q = b["config"]["quantization"]
    ctx.emit(_base_dict(b), "\n".join([
        f"{b['name']}  ({b['model_type']}, {b['config']['num_hidden_layers']} layers, hidden {b['config']['hidden_size']}"
        + (f", {q['bits']}-bit" if q else "") + ")",
        f"  sha256           {b['sha256']}",
        f"  structure_sha256 {b['structure_sha256']}",
        f"  path             {b['path']}",
        *[f"  {f['name']:<40} {f['sha256'][:12]}  {f['size']:,} bytes" for f in b["files"]],
    ]))


@cli.command("import")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Adapter name; the import becomes its next version.")
@click.option("--base", "base_", help="Base model folder or registered base name.")
@click.option("--dataset", type=click.Path(path_type=Path), help="Dataset folder it was trained on.")
@click.option("--parent", help="Ref of the version it was trained from.")
@click.option("--relation", default="resumed-from", show_default=True,
              type=click.Choice(["resumed-from", "stacked-from", "fused-from", "extracted-from", "imported-from"]))
@click.option("--checkpoint", help="Import this checkpoint file (e.g. 0000100_adapters.safetensors) instead.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the version (repeatable).")
@click.option("--description", help="One line about the adapter.")
@pass_ctx
def import_(ctx: Context, folder: Path, name: str, base_: str | None, dataset: Path | None, parent: str | None,
            relation: str, checkpoint: str | None, tags: tuple[str, ...], description: str | None) -> None:
    """Register an mlx-lm adapter folder as a new version."""
    version, created = ctx.registry.import_adapter(folder, name, base_, dataset, parent, relation,
                                                   _parse_tags(tags), description, checkpoint)
    ignored = unapplied(version, created, _parse_tags(tags), description)
    ctx.emit(version.to_dict() | {"created": created, "not_applied": ignored},
             f"{'imported' if created else 'already registered:'} {version.ref}  {version.sha256[:12]}  "
             f"({version.record['kind']}, rank {version.record['rank']}, {version.record['num_layers']} layers)")
    if ignored and not ctx.quiet:
        how = [f"adapterhub tag {version.ref} {k}={v}" for k, v in ignored.get("tags", {}).items()]
        click.echo(f"note: {', '.join(ignored)} not applied: {version.ref} already holds these weights"
                   + (f" — run {'; '.join(how)}" if how else " — a version's description is fixed when it is created"),
                   err=True)




@cli.command("list")
@click.option("--base", "base_", help="Only versions on this base (name or sha256).")
@click.option("--kind", type=click.Choice(["lora", "dora", "loreft"]))
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--name", "name_glob", metavar="GLOB", help="Only names matching this glob.")
@pass_ctx
def list_(ctx: Context, base_: str | None, kind: str | None, tags: tuple[str, ...], name_glob: str | None) -> None:
    """List adapter versions."""
    versions = ctx.registry.list(base_, kind, _parse_tags(tags), name_glob)
    header = f"{'REF':<32} {'KIND':<6} {'RANK':>4}  {'BASE':<24} {'ALIASES':<12} {'TAGS':<20} CREATED"
    ctx.emit([v.to_dict() for v in versions],
             "\n".join([header] + [_version_line(v) for v in versions]) if versions else "no adapters match")


@cli.command()
@click.argument("ref")
@pass_ctx
def show(ctx: Context, ref: str) -> None:
    """Show one adapter version."""
    version = ctx.registry.resolve(ref)
    ctx.emit(version.to_dict(), _show_text(version))


@cli.command()
@click.argument("ref")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "format_", type=click.Choice(["mlx", "peft"]), default="mlx", show_default=True)
@FORCE_OPTION
@pass_ctx
def export(ctx: Context, ref: str, out: Path, format_: str, force: bool) -> None:
    """Write an adapter folder that mlx_lm (or PEFT) loads as is, with its model card."""
    from .export import export as write_export

    files = write_export(ctx.registry, ref, out, format_, force=force)
    ctx.emit({"ref": ref, "out": str(out), "files": [str(f) for f in files]}, f"exported {ref} to {out}")


@cli.command()
@click.argument("ref")
@click.option("--base", "base_", required=True, help="Base model folder or registered base name.")
@click.option("--allow-different-weights", is_flag=True, help="Accept the same structure with other weights.")
@pass_ctx
def check(ctx: Context, ref: str, base_: str, allow_different_weights: bool) -> None:
    """Check that an adapter fits a base model; exit 1 when it does not."""
    report = ctx.registry.check(ref, base_, allow_different_weights)
    ctx.emit(report.to_dict(), report.summary())
    if not report.compatible:
        raise AdapterHubError(f"{report.adapter} is not compatible with {report.base}: {report.problems[0]}",
                              hint="see the report above" if not ctx.as_json else "see the JSON report")


@cli.command()
@click.argument("ref")
@click.argument("alias_name", metavar="ALIAS")
@pass_ctx
def alias(ctx: Context, ref: str, alias_name: str) -> None:
    """Point NAME@ALIAS at a version (aliases move)."""
    version = ctx.registry.alias(ref, alias_name)
    ctx.emit(version.to_dict(), f"{version.name}@{alias_name} -> {version.ref}")


@cli.command()
@click.argument("ref")
@click.argument("pair", metavar="KEY=VALUE")
@pass_ctx
def tag(ctx: Context, ref: str, pair: str) -> None:
    """Set a tag on a version."""
    ((key, value),) = _parse_tags((pair,)).items()
    version = ctx.registry.tag(ref, key, value)
    ctx.emit(version.to_dict(), f"{version.ref}: {key}={value}")


@cli.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even when other versions name it as parent.")
@pass_ctx
def rm(ctx: Context, ref: str, force: bool) -> None:
    """Remove a version."""
    version = ctx.registry.remove(ref, force)
    ctx.emit({"removed": version.ref, "sha256": version.sha256}, f"removed {version.ref}")


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--base", "base_", required=True, help="Base model folder or registered base name.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the fused model.")
@click.option("--dequantize", is_flag=True, help="Write a dequantized (float) model from a quantized base.")
@click.option("--no-restore", is_flag=True, help="Keep no restore data (unfuse is then approximate).")
@click.option("--allow-different-weights", is_flag=True, help="Accept a base with other weights of the same structure.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@FORCE_OPTION
@pass_ctx
def fuse(ctx: Context, refs: tuple[str, ...], base_: str, out: Path, dequantize: bool, no_restore: bool,
         allow_different_weights: bool, dry_run: bool, force: bool) -> None:
    """Bake adapters into a base model (streamed; bit-identical to mlx_lm.fuse)."""
    from .algebra.fuse import execute_fuse, plan_fuse

    plan = plan_fuse(ctx.registry, list(refs), base_, out, dequantize, not no_restore, allow_different_weights, force=force)
    if dry_run:
        ctx.emit(plan.to_dict(), plan.describe())
        return
    total = sum(f["size"] for f in plan.base["files"])
    with ctx.progress(f"fusing into {out.name}", total) as advance:
        record = execute_fuse(plan, ctx.registry, advance)
    restore = record["restore"]
    size = sum(f["size"] for f in record["files"])
    ctx.emit(record, "\n".join([
        f"fused {', '.join(a['ref'] for a in record['adapters'])} into {plan.base['name']} -> {out}  ({record['seconds']:.2f} s)",
        f"  sha256  {record['sha256']}",
        f"  restore {restore['size']:,} bytes ({100 * restore['size'] / size:.2f} % of the model), unfuse is exact"
        if restore else "  restore none: unfuse will be approximate",
    ] + [f"  · {n}" for n in plan.notes]))


@cli.command()
@click.argument("fused_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the base model.")
@click.option("--adapter", "adapters", multiple=True, metavar="REF",
              help="Adapters that were fused (for a model fused elsewhere; subtracts them, approximately).")
@click.option("--base", "base_", help="Base to measure the result against (default: the one recorded).")
@FORCE_OPTION
@pass_ctx
def unfuse(ctx: Context, fused_dir: Path, out: Path, adapters: tuple[str, ...], base_: str | None, force: bool) -> None:
    """The base model back from a fused one: exact with restore data, measured without."""
    from .algebra.unfuse import unfuse as run_unfuse

    total = sum(p.stat().st_size for p in fused_dir.glob("*.safetensors"))
    with ctx.progress(f"unfusing into {out.name}", total) as advance:
        report = run_unfuse(ctx.registry, fused_dir, out, list(adapters) or None, base_, advance, force=force)
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


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [FiniteFloat().convert(w.strip(), None, None) for w in text.split(",")]
    except click.BadParameter as e:
        raise click.BadParameter(e.message, param_hint="--weights") from None


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--name", required=True, help="Name of the stacked adapter (becomes its next version).")
@click.option("--weights", help="One weight per adapter, comma-separated (default 1 each).")
@click.option("--method", type=click.Choice(["cat", "linear", "svd"]), default="cat", show_default=True)
@click.option("--rank", type=click.IntRange(min=1), help="Rank of the result (needed by --method svd).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--description")
@pass_ctx
def stack(ctx: Context, refs: tuple[str, ...], name: str, weights: str | None, method: str, rank: int | None,
          tags: tuple[str, ...], description: str | None) -> None:
    """Combine adapters into one that plain mlx-lm loads."""
    from .algebra.stack import stack as run_stack

    version, report = run_stack(ctx.registry, list(refs), name, _floats(weights), method, rank, _parse_tags(tags), description)
    lines = [f"stacked {', '.join(refs)} -> {version.ref}  ({method}, rank {report.rank})"]
    if method == "cat":
        lines.append("  exact: the stacked update is the weighted sum of the sources' updates")
    elif report.per_module:
        label = "energy kept" if method == "svd" else "relative error"
        values = list(report.per_module.values())
        lines.append(f"  {label} per module: min {min(values):.4f}, mean {sum(values) / len(values):.4f}, max {max(values):.4f}")
    ctx.emit(version.to_dict() | {"report": report.to_dict()}, "\n".join(lines + [f"  · {n}" for n in report.notes]))


@cli.command()
@click.option("--base", "base_", required=True, help="Base model folder or registered base name.")
@click.option("--fused", "fused_dir", required=True, type=click.Path(path_type=Path), help="The fused model folder.")
@click.option("--rank", required=True, type=click.IntRange(min=1))
@click.option("--name", required=True)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@pass_ctx
def extract(ctx: Context, base_: str, fused_dir: Path, rank: int, name: str, tags: tuple[str, ...]) -> None:
    """Recover a LoRA from a fused model (truncated SVD of fused - base)."""
    from .algebra.extract import extract as run_extract

    version, report = run_extract(ctx.registry, base_, fused_dir, rank, name, _parse_tags(tags))
    errors = list(report.relative_error.values())
    lines = [f"extracted {version.ref} from {fused_dir}  (rank {report.rank}, {len(errors)} modules)",
             f"  relative error per module: max {max(errors):.2e}, mean {sum(errors) / len(errors):.2e}"]
    if report.not_representable:
        lines.append(f"  · {len(report.not_representable)} changed tensors are not linear layers and were left out: "
                     + ", ".join(report.not_representable[:5]))
    ctx.emit(version.to_dict() | {"report": report.to_dict()}, "\n".join(lines))


@contextmanager
def _training_reporter(ctx: Context, iters: int):
    """A progress bar with loss, tokens/s and ETA on a terminal; plain report lines otherwise; nothing when quiet."""
    if ctx.quiet or ctx.as_json:
        yield lambda event: None
        return
    if not sys.stderr.isatty():
        def line(event: dict) -> None:
            if event["event"] == "train":
                click.echo(f"step {event['step']}/{event['iters']}: train loss {event['train_loss']:.4f}, "
                           f"{event['tokens_per_second']:.0f} tok/s, lr {event['learning_rate']:.2e}", err=True)
            elif event["event"] == "val":
                click.echo(f"step {event['step']}: validation loss {event['val_loss']:.4f}", err=True)
            elif event["event"] == "checkpoint":
                removed = f" (pruned {', '.join(map(str, event['removed']))})" if event["removed"] else ""
                click.echo(f"step {event['step']}: checkpoint saved in {event['seconds']:.3f} s{removed}", err=True)
            elif event["event"] == "resumed":
                click.echo(f"resumed at step {event['step']}", err=True)
            elif event["event"] == "test":
                click.echo(f"test loss {event['test_loss']:.4f}, perplexity {event['test_perplexity']:.2f}", err=True)
        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("train", total=iters, status="")
        last = {"val": ""}

        def update(event: dict) -> None:
            if event["event"] == "val":
                last["val"] = f"val {event['val_loss']:.3f}"
            if event["event"] in ("train", "resumed"):
                status = (f"loss {event['train_loss']:.3f} · {event['tokens_per_second']:.0f} tok/s"
                          if event["event"] == "train" else "")
                bar.update(task, completed=event["step"], status=f"{status} {last['val']}")
        yield update


@cli.command()
@click.option("--base", "base_", help="Base model folder or registered base name.")
@click.option("--data", type=click.Path(path_type=Path), help="Folder with train.jsonl / valid.jsonl / test.jsonl.")
@click.option("--name", help="Adapter name; the result becomes its next version.")
@click.option("--from", "from_ref", help="Continue from this version's weights (chained training).")
@click.option("--kind", type=click.Choice(["lora", "dora", "loreft"]))
@click.option("--rank", type=_train_number("rank"))
@click.option("--scale", type=_train_number("scale"))
@click.option("--dropout", type=_train_number("dropout"))
@click.option("--num-layers", type=_train_number("num_layers"))
@click.option("--iters", type=_train_number("iters"))
@click.option("--batch-size", type=_train_number("batch_size"))
@click.option("--learning-rate", type=_train_number("learning_rate"),
              help="Learning rate (default 1e-5 as in mlx-lm; 4e-3 for --kind loreft, in pyreft's range).")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]))
@click.option("--max-seq-length", type=_train_number("max_seq_length"))
@click.option("--grad-accumulation-steps", type=_train_number("grad_accumulation_steps"))
@click.option("--mask-prompt", is_flag=True, default=None)
@click.option("--seed", type=_train_number("seed"))
@click.option("--val-batches", type=_train_number("val_batches"))
@click.option("--steps-per-eval", type=_train_number("steps_per_eval"))
@click.option("--steps-per-report", type=_train_number("steps_per_report"))
@click.option("--save-every", type=_train_number("save_every"))
@click.option("--keep-last", type=_train_number("keep_last"), help="Keep the newest K checkpoints (default 3).")
@click.option("--keep-best", type=_train_number("keep_best"), help="Keep the best M checkpoints by validation loss (default 1).")
@click.option("--keep-every", type=_train_number("keep_every"), help="Also keep every P-th step.")
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
    """Train a new adapter version with the bundled MLX trainer."""
    from .training import trainer
    from .training.config import merge

    if resume_id:
        record = ctx.registry.run(resume_id)
        with _training_reporter(ctx, record["iters"]) as report:
            version = trainer.resume(ctx.registry, resume_id, report)
    else:
        cli_options = dict(options, base=base_, data=str(data) if data else None, tags=_parse_tags(tags) or None)
        config = merge(cli_options, config_file)
        with _training_reporter(ctx, config.iters) as report:
            version = trainer.train(ctx.registry, config, report)
    losses = version.record["training"]["losses"]
    val = losses.get("val") or []
    change = f", validation loss {val[0][1]:.4f} -> {val[-1][1]:.4f}" if len(val) > 1 else ""
    ctx.emit(version.to_dict(), f"trained {version.ref}  {version.sha256[:12]}  (run {version.record['training']['run_id']}{change})")


@cli.command()
@click.option("--status", type=click.Choice(["running", "interrupted", "finished", "failed"]))
@pass_ctx
def runs(ctx: Context, status: str | None) -> None:
    """Training runs: id, name, status, step, iters, started."""
    found = ctx.registry.runs(status)
    header = f"{'ID':<44} {'NAME':<24} {'STATUS':<12} {'STEP':>6} {'ITERS':>6}  STARTED"
    ctx.emit(found, "\n".join([header] + [f"{r['id']:<44} {r['name']:<24} {r['status']:<12} {r['step']:>6} {r['iters']:>6}  "
                                          f"{r['started_at']}" for r in found]) if found else "no training runs")


@cli.group("checkpoints")
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
    from .training import checkpoints

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
@click.option("--keep-last", type=click.IntRange(min=0))
@click.option("--keep-best", type=click.IntRange(min=0))
@click.option("--keep-every", type=click.IntRange(min=0))
@pass_ctx
def checkpoints_prune(ctx: Context, run_id: str, keep_last: int | None, keep_best: int | None, keep_every: int | None) -> None:
    """Delete the checkpoints a retention policy does not keep (the run's own policy by default)."""
    from .training import checkpoints

    record, folder = _run_dir(ctx, run_id)
    config = record["config"]
    removed = checkpoints.prune(folder, config["keep_last"] if keep_last is None else keep_last,
                                config["keep_best"] if keep_best is None else keep_best,
                                config.get("keep_every") if keep_every is None else keep_every)
    ctx.emit({"removed": removed}, f"removed {len(removed)} checkpoint(s)" + (f": {', '.join(map(str, removed))}" if removed else ""))


@checkpoints_group.command("promote")
@click.argument("run_id")
@click.argument("step", type=click.IntRange(min=1))
@click.option("--name", required=True)
@pass_ctx
def checkpoints_promote(ctx: Context, run_id: str, step: int, name: str) -> None:
    """Register one checkpoint as a version."""
    import tempfile

    from .training import checkpoints
    from .training.config import TrainConfig

    record, folder = _run_dir(ctx, run_id)
    checkpoint = checkpoints.find(folder, step)
    config = TrainConfig(**record["config"])
    with tempfile.TemporaryDirectory(prefix="adapterhub-promote-") as tmp:
        written = folder / "adapter_config.json"  # resolved at the run's start (LoReFT's layers, hidden size)
        (Path(tmp) / "adapter_config.json").write_text(written.read_text() if written.is_file()
                                                       else json.dumps(config.adapter_config()))
        version, _ = ctx.registry.import_adapter(
            Path(tmp), name, base=config.base, dataset=config.data, checkpoint=str(checkpoint.path), tags=config.tags,
            parent=config.from_ref, description=f"step {step} of run {run_id}")
    ctx.emit(version.to_dict(), f"promoted step {step} of {run_id} -> {version.ref}")


@cli.command()
@click.argument("ref")
@click.option("--base", "base_", help="Base model folder or registered base name (default: the adapter's own base).")
@click.option("--prompt", required=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--allow-different-weights", is_flag=True)
@pass_ctx
def generate(ctx: Context, ref: str, base_: str | None, prompt: str, max_tokens: int, allow_different_weights: bool) -> None:
    """Generate with a registered adapter applied (after the compatibility check)."""
    from .generation import generate as run_generate

    result = run_generate(ctx.registry, ref, base_, prompt, max_tokens, allow_different_weights)
    ctx.emit(result, result["text"])


@cli.command()
@click.argument("ref")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created when missing; default main).")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded, and upload nothing.")
@pass_ctx
def push(ctx: Context, ref: str, repo_id: str, private: bool, revision: str | None, dry_run: bool) -> None:
    """Upload a version to the Hugging Face Hub: weights, config, model card and adapterhub.json (HF_TOKEN)."""
    from .hub import push as hub_push

    result = hub_push(ctx.registry, ref, repo_id, private, revision, dry_run)
    verb = "would push" if dry_run else "pushed"
    ctx.emit(result, f"{verb} {result['ref']} to {repo_id}@{result['revision']}: {', '.join(result['files'])}"
             + (f"\n  {result['url']}" if result["url"] else ""))


@cli.command()
@click.argument("repo_id")
@click.option("--name", required=True, help="Adapter name; the pull becomes its next version.")
@click.option("--revision", help="Branch, tag or commit (default main).")
@click.option("--base", "base_", help="Base model folder, registered name or Hub repo id (default: from the repo's records).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@pass_ctx
def pull(ctx: Context, repo_id: str, name: str, revision: str | None, base_: str | None, tags: tuple[str, ...]) -> None:
    """Download an adapter from the Hugging Face Hub (or its local cache) and register it."""
    from .hub import pull as hub_pull

    version, created, commit = hub_pull(ctx.registry, repo_id, name, revision, base_, _parse_tags(tags))
    ctx.emit({**version.to_dict(), "created": created, "commit": commit},
             f"{'pulled' if created else 'already registered:'} {version.ref}  {version.sha256[:12]}  from {repo_id}@{commit[:12]}")


@cli.command()
@click.argument("target", metavar="REF|DIR")
@click.option("--out", type=click.Path(path_type=Path), help="Write the card to this file instead of stdout.")
@FORCE_OPTION
@pass_ctx
def card(ctx: Context, target: str, out: Path | None, force: bool) -> None:
    """A Hugging Face model card for a version, or for a fused model folder."""
    from .card import card as make_card
    from .store import write_output_file

    text = make_card(ctx.registry, target)
    if out:
        folder = Path(target)
        write_output_file(out, text, (*ctx.registry.protected_paths(), *((folder,) if folder.is_dir() else ())), force)
        ctx.emit({"target": target, "out": str(out)}, f"wrote {out}")
    else:
        click.echo(text, nl=False)


@cli.command()
@click.argument("target", required=False, metavar="REF|DIR")
@click.option("--format", "fmt", type=click.Choice(["tree", "json", "dot", "mermaid"]), default="tree", show_default=True)
@click.option("--descendants", is_flag=True, help="Walk the other way: everything that came from it.")
@click.option("--dataset", metavar="DIR|NAME|SHA", help="Start from a dataset (with --descendants: what was trained on it).")
@pass_ctx
def lineage(ctx: Context, target: str | None, fmt: str, descendants: bool, dataset: str | None) -> None:
    """The graph from a version, fused model folder or checkpoint back to its bases and datasets."""
    from . import lineage as graph

    if bool(target) == bool(dataset):
        raise click.UsageError("give either REF|DIR or --dataset")
    if dataset and not descendants:
        raise click.UsageError("--dataset needs --descendants (a dataset has no ancestors)")
    found = graph.descendants(ctx.registry, target, dataset) if descendants else graph.ancestors(ctx.registry, target)
    if ctx.as_json:
        fmt = "json"
    click.echo(graph.render(found, fmt))


@cli.command()
@click.argument("target", metavar="REF|DIR")
@pass_ctx
def audit(ctx: Context, target: str) -> None:
    """Re-hash every file along the lineage; exit 1 if anything changed."""
    from .audit import audit as run_audit

    report = run_audit(ctx.registry, target)
    counts = ", ".join(f"{n} {status}" for status, n in report.counts().items() if n)
    lines = [f"{'ok' if report.ok else 'FAILED'}: {report.lineage.nodes[report.lineage.root].title} ({counts})"]
    for f in report.findings:
        lines.append(f"  {f.status:<9} {f.node.title}")
        lines += [f"            {d}" for d in f.details]
    ctx.emit(report.to_dict(), "\n".join(lines))
    if not report.ok:
        changed = [f.node.label for f in report.findings if f.status == "changed"]
        raise AdapterHubError(f"{len(changed)} node(s) in the lineage changed since they were recorded: {', '.join(changed)}",
                              hint="restore the changed files from a trusted copy, or re-register what they now are")


@cli.command()
@click.option("--repair", is_flag=True,
              help="First remove what interrupted writes left: orphan blobs, temporary files, staging folders, stale index rows.")
@pass_ctx
def verify(ctx: Context, repair: bool) -> None:
    """Check the whole registry: records, blobs, references, lineage. Exit 1 on any problem."""
    repaired = ctx.registry.repair() if repair else None
    if repaired and not ctx.as_json:
        removed = [f"{len(items)} {kind}" for kind, items in repaired.removed.items()]
        ctx.emit(None, f"repaired: removed {', '.join(removed)}" if removed else "repaired: nothing to remove")
    report = ctx.registry.verify()
    counts = ", ".join(f"{n} {k}" for k, n in report.checked.items())
    ctx.emit(report.to_dict() | ({"repaired": repaired.to_dict()} if repaired else {}), "\n".join(
        [f"{'ok' if report.ok else 'FAILED'}: {ctx.registry.root} ({counts or 'nothing checked'})"]
        + [f"  ✗ {p}" for p in report.problems] + [f"  · {n}" for n in report.notes]))
    if not report.ok:
        raise AdapterHubError(f"the registry at {ctx.registry.root} has {len(report.problems)} problem(s)",
                              hint="see the report above; restore the damaged files or remove the broken versions")


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-work"), show_default=True,
              help="Where the tiny model, data and adapters are built.")
@pass_ctx
def demo(ctx: Context, workdir: Path) -> None:
    """Run the whole lifecycle on a tiny local model."""
    from .demo import run_demo

    run_demo(ctx.registry.root, workdir, quiet=ctx.quiet)


_accept_global_options_after_commands(cli)


def _mlx_backend_missing(error: ImportError) -> bool:
    """On Linux the backend is an extra (mlx-cpu, mlx-cuda-12/13); without one, `import mlx.core` cannot find libmlx."""
    return "libmlx" in str(error) or (error.name or "").partition(".")[0] in ("mlx", "mlx_metal", "mlx_cuda")


def main() -> None:
    """Entry point: one-line errors and exit 1 for mistakes, tracebacks only with ADAPTERHUB_DEBUG=1."""
    debug = os.environ.get("ADAPTERHUB_DEBUG") == "1"
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except AdapterHubError as e:
        if debug:
            raise
        click.echo(f"error: {printable(str(e))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except ImportError as e:
        if debug or not _mlx_backend_missing(e):
            raise
        click.echo(f"error: MLX cannot load its backend here ({printable(str(e))}) — install one: "
                   f"pip install 'adapterhub[cpu]', or 'adapterhub[cuda12]' / 'adapterhub[cuda13]' for an NVIDIA GPU", err=True)
        sys.exit(1)
    except OSError as e:
        if debug:
            raise
        click.echo(f"error: {printable(str(e.strerror or e))}{': ' + printable(str(e.filename)) if e.filename else ''} — check the path and permissions", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the last line of defence for a user-facing tool
        if debug:
            raise
        click.echo(f"error: unexpected {type(e).__name__}: {printable(str(e))} — rerun with ADAPTERHUB_DEBUG=1 and report it", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
