"""What every command module shares: the global options, output, progress and the option types.

Heavy modules (mlx, mlx_lm, transformers, jsonschema, rich) are imported inside the commands that need
them, so `--help`, `list` and `show` start fast.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import click

from ..errors import AdapterHubError
from .. import ranges
from ..registry import Registry
from ..files import dump_json

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

    def emit(self, data, text: str | Callable[[], str] | None = None) -> None:
        """--json prints `data`; otherwise `text` unless --quiet. A long listing passes `text` as a function,
        so --json never formats the table it does not print."""
        if self.as_json:
            # Indented for a person at a terminal; compact for pipes, where json's C encoder
            # is ten times faster on a long listing (it only runs without indent).
            indent = 2 if sys.stdout.isatty() else None
            click.echo(dump_json(data, "the JSON report", indent=indent))
        elif text is not None and not self.quiet:
            click.echo(text() if callable(text) else text)


@contextmanager
def _rich_progress(description: str, total: int):
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


pass_ctx = click.make_pass_decorator(Context)


def registry_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """Click callback for --registry."""
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


# Ranks, token counts and steps: the library's own range, so both refuse the same values.
COUNT = click.IntRange(min=ranges.COUNT.min)


def train_number(option: str) -> click.ParamType:
    """The click type for a training option, from the library's own ranges (one source of truth)."""
    from ..training.config import FLOAT_OPTIONS, RANGES

    allowed = RANGES[option]
    if option in FLOAT_OPTIONS:
        return FiniteFloat(allowed.min, allowed.max, max_open=allowed.max_open)
    # A special value below the range (-1: all layers) is let through here for the library to accept.
    low = allowed.also if allowed.also is not None and allowed.also < allowed.min else allowed.min
    return click.IntRange(low, allowed.max)


def _late_global_option(attribute: str, *decls: str, check=None, **kwargs) -> click.Option:
    """A global option repeated on each command, so `adapterhub list --json` means `adapterhub --json list`."""
    def store(ctx: click.Context, param: click.Parameter, value) -> None:
        if check:
            value = check(ctx, param, value)
        if value:
            setattr(ctx.find_object(Context), attribute, value)
    return click.Option(decls, expose_value=False, callback=store, **kwargs)


def accept_global_options(command: click.Command) -> None:
    """Give `command` (every command under it, for a group) the global options; once per command."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            accept_global_options(sub)
        return
    command.params += [
        _late_global_option("registry_path", "--registry", type=click.Path(), check=registry_path,
                            help="Same as the global --registry."),
        _late_global_option("as_json", "--json", is_flag=True, help="Same as the global --json."),
        _late_global_option("quiet", "--quiet", "-q", is_flag=True, help="Same as the global --quiet."),
    ]


FORCE_OPTION = click.option("--force", is_flag=True,
                            help="Replace an existing output (never inside the registry or an input folder).")


def parse_tags(pairs: tuple[str, ...]) -> dict[str, str]:
    """KEY=VALUE pairs from repeated --tag options (a usage error for anything else)."""
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{pair}' is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    return tags
