"""serve: the registry's adapters behind an OpenAI-compatible HTTP API, one copy of each base in memory."""

from __future__ import annotations

import os

import click

from ..errors import AdapterHubError
from .context import COUNT, Context, pass_ctx

# Stated here rather than imported: the serving modules import MLX, and `--help` must not.
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_MAX_ADAPTERS = "127.0.0.1", 8080, 8


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key.strip():
        raise AdapterHubError(f"--api-key-env {variable} names a variable that is unset or empty",
                              hint=f"export {variable}=YOUR-KEY first, or drop --api-key-env")
    return key


def _require_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise AdapterHubError(f"'adapterhub serve' needs the serve extra, which is not installed ({e})",
                              hint="pip install 'adapterhub[serve]'") from None


@click.command()
@click.option("--base", "bases", multiple=True, metavar="NAME",
              help="A registered base to serve; repeat for more (default: every registered base).")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on; anything but loopback exposes the registry's adapters to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on; 0 picks a free one (the ready line says which).")
@click.option("--max-adapters", type=COUNT, default=DEFAULT_MAX_ADAPTERS, show_default=True,
              help="Adapters kept in memory per base; the least recently used one leaves first.")
@click.option("--api-key-env", metavar="VAR", help="Require the key in $VAR as 'Authorization: Bearer KEY' on /v1/*.")
@pass_ctx
def serve(ctx: Context, bases: tuple[str, ...], host: str, port: int, max_adapters: int, api_key_env: str | None) -> None:
    """Serve adapters behind an OpenAI-compatible API; a request's `model` is a base name or an adapter ref.

    POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models, GET /health.
    Aliases are resolved per request, so 'adapterhub alias REF prod' moves traffic without a restart.
    One JSON access-log line per request goes to stderr. Ctrl-C lets requests in flight finish, then exits.
    """
    api_key = _api_key(api_key_env)
    _require_extra()
    from ..serving.server import serve as run_server

    def ready(listening) -> None:
        summary = ", ".join(f"{name} ({count} adapter version{'s' if count != 1 else ''})"
                            for name, count in listening.bases.items())
        ctx.emit(listening.to_dict(), f"serving {summary} on {listening.url} — Ctrl-C to stop")

    result = run_server(ctx.registry, bases, host, port, max_adapters, api_key, on_ready=ready,
                        access_log=lambda line: click.echo(line, err=True))
    ctx.emit({"stopped": True, **result}, f"stopped after {result['requests']} request(s)")


COMMANDS = [serve]
