"""ui: the registry as a read-only web page (adapterhub/webui), served by uvicorn.

Starlette and uvicorn (the [serve] extra) are imported inside the command, so the CLI starts without them.
"""

from __future__ import annotations

import socket
import threading
import time

import click

from ..errors import AdapterHubError, NotFoundError
from .context import Context, pass_ctx

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so a taken port is one clear error (uvicorn would log it and exit)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening now, so a browser or script given the URL below waits in the queue rather than being refused.
        sock.listen(2048)
    except OSError as e:
        raise AdapterHubError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                              hint="pick another port with --port (0 picks a free one)") from None
    return sock


def _open_when_up(server, url: str) -> None:
    """Open the browser once uvicorn accepts connections (earlier, the page would fail to load)."""
    import webbrowser

    def wait_then_open() -> None:
        for _ in range(200):
            if server.started:
                webbrowser.open(url)
                return
            time.sleep(0.05)
    threading.Thread(target=wait_then_open, daemon=True).start()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@pass_ctx
def ui(ctx: Context, host: str, port: int, open_browser: bool) -> None:
    """A read-only web page: catalogue, versions, lineage, loss curves, compare, audit, runs."""
    registry = ctx.registry
    if not registry.initialized:
        raise NotFoundError(f"no registry at {registry.root}", hint=f"run 'adapterhub init {registry.root}'",
                            kind="registry", key=registry.root)
    try:
        import uvicorn

        from ..webui.app import create_app
    except ImportError as e:
        raise AdapterHubError(f"the web page needs {e.name or 'starlette and uvicorn'}, which is not installed",
                              hint="pip install 'adapterhub[serve]'") from None
    app = create_app(registry.root)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    ctx.emit({"url": url, "registry": str(registry.root), "read_only": True},
             f"adapterhub ui: {url}  (registry {registry.root}, read-only; Ctrl-C stops)")
    if host not in LOOPBACK and not ctx.quiet:
        click.echo(f"note: the page has no login: anyone who can reach {host}:{bound} can read this registry", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    if open_browser:
        _open_when_up(server, url)
    server.run(sockets=[sock])


COMMANDS = [ui]
