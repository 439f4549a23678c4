"""The one place where exceptions become what a person reads: one line on stderr and an exit code."""

from __future__ import annotations

import os
import sys

import click

from ..errors import AdapterHubError, printable


def _mlx_backend_missing(error: ImportError) -> bool:
    """On Linux the backend is an extra (mlx-cpu, mlx-cuda-12/13); without one, `import mlx.core` cannot find libmlx."""
    return "libmlx" in str(error) or (error.name or "").partition(".")[0] in ("mlx", "mlx_metal", "mlx_cuda")


def run(group: click.Group) -> None:
    """Run `group` on sys.argv: one-line errors and exit 1 for mistakes, tracebacks only with ADAPTERHUB_DEBUG=1."""
    debug = os.environ.get("ADAPTERHUB_DEBUG") == "1"
    try:
        group.main(standalone_mode=False)
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
