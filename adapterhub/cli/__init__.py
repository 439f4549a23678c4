"""The `adapterhub` command: one module per command group, each command one library call plus presentation.

- `context`: the global options, output (`--json`, `--quiet`), progress and option types
- `catalogue`: init, base, import, list, show, check, alias, tag, rm, verify, demo
- `exchange`: export, card, push, pull, lineage, audit
- `algebra`: fuse, unfuse, stack, extract
- `training`: train, runs, checkpoints, generate
- `evaluate`: eval, compare
- `serve`: serve (an OpenAI-compatible API over the registry)
- `ui`: ui (the read-only web page over the registry)
- `remote`: remote add / list / rm (push, pull and the REMOTE:REF forms live with their commands)
- `errors`: exceptions to one line and an exit code

Heavy modules (mlx, mlx_lm, transformers, jsonschema, rich) are imported inside the commands that need
them, so `--help`, `list` and `show` start fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import algebra, catalogue, evaluate, exchange, remote, serve, training, ui
from .context import ENV_REGISTRY, Context, FiniteFloat, accept_global_options_after_commands, registry_path
from .errors import run

__all__ = ["cli", "main", "Context", "FiniteFloat"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", "registry_path", type=click.Path(), default=None, callback=registry_path,
              help=f"Registry folder (else ${ENV_REGISTRY}, else ./registry when it exists, else ~/.adapterhub).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no report lines.")
@click.version_option(package_name="adapterhub")
@click.pass_context
def cli(ctx: click.Context, registry_path: Path | None, as_json: bool, quiet: bool) -> None:
    """Catalogue, check and manage LoRA / DoRA / LoReFT adapters for MLX models."""
    ctx.obj = Context(registry_path, as_json, quiet)


for _module in (catalogue, exchange, algebra, training, evaluate, serve, ui, remote):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
# After every module has registered its commands, so none is left without them.
accept_global_options_after_commands(cli)


def main() -> None:
    """Entry point: one-line errors and exit 1 for mistakes, tracebacks only with ADAPTERHUB_DEBUG=1."""
    run(cli)
