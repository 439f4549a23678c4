"""Moving versions in and out, and looking back along them: export, card, push, pull, lineage, audit."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdapterHubError
from ..naming import is_remote_name, split_remote_ref
from .context import FORCE_OPTION, Context, parse_tags, pass_ctx


@click.command()
@click.argument("ref")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "format_", type=click.Choice(["mlx", "peft"]), default="mlx", show_default=True)
@FORCE_OPTION
@pass_ctx
def export(ctx: Context, ref: str, out: Path, format_: str, force: bool) -> None:
    """Write an adapter folder that mlx_lm (or PEFT) loads as is, with its model card."""
    from ..export import export as write_export

    files = write_export(ctx.registry, ref, out, format_, force=force)
    ctx.emit({"ref": ref, "out": str(out), "files": [str(f) for f in files]}, f"exported {ref} to {out}")


@click.command()
@click.argument("target", metavar="REF|DIR")
@click.option("--out", type=click.Path(path_type=Path), help="Write the card to this file instead of stdout.")
@FORCE_OPTION
@pass_ctx
def card(ctx: Context, target: str, out: Path | None, force: bool) -> None:
    """A Hugging Face model card for a version, or for a fused model folder."""
    from ..card import card as make_card
    from ..files import write_output_file

    text = make_card(ctx.registry, target)
    if out:
        folder = Path(target)
        write_output_file(out, text, (*ctx.registry.protected_paths(), *((folder,) if folder.is_dir() else ())), force)
        ctx.emit({"target": target, "out": str(out)}, f"wrote {out}")
    else:
        click.echo(text, nl=False)


@click.command()
@click.argument("ref")
@click.argument("repo_id", metavar="REPO_ID|REMOTE")
@click.option("--private", is_flag=True, help="Hub: create the repo as private.")
@click.option("--revision", help="Hub: branch to push to (created when missing; default main).")
@click.option("--with-base", is_flag=True, help="Remote: also upload the base model's weights (else only its fingerprint).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, and upload nothing.")
@pass_ctx
def push(ctx: Context, ref: str, repo_id: str, private: bool, revision: str | None, with_base: bool, dry_run: bool) -> None:
    """Upload a version to the Hugging Face Hub (OWNER/NAME, HF_TOKEN) or to a remote registry (REMOTE), with its lineage.

    To a remote, the versions it came from go too when the remote lacks them, and blobs it
    already holds are skipped; the remote numbers the version. See 'adapterhub remote'.
    """
    from ..hub import push as hub_push

    if is_remote_name(repo_id):
        _push_remote(ctx, ref, repo_id, with_base, dry_run, private or revision)
        return
    if with_base:
        raise click.UsageError("--with-base applies to a push to a remote registry, not to the Hub")

    result = hub_push(ctx.registry, ref, repo_id, private, revision, dry_run)
    verb = "would push" if dry_run else "pushed"
    ctx.emit(result, f"{verb} {result['ref']} to {repo_id}@{result['revision']}: {', '.join(result['files'])}"
             + (f"\n  {result['url']}" if result["url"] else ""))


def _push_remote(ctx: Context, ref: str, name: str, with_base: bool, dry_run: bool, hub_options: object) -> None:
    from ..remote.catalogue import RemoteRegistry
    from ..remote.push import plan, push as remote_push

    if hub_options:
        raise click.UsageError("--private and --revision apply to a push to the Hub (OWNER/NAME), not to a remote")
    remote = RemoteRegistry.open(ctx.registry, name)
    if dry_run:
        result = plan(ctx.registry, remote, ref, with_base)
        ctx.emit(result, "\n".join([f"would push {result['ref']} to {name} ({result['url']}): {result['bytes']:,} bytes"]
                                    + [f"  {s['ref']:<32} {_planned(s)}" for s in result["versions"]]))
        return
    result = remote_push(ctx.registry, ref, remote, with_base, ctx.progress)
    lines = [f"pushed {result['ref']} to {result['remote_ref']} ({result['uploaded']['blobs']} blob(s), "
             f"{result['uploaded']['bytes']:,} bytes sent)"]
    lines += [f"  {s['ref']:<32} {'new' if s['created'] else 'already there'}: {s['remote_ref']}" for s in result["versions"]]
    ctx.emit(result, "\n".join(lines))


def _planned(step: dict) -> str:
    if step["remote_ref"]:
        return f"already there as {step['remote_ref']}" + (f"; {len(step['base_files'])} base file(s)"
                                                          if step["base_files"] else "")
    return f"{len(step['blobs'])} blob(s)" + (f" + {len(step['base_files'])} base file(s)" if step["base_files"] else "")


@click.command()
@click.argument("repo_id", metavar="REPO_ID|REMOTE:REF")
@click.option("--name", help="Adapter name; the pull becomes its next version (default for a remote: its name there).")
@click.option("--revision", help="Hub: branch, tag or commit (default main).")
@click.option("--base", "base_", help="Base model folder, registered name or Hub repo id (default: from the records).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Hub: tag the new version (repeatable).")
@pass_ctx
def pull(ctx: Context, repo_id: str, name: str | None, revision: str | None, base_: str | None, tags: tuple[str, ...]) -> None:
    """Download an adapter from the Hugging Face Hub (or its local cache), or from a remote registry with its lineage,
    every hash checked before anything is registered."""
    from ..hub import pull as hub_pull

    remote_ref = split_remote_ref(repo_id)
    if remote_ref:
        if revision or tags:
            raise click.UsageError("--revision and --tag apply to a pull from the Hub; tags come with a remote version")
        _pull_remote(ctx, remote_ref, name, base_)
        return
    if not name:
        raise click.UsageError("Missing option '--name' (a pull from the Hub needs the name to register it under)")

    version, created, commit = hub_pull(ctx.registry, repo_id, name, revision, base_, parse_tags(tags))
    ctx.emit({**version.to_dict(), "created": created, "commit": commit},
             f"{'pulled' if created else 'already registered:'} {version.ref}  {version.sha256[:12]}  from {repo_id}@{commit[:12]}")


def _pull_remote(ctx: Context, remote_ref: tuple[str, str], name: str | None, base: str | None) -> None:
    from ..remote.catalogue import RemoteRegistry
    from ..remote.pull import pull as remote_pull

    remote = RemoteRegistry.open(ctx.registry, remote_ref[0])
    result = remote_pull(ctx.registry, remote, remote_ref[1], name, base, ctx.progress)
    version = ctx.registry.resolve(result["local_ref"])
    ctx.emit(version.to_dict() | {"created": result["created"], "pulled": result},
             "\n".join([f"{'pulled' if result['created'] else 'already registered:'} {result['local_ref']}  "
                        f"{result['sha256'][:12]}  from {result['ref']}"]
                       + [f"  {s['ref']:<32} {'new' if s['created'] else 'already here'}: {s['local_ref']}"
                          for s in result["versions"]]))
    b = result["base"]
    if b and not b["local"] and not ctx.quiet:
        click.echo(f"note: its base {b['name']} (sha256 {b['sha256'][:12]}"
                   + (f", Hub {b['hf_repo']}" if b["hf_repo"] else "") + ") is not on this machine; its fingerprint was "
                   "registered — add the model with 'adapterhub base add PATH' to fuse or generate", err=True)


def _remote_target(target: str | None) -> tuple[str, str] | None:
    """REMOTE:REF, unless an existing path happens to contain a colon."""
    if target is None or Path(target).expanduser().exists():
        return None
    return split_remote_ref(target)


@click.command()
@click.argument("target", required=False, metavar="REF|DIR|REMOTE:REF")
@click.option("--format", "fmt", type=click.Choice(["tree", "json", "dot", "mermaid"]), default="tree", show_default=True)
@click.option("--descendants", is_flag=True, help="Walk the other way: everything that came from it.")
@click.option("--dataset", metavar="DIR|NAME|SHA", help="Start from a dataset (with --descendants: what was trained on it).")
@pass_ctx
def lineage(ctx: Context, target: str | None, fmt: str, descendants: bool, dataset: str | None) -> None:
    """The graph from a version, fused model folder or checkpoint back to its bases and datasets."""
    from .. import lineage as graph

    if bool(target) == bool(dataset):
        raise click.UsageError("give either REF|DIR or --dataset")
    if dataset and not descendants:
        raise click.UsageError("--dataset needs --descendants (a dataset has no ancestors)")
    remote_ref = _remote_target(target)
    if remote_ref:
        from ..remote.catalogue import RemoteRegistry
        from ..remote.lineage import ancestors

        if descendants:
            raise click.UsageError("--descendants walks this registry; pull the version first")
        click.echo(graph.render(ancestors(RemoteRegistry.open(ctx.registry, remote_ref[0]), remote_ref[1]),
                                "json" if ctx.as_json else fmt))
        return
    found = graph.descendants(ctx.registry, target, dataset) if descendants else graph.ancestors(ctx.registry, target)
    if ctx.as_json:
        fmt = "json"
    click.echo(graph.render(found, fmt))


@click.command()
@click.argument("target", metavar="REF|DIR|REMOTE:REF")
@pass_ctx
def audit(ctx: Context, target: str) -> None:
    """Re-hash every file along the lineage (for a remote version, every remote object); exit 1 if anything changed."""
    from ..audit import audit as run_audit

    remote_ref = _remote_target(target)
    if remote_ref:
        from ..remote.catalogue import RemoteRegistry
        from ..remote.lineage import audit as audit_remote

        report = audit_remote(RemoteRegistry.open(ctx.registry, remote_ref[0]), remote_ref[1])
    else:
        report = run_audit(ctx.registry, target)
    counts = ", ".join(f"{n} {status}" for status, n in report.counts().items() if n)
    lines = [f"{'ok' if report.ok else 'FAILED'}: {report.lineage.nodes[report.lineage.root].title} ({counts})"]
    for f in report.findings:
        lines.append(f"  {f.status:<9} {f.node.title}")
        lines += [f"            {d}" for d in f.details]
    ctx.emit(report.to_dict(), "\n".join(lines))
    if not report.ok:
        changed = [f for f in report.findings if f.status == "changed"]
        raise AdapterHubError(f"{len(changed)} node(s) in the lineage changed since they were recorded: "
                              f"{', '.join(f.node.label for f in changed)} ({changed[0].details[0]})",
                              hint="restore the changed files from a trusted copy, or re-register what they now are")


COMMANDS = [export, card, push, pull, lineage, audit]
