"""remote add / list / rm: names for shared registries in S3-compatible buckets.

Commands that use a remote live with their local counterparts (push, pull, list --remote,
show/lineage/audit REMOTE:REF, verify --remote, alias/tag REMOTE:REF); the S3 client is
imported only when one of them connects, so `--help` and local commands never load it.
"""

from __future__ import annotations

import click

from .context import Context, pass_ctx


@click.group()
def remote() -> None:
    """Shared registries in S3-compatible buckets (credentials from the AWS environment and config files)."""


@remote.command("add")
@click.argument("name")
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.option("--endpoint-url", help="An S3-compatible endpoint (MinIO, R2, Ceph, SeaweedFS...); default AWS S3.")
@click.option("--region", help="The bucket's region (default: AWS_REGION, then the AWS config file).")
@pass_ctx
def remote_add(ctx: Context, name: str, url: str, endpoint_url: str | None, region: str | None) -> None:
    """Add a remote: a registry shared through s3://BUCKET/PREFIX. Nothing is sent until a push."""
    from ..remote.config import Remotes

    added = Remotes(ctx.registry).add(name, url, endpoint_url, region)
    ctx.emit(added.to_dict(), f"added remote {added.name}: {added.url}"
             + (f" at {added.endpoint_url}" if added.endpoint_url else ""))


@remote.command("list")
@pass_ctx
def remote_list(ctx: Context) -> None:
    """List the remotes of this registry."""
    from ..remote.config import Remotes

    remotes = Remotes(ctx.registry).all()
    ctx.emit([r.to_dict() for r in remotes], "\n".join(
        f"{r.name:<16} {r.url:<48} {r.endpoint_url or 'AWS S3'}{'  ' + r.region if r.region else ''}" for r in remotes)
        or "no remotes: add one with 'adapterhub remote add NAME s3://BUCKET/PREFIX'")


@remote.command("rm")
@click.argument("name")
@pass_ctx
def remote_rm(ctx: Context, name: str) -> None:
    """Forget a remote (the bucket and what it holds are untouched)."""
    from ..remote.config import Remotes

    removed = Remotes(ctx.registry).remove(name)
    ctx.emit({"removed": removed.name, "url": removed.url}, f"removed remote {removed.name} ({removed.url})")


COMMANDS = [remote]
