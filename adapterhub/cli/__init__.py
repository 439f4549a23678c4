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

import importlib
from pathlib import Path

import click

from .context import ENV_REGISTRY, Context, FiniteFloat, accept_global_options, registry_path
from .errors import run

__all__ = ["cli", "main", "Context", "FiniteFloat", "COMMAND_MODULES"]

# The module of each command. Only the invoked command's module is imported, so `list` and `show`
# never pay for training's, serving's or remotes' option tables at start-up (tests/test_cli.py checks
# this map against every module's COMMANDS).
COMMAND_MODULES = {
    "catalogue": ("init", "base", "import", "list", "show", "check", "alias", "tag", "rm", "verify", "demo"),
    "exchange": ("export", "card", "push", "pull", "lineage", "audit"),
    "algebra": ("fuse", "unfuse", "stack", "extract"),
    "training": ("train", "runs", "checkpoints", "generate"),
    "evaluate": ("eval", "compare"),
    "serve": ("serve",),
    "ui": ("ui",),
    "remote": ("remote",),
}
_MODULE_OF = {name: module for module, names in COMMAND_MODULES.items() for name in names}


class _LazyGroup(click.Group):
    """A group whose commands are imported from their module when first named (click's documented lazy pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_MODULE_OF))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in _MODULE_OF:
            for command in importlib.import_module(f"{__name__}.{_MODULE_OF[name]}").COMMANDS:
                if command.name not in self.commands:
                    accept_global_options(command)
                    self.add_command(command)
        return self.commands.get(name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", "registry_path", type=click.Path(), default=None, callback=registry_path,
              help=f"Registry folder (else ${ENV_REGISTRY}, else ./registry when it exists, else ~/.adapterhub).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no report lines.")
@click.version_option(package_name="adapterhub")
@click.pass_context
def cli(ctx: click.Context, registry_path: Path | None, as_json: bool, quiet: bool) -> None:
    """Catalogue, check and manage LoRA / DoRA / LoReFT adapters for MLX models."""
    ctx.obj = Context(registry_path, as_json, quiet)




def main() -> None:
    """Entry point: one-line errors and exit 1 for mistakes, tracebacks only with ADAPTERHUB_DEBUG=1."""
    run(cli)
