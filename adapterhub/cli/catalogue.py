"""The catalogue: init, base add/list/show, import, list, show, check, alias, tag, rm, verify."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..bases import local_folder
from ..errors import AdapterHubError
from ..records import AdapterVersion, EvalResult, unapplied
from ..registry import Registry
from ..naming import split_remote_ref
from .context import Context, parse_tags, pass_ctx


def _version_line(v: AdapterVersion, prefix: str = "") -> str:
    base = v.base.name if v.base else "-"
    aliases = ",".join(v.aliases) or "-"
    tags = ",".join(f"{k}={val}" for k, val in sorted(v.tags.items())) or "-"
    return f"{prefix + v.ref:<32} {v.kind:<6} {v.rank:>4}  {base:<24} {aliases:<12} {tags:<20} {v.record['created_at']}"


def _show_text(v: AdapterVersion, evaluations: list[dict] = ()) -> str:
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
    newest = {}
    for result in map(EvalResult.from_dict, evaluations):
        newest[result.key] = result  # a measurement repeated with --force shows its latest value
    for result in newest.values():
        lines.append(f"  eval       {result.summary()}, base {result.row['base']['name']}, {result.row['created_at']}")
    if r.get("description"):
        lines.append(f"  about      {r['description']}")
    source = r.get("source") or {}
    if source.get("remote"):
        lines.append(f"  pulled     from {source['ref']} ({source['path']}) at {source.get('pulled_at', '?')}")
    lines.append(f"  created    {r['created_at']}")
    return "\n".join(lines)


def _base_dict(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "tensors"} | {"num_tensors": len(record["tensors"])}


@click.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@pass_ctx
def init(ctx: Context, path: Path | None) -> None:
    """Create a registry (at PATH, else the --registry / default one)."""
    registry = Registry(path) if path else ctx.registry
    created = registry.init()
    ctx.emit({"path": str(registry.root), "created": created},
             f"{'created' if created else 'already a registry:'} {registry.root}")


@click.group()
def base() -> None:
    """Register and inspect base models."""


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


@click.command("import")
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
                                                   parse_tags(tags), description, checkpoint)
    ignored = unapplied(version, created, parse_tags(tags), description)
    ctx.emit(version.to_dict() | {"created": created, "not_applied": ignored},
             f"{'imported' if created else 'already registered:'} {version.ref}  {version.sha256[:12]}  "
             f"({version.kind}, rank {version.rank}, {len(version.layers)} layers)")
    if ignored and not ctx.quiet:
        how = [f"adapterhub tag {version.ref} {k}={v}" for k, v in ignored.get("tags", {}).items()]
        click.echo(f"note: {', '.join(ignored)} not applied: {version.ref} already holds these weights"
                   + (f" — run {'; '.join(how)}" if how else " — a version's description is fixed when it is created"),
                   err=True)


def _check_sort(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from ..evaluation import parse_sort  # only when sorting: a plain `list` stays off evaluation's imports

        try:
            parse_sort(value)
        except AdapterHubError as e:
            raise click.BadParameter(str(e), param_hint="--sort") from None
    return value


@click.command("list")
@click.option("--base", "base_", help="Only versions on this base (name or sha256).")
@click.option("--kind", type=click.Choice(["lora", "dora", "loreft"]))
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--name", "name_glob", metavar="GLOB", help="Only names matching this glob.")
@click.option("--sort", "sort_key", metavar="FIELD|eval:METRIC", callback=_check_sort,
              help="Order by a field (name, created_at, rank, ...; -FIELD reverses) or by a recorded score, best "
                   "first (eval:test_loss, eval:test_exact_match, ...).")
@click.option("--remote", "remote_name", metavar="REMOTE", help="List a remote registry instead (see 'adapterhub remote').")
@pass_ctx
def list_(ctx: Context, base_: str | None, kind: str | None, tags: tuple[str, ...], name_glob: str | None,
          sort_key: str | None, remote_name: str | None) -> None:
    """List adapter versions."""
    header = f"{'REF':<32} {'KIND':<6} {'RANK':>4}  {'BASE':<24} {'ALIASES':<12} {'TAGS':<20} CREATED"
    if remote_name:
        _list_remote(ctx, remote_name, base_, kind, parse_tags(tags), name_glob, sort_key, header)
        return
    versions = ctx.registry.list(base_, kind, parse_tags(tags), name_glob)
    if not sort_key:
        ctx.emit([v.to_dict() for v in versions],
                 lambda: "\n".join([header] + [_version_line(v) for v in versions]) if versions else "no adapters match")
        return
    from ..evaluation import sort_versions

    ordered = sort_versions(ctx.registry, versions, sort_key)
    score = sort_key.lstrip("-").removeprefix("eval:") if "eval:" in sort_key else None
    if score is None:
        ctx.emit([v.to_dict() for v, _ in ordered],
                 "\n".join([header] + [_version_line(v) for v, _ in ordered]) if ordered else "no adapters match")
        return
    share, width = score.endswith(("exact_match", "token_accuracy")), max(12, len(score))

    def shown(r: EvalResult | None) -> str:
        return "-" if r is None else f"{100 * r.scores[score]:.1f} %" if share else f"{r.scores[score]:.4f}"

    ctx.emit([v.to_dict() | {"sorted_by": {"score": score, "value": r.scores[score] if r else None,
                                           "dataset": r.row["dataset"] if r else None}} for v, r in ordered],
             "\n".join([f"{score.upper():>{width}}  {'DATASET':<16} " + header]
                        + [f"{shown(r):>{width}}  {(r.row['dataset']['name'] if r else '-'):<16} " + _version_line(v)
                           for v, r in ordered]) if ordered else "no adapters match")
    datasets = {r.row["dataset"]["sha256"]: r.row["dataset"]["name"] for _, r in ordered if r}
    if len(datasets) > 1 and not ctx.quiet and not ctx.as_json:
        click.echo(f"note: {score} comes from {len(datasets)} datasets ({', '.join(sorted(datasets.values()))}); scores on "
                   f"different data do not rank — run 'adapterhub compare REF... --data DIR'", err=True)


def _list_remote(ctx: Context, name: str, base: str | None, kind: str | None, tags: dict, name_glob: str | None,
                 sort_key: str | None, header: str) -> None:
    from ..remote.catalogue import RemoteRegistry

    remote = RemoteRegistry.open(ctx.registry, name)
    listed = remote.list(base, kind, tags, name_glob)
    if sort_key and "eval:" in sort_key:
        raise AdapterHubError(f"--sort {sort_key} needs evaluations, which remotes do not share",
                              hint="sort by a field, or pull the versions and sort them here")
    if ctx.as_json or sort_key:
        from ..evaluation import sort_versions

        versions = remote.views(listed)
        versions = [v for v, _ in sort_versions(None, versions, sort_key)] if sort_key else versions
        ctx.emit([v.to_dict() | {"remote": name} for v in versions],
                 "\n".join([header] + [_version_line(v, f"{name}:") for v in versions]) if versions else "no adapters match")
        return
    ctx.emit(None, "\n".join([header] + [_listed_line(item, f"{name}:") for item in listed]) if listed else "no adapters match")


def _listed_line(item, prefix: str) -> str:
    s = item.entry["summary"]
    aliases = ",".join(item.aliases) or "-"
    tags = ",".join(f"{k}={val}" for k, val in sorted(item.entry["tags"].items())) or "-"
    return (f"{prefix + item.ref:<32} {s['kind']:<6} {s['rank']:>4}  {(s['base'] or {}).get('name', '-'):<24} "
            f"{aliases:<12} {tags:<20} {s['created_at']}")


@click.command()
@click.argument("ref", metavar="REF|REMOTE:REF")
@pass_ctx
def show(ctx: Context, ref: str) -> None:
    """Show one adapter version, here or in a remote."""
    remote_ref = split_remote_ref(ref)
    if remote_ref:
        from ..remote.catalogue import RemoteRegistry

        found = RemoteRegistry.open(ctx.registry, remote_ref[0]).resolve(remote_ref[1])
        pushed = f"\n  pushed     by {found.entry['pushed_by']} at {found.entry['pushed_at']}"
        ctx.emit(found.view.to_dict() | {"remote": found.remote, "remote_ref": found.remote_ref, "record": found.entry["record"],
                                         "pushed_at": found.entry["pushed_at"], "pushed_by": found.entry["pushed_by"]},
                 f"{found.remote}:" + _show_text(found.view) + pushed)
        return
    version = ctx.registry.resolve(ref)
    evaluations = ctx.registry.evaluations(version)
    ctx.emit(version.to_dict() | {"evaluations": evaluations}, _show_text(version, evaluations))


@click.command()
@click.argument("ref")
@click.option("--base", "base_", required=True, help="Base model folder or registered base name.")
@click.option("--allow-different-weights", is_flag=True, help="Accept the same structure with other weights.")
@pass_ctx
def check(ctx: Context, ref: str, base_: str, allow_different_weights: bool) -> None:
    """Check that an adapter fits a base model; exit 1 when it does not."""
    report = ctx.registry.check(ref, base_, allow_different_weights)
    needed = _base_needed(ctx.registry, ctx.registry.resolve(ref))
    ctx.emit(report.to_dict() | {"needs_base": needed}, report.summary())
    where = "see the report above" if not ctx.as_json else "see the JSON report"
    line = None
    if needed:
        line = (f"{report.adapter} needs base {needed['name']}" + (f" (Hub {needed['hf_repo']})" if needed["hf_repo"] else "")
                + f", sha256 {needed['sha256']}, which is not on this machine")
    if not report.compatible:
        raise AdapterHubError(f"{report.adapter} is not compatible with {report.base}: {report.problems[0]}",
                              hint=f"{line}; add it with 'adapterhub base add PATH'" if line else where)
    if line and not ctx.quiet:
        click.echo(f"note: {line} — add it with 'adapterhub base add PATH' to fuse or generate", err=True)


def _base_needed(registry: Registry, version: AdapterVersion) -> dict | None:
    """The base a version was trained on, when its weights are not on this machine (a pulled version's, say)."""
    base = version.record.get("base")
    if not base:
        return None
    row = registry.bases_by_sha().get(base["sha256"])
    if local_folder(row):
        return None
    return {"name": base["name"], "sha256": base["sha256"], "hf_repo": (row or {}).get("hf_repo")}


@click.command()
@click.argument("ref", metavar="REF|REMOTE:REF")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--expect", metavar="OLD_REF", help="On a remote: move it only if it points at OLD_REF now (a version, "
                                                   "NAME@N, or 'none'); a concurrent move is then a conflict.")
@pass_ctx
def alias(ctx: Context, ref: str, alias_name: str, expect: str | None) -> None:
    """Point NAME@ALIAS at a version (aliases move); on a remote, by compare-and-swap."""
    remote_ref = split_remote_ref(ref)
    if remote_ref:
        from ..remote.catalogue import RemoteRegistry

        found = RemoteRegistry.open(ctx.registry, remote_ref[0]).alias(remote_ref[1], alias_name, expect)
        ctx.emit(found.view.to_dict() | {"remote": found.remote},
                 f"{found.remote}:{found.name}@{alias_name} -> {found.remote_ref}")
        return
    if expect is not None:
        raise click.UsageError("--expect applies to a remote alias (REMOTE:REF); a local alias moves under the registry lock")
    version = ctx.registry.alias(ref, alias_name)
    ctx.emit(version.to_dict(), f"{version.name}@{alias_name} -> {version.ref}")


@click.command()
@click.argument("ref", metavar="REF|REMOTE:REF")
@click.argument("pair", metavar="KEY=VALUE")
@pass_ctx
def tag(ctx: Context, ref: str, pair: str) -> None:
    """Set a tag on a version, here or in a remote."""
    ((key, value),) = parse_tags((pair,)).items()
    remote_ref = split_remote_ref(ref)
    if remote_ref:
        from ..remote.catalogue import RemoteRegistry

        found = RemoteRegistry.open(ctx.registry, remote_ref[0]).tag(remote_ref[1], key, value)
        ctx.emit(found.view.to_dict() | {"remote": found.remote}, f"{found.remote_ref}: {key}={value}")
        return
    version = ctx.registry.tag(ref, key, value)
    ctx.emit(version.to_dict(), f"{version.ref}: {key}={value}")


@click.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even when other versions name it as parent.")
@pass_ctx
def rm(ctx: Context, ref: str, force: bool) -> None:
    """Remove a version."""
    version = ctx.registry.remove(ref, force)
    ctx.emit({"removed": version.ref, "sha256": version.sha256}, f"removed {version.ref}")


@click.command()
@click.option("--repair", is_flag=True,
              help="First remove what interrupted writes left: orphan blobs, temporary files, staging folders, stale index rows.")
@click.option("--remote", "remote_name", metavar="REMOTE", help="Verify a remote registry instead: every refs document, "
                                                               "record, fingerprint and blob re-checked.")
@click.option("--grace", default="24h", show_default=True, metavar="DURATION",
              help="With --remote --repair: only remove leftovers older than this (a younger one may be a push in flight).")
@pass_ctx
def verify(ctx: Context, repair: bool, remote_name: str | None, grace: str) -> None:
    """Check the whole registry: records, blobs, references, lineage. Exit 1 on any problem."""
    if remote_name:
        _verify_remote(ctx, remote_name, repair, grace)
        return
    repaired = ctx.registry.repair() if repair else None
    _show_verified(ctx, ctx.registry.verify(), repaired, str(ctx.registry.root), "nothing to remove",
                   f"the registry at {ctx.registry.root}",
                   "see the report above; restore the damaged files or remove the broken versions")


def _verify_remote(ctx: Context, name: str, repair: bool, grace: str) -> None:
    from ..remote.catalogue import RemoteRegistry
    from ..remote.verify import parse_duration, repair as repair_remote, verify as verify_remote

    grace_s = parse_duration(grace)
    remote = RemoteRegistry.open(ctx.registry, name)
    repaired = repair_remote(remote, grace_s) if repair else None
    report = verify_remote(remote)
    _show_verified(ctx, report, repaired, f"remote {name} {remote.where()}", f"nothing older than {grace} to remove",
                   f"remote '{name}'", "see the report above; push the damaged versions again from a registry that has them",
                   first_problem=True)


def _show_verified(ctx: Context, report, repaired, where: str, nothing_removed: str, subject: str, hint: str,
                   first_problem: bool = False) -> None:
    """What verify found (after what repair removed), the same for a local registry and a remote; exit 1 on a problem."""
    if repaired and not ctx.as_json:
        removed = [f"{len(items)} {kind}" for kind, items in repaired.removed.items()]
        ctx.emit(None, f"repaired: removed {', '.join(removed)}" if removed else f"repaired: {nothing_removed}")
    counts = ", ".join(f"{n} {k}" for k, n in report.checked.items())
    ctx.emit(report.to_dict() | ({"repaired": repaired.to_dict()} if repaired else {}), "\n".join(
        [f"{'ok' if report.ok else 'FAILED'}: {where} ({counts or 'nothing checked'})"]
        + [f"  ✗ {p}" for p in report.problems] + [f"  · {n}" for n in report.notes]))
    if not report.ok:
        first = f": {report.problems[0]}" if first_problem else ""
        raise AdapterHubError(f"{subject} has {len(report.problems)} problem(s){first}", hint=hint)


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-work"), show_default=True,
              help="Where the tiny model, data and adapters are built.")
@pass_ctx
def demo(ctx: Context, workdir: Path) -> None:
    """Run the whole lifecycle on a tiny local model."""
    from ..demo import run_demo

    run_demo(ctx.registry.root, workdir, quiet=ctx.quiet)


COMMANDS = [init, base, import_, list_, show, check, alias, tag, rm, verify, demo]
