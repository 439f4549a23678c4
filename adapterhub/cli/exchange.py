"""Moving versions in and out, and looking back along them: export, card, push, pull, lineage, audit."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdapterHubError
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
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created when missing; default main).")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded, and upload nothing.")
@pass_ctx
def push(ctx: Context, ref: str, repo_id: str, private: bool, revision: str | None, dry_run: bool) -> None:
    """Upload a version to the Hugging Face Hub: weights, config, model card and adapterhub.json (HF_TOKEN)."""
    from ..hub import push as hub_push

    result = hub_push(ctx.registry, ref, repo_id, private, revision, dry_run)
    verb = "would push" if dry_run else "pushed"
    ctx.emit(result, f"{verb} {result['ref']} to {repo_id}@{result['revision']}: {', '.join(result['files'])}"
             + (f"\n  {result['url']}" if result["url"] else ""))


@click.command()
@click.argument("repo_id")
@click.option("--name", required=True, help="Adapter name; the pull becomes its next version.")
@click.option("--revision", help="Branch, tag or commit (default main).")
@click.option("--base", "base_", help="Base model folder, registered name or Hub repo id (default: from the repo's records).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE")
@pass_ctx
def pull(ctx: Context, repo_id: str, name: str, revision: str | None, base_: str | None, tags: tuple[str, ...]) -> None:
    """Download an adapter from the Hugging Face Hub (or its local cache) and register it."""
    from ..hub import pull as hub_pull

    version, created, commit = hub_pull(ctx.registry, repo_id, name, revision, base_, parse_tags(tags))
    ctx.emit({**version.to_dict(), "created": created, "commit": commit},
             f"{'pulled' if created else 'already registered:'} {version.ref}  {version.sha256[:12]}  from {repo_id}@{commit[:12]}")


@click.command()
@click.argument("target", required=False, metavar="REF|DIR")
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
    found = graph.descendants(ctx.registry, target, dataset) if descendants else graph.ancestors(ctx.registry, target)
    if ctx.as_json:
        fmt = "json"
    click.echo(graph.render(found, fmt))


@click.command()
@click.argument("target", metavar="REF|DIR")
@pass_ctx
def audit(ctx: Context, target: str) -> None:
    """Re-hash every file along the lineage; exit 1 if anything changed."""
    from ..audit import audit as run_audit

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


COMMANDS = [export, card, push, pull, lineage, audit]
