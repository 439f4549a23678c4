"""`serve`: check what is to be served, load it, listen, and stop cleanly on Ctrl-C or SIGTERM.

The calling thread (the main one, from the CLI) loads the models and runs them; uvicorn runs in a
thread of its own. The first SIGINT or SIGTERM stops accepting connections and lets every request in
flight finish (streams included), then the runner finishes what it holds and `serve` returns; a second
SIGINT cuts the wait short. uvicorn's own handling would re-raise the signal once it stopped, which
turns a clean stop into a "killed" exit status, and it only listens for signals on the main thread,
which is the models'.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import AdapterHubError, CorruptRegistryError, NotFoundError
from .directory import Directory
from .protocol import Limits
from .runner import Engine

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_MAX_ADAPTERS = "127.0.0.1", 8080, 8


@dataclass(frozen=True)
class Listening:
    """What `serve` reports once it accepts requests."""

    url: str  # the API's base URL, e.g. http://127.0.0.1:8080/v1
    bases: dict[str, int]  # served base -> adapter versions registered on it

    def to_dict(self) -> dict:
        return {"url": self.url, "bases": self.bases}


def served_bases(registry, names: list[str] | tuple[str, ...] = ()) -> dict[str, dict]:
    """The registered bases to serve (all of them when `names` is empty), each checked to be in its folder
    with the bytes it was registered with: a base is used where it is, so it is checked where it is used."""
    names = list(dict.fromkeys(names)) or [b["name"] for b in registry.bases()]
    if not names:
        raise NotFoundError(f"no base model is registered in {registry.root}",
                            hint="register one: adapterhub base add PATH --name NAME", kind="base")
    served = {}
    for name in names:
        record = registry.base(name)
        path = Path(record["path"]) if record.get("path") else None
        if path is None or not path.is_dir():
            raise NotFoundError(f"base {record['name']} has no model folder here ({path or 'no path recorded'})",
                                hint=f"register its folder again: adapterhub base add PATH --name {record['name']}",
                                kind="base", key=name)
        found = registry.resolve_base(path).fingerprint["sha256"]
        if found not in (record["sha256"], *record.get("previous_sha256", ())):
            raise CorruptRegistryError(f"the folder of base {record['name']} ({path}) no longer holds the model registered "
                                       f"under that name (sha256 {found[:12]}, registered {record['sha256'][:12]})",
                                       hint="restore the folder, or register it as a new base")
        served[record["name"]] = record
    return served


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise AdapterHubError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                              hint="pick another --port, or stop what is using this one") from None
    return sock


class _Signals:
    """SIGINT and SIGTERM stop the server gracefully; a second SIGINT stops it now. Main thread only."""

    def __init__(self, server):
        self.server = server
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame) -> None:
        if self.server.should_exit and sig == signal.SIGINT:
            self.server.force_exit = True
        self.server.should_exit = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def serve(registry, bases: list[str] | tuple[str, ...] = (), host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_adapters: int = DEFAULT_MAX_ADAPTERS, api_key: str | None = None, limits: Limits = Limits(),
          on_ready: Callable[[Listening], None] | None = None, access_log: Callable[[str], None] | None = None,
          stop: threading.Event | None = None) -> dict:
    """Serve the registry's adapters on their bases until a signal (or `stop`) ends it.

    Args:
        bases: registered base names to serve; all registered bases when empty.
        port: 0 picks a free port (on_ready says which).
        max_adapters: adapters kept in memory per base, least recently used evicted first.
        api_key: when set, /v1/* requires `Authorization: Bearer api_key`.
        on_ready: called once the server accepts requests.
        access_log: receives one JSON line per request.
        stop: set it to stop the server gracefully (for callers without signals, e.g. tests and threads).

    Returns:
        {"requests": requests completed}.
    """
    import uvicorn

    from ..ranges import Range, require
    from .app import create_app

    require("--max-adapters", max_adapters)
    require("--port", port, Range(0, 65535))
    served = served_bases(registry, bases)
    engine = Engine(registry, {name: Path(record["path"]) for name, record in served.items()}, max_adapters, limits)
    directory = Directory(registry, served)
    sock = _listen(host, port)
    try:
        engine.load()
        app = create_app(engine, directory, limits, api_key, access_log)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="adapterhub-http", daemon=True)
        with _Signals(server):
            http.start()
            while not server.started and http.is_alive():
                time.sleep(0.02)
            if not server.started:
                raise AdapterHubError(f"the HTTP server on {host}:{port} stopped while starting",
                                      hint="rerun with ADAPTERHUB_DEBUG=1 and report it")
            if on_ready is not None:
                bound_host, bound_port = sock.getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                on_ready(Listening(f"http://{shown}:{bound_port}/v1", {name: len(registry.list(base=name)) for name in served}))

            def keep_going() -> bool:
                if stop is not None and stop.is_set():
                    server.should_exit = True
                return http.is_alive()

            # The models run on this thread; HTTP stops first (finishing what is in flight), then the engine.
            engine.run(keep_going)
            http.join()
    finally:
        sock.close()
    return {"requests": engine.completed}
