"""The web page as a Starlette application: read-only pages over JSON endpoints, every asset in the package.

`create_app(root)` is what `adapterhub ui` runs with uvicorn; `mount(root)` is the same application as a
route that `adapterhub serve` adds at /ui, so one server answers both the API and the page.

Pages are HTML shells that hold no registry text: each page's script fetches its JSON and builds the
page with `textContent`, so a name, tag or description is always text, never markup. JSON escapes
`<`, `>` and `&` as well, and the Content-Security-Policy allows no inline script, as a second guard.
Every link is relative to `<base href>`, the application's own root, so the page works at / and at /ui/.
"""

from __future__ import annotations

import html
import json
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import AdapterHubError, InvalidNameError, NotFoundError
from ..registry import Registry
from . import views
from .catalogue import CatalogueView, Query, QueryError

STATIC = Path(__file__).parent / "static"
VEGA = "vendor/vega-5.33.0.min.js"
# page -> its script, and whether it draws (only pages with a chart or a graph load Vega's 500 KB).
PAGES = {"catalogue": ("catalogue.js", False), "version": ("version.js", True), "compare": ("compare.js", True),
         "runs": ("runs.js", False), "run": ("run.js", True), "audit": ("audit.js", True),
         "base": ("record.js", False), "dataset": ("record.js", True), "fused": ("record.js", True)}
READ_METHODS = ("GET", "HEAD")
# Vega compiles its expressions with `new Function` (hence 'unsafe-eval') and styles SVG inline; nothing
# else is allowed: no inline script, no other origin, no framing.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' "
                                 b"'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'self'; "
                                 b"form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class ReadOnly:
    """Refuses every method but GET and HEAD before routing (static files included), and adds the
    security headers to every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in READ_METHODS:
            response = JSONResponse({"error": f"{scope['method']} is not allowed: this page only reads the registry",
                                     "hint": "use the adapterhub command line to change it"}, status_code=405,
                                    headers={"allow": ", ".join(READ_METHODS)})
            await response(scope, receive, self._with_headers(send))
            return
        await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)
        return wrapped


class JSONResponse(Response):
    """JSON that is safe wherever it lands: `<`, `>` and `&` escaped, no NaN (JSON has none)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("utf-8")


def _status(error: AdapterHubError) -> int:
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, (QueryError, InvalidNameError)):
        return 400
    return 500  # a damaged record or file: the registry's problem, named in the message


def _api(view: Callable[[Request], object]) -> Callable[[Request], Response]:
    """A JSON endpoint: the view's dict, or its AdapterHubError as {error, hint} with a status."""
    def endpoint(request: Request) -> Response:
        try:
            return JSONResponse(view(request), headers={"cache-control": "no-store"})
        except AdapterHubError as e:
            return JSONResponse(views.error_payload(e), status_code=_status(e), headers={"cache-control": "no-store"})
        except OSError as e:  # a folder a record names was moved or is unreadable: say which, as the CLI does
            return JSONResponse({"error": f"{e.strerror or e}: {e.filename}" if e.filename else str(e),
                                 "hint": "check the path and permissions"}, status_code=500,
                                headers={"cache-control": "no-store"})
    return endpoint


_SHELL = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<base href="{base}">
<title>{title} · adapterhub</title>
<link rel="icon" href="static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="static/style.css">
</head>
<body data-page="{page}">
<header class="top">
<a class="brand" href="./">adapterhub</a>
<nav><a href="./">Catalogue</a><a href="compare">Compare</a><a href="runs">Runs</a></nav>
<span class="registry" title="registry">{registry}</span>
</header>
<main id="app">{body}</main>
{scripts}
</body>
</html>
"""


def _shell(request: Request, page: str, title: str, status: int = 200, message: str | None = None) -> HTMLResponse:
    base = request.scope.get("root_path", "").rstrip("/") + "/"
    script, draws = PAGES[page]
    scripts = [] if message else [VEGA] * draws + ["common.js", script]
    body = (f'<p class="error">{html.escape(message)}</p><p><a href="./">Back to the catalogue</a></p>' if message
            else '<p class="loading">Loading…</p><noscript>This page draws with JavaScript; the same data is '
                 'under api/.</noscript>')
    return HTMLResponse(_SHELL.format(
        base=html.escape(quote(base), quote=True), title=html.escape(title), page=page,
        registry=html.escape(str(request.app.state.registry.root)), body=body,
        scripts="\n".join(f'<script src="static/{s}"></script>' for s in scripts)), status_code=status)


def _page(page: str, title: str, exists: Callable[[Request], object] | None = None) -> Callable[[Request], Response]:
    """A page: its shell, or a 404 (or 400) page when what it names is not in the registry."""
    def endpoint(request: Request) -> Response:
        if exists is not None:
            try:
                exists(request)
            except AdapterHubError as e:
                return _shell(request, page, title, _status(e), str(e))
        return _shell(request, page, title)
    return endpoint


def _int(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError:
        raise QueryError(f"{key}={raw!r} is not a whole number", hint=f"give {key} as digits") from None


def _tags(request: Request) -> tuple[tuple[str, str], ...]:
    pairs = []
    for raw in request.query_params.getlist("tag"):
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise QueryError(f"tag filter {raw!r} is not KEY=VALUE", hint="write it as task=sql")
        pairs.append((key, value))
    return tuple(pairs)


def _query(request: Request) -> Query:
    q = request.query_params
    return Query(base=q.get("base") or None, kind=q.get("kind") or None, tags=_tags(request), name=q.get("name") or None,
                 all_versions=q.get("versions") == "all", sort=q.get("sort") or "name",
                 offset=_int(request, "offset", 0), limit=_int(request, "limit", 50))


def _refs(request: Request) -> list[str]:
    refs = [r.strip() for raw in request.query_params.getlist("refs") for r in raw.split(",")]
    return [r for r in refs if r]


def create_app(registry_root: Path | str) -> Starlette:
    """The read-only web page of the registry at `registry_root`.

    Raises:
        NotFoundError: no registry there (a typo in --registry), rather than a page of errors.
    """
    registry = Registry(registry_root)
    if not registry.initialized:
        raise NotFoundError(f"no registry at {registry.root}", hint=f"run 'adapterhub init {registry.root}'",
                            kind="registry", key=registry.root)
    catalogue = CatalogueView(registry)
    p = lambda request, key: request.path_params[key]  # noqa: E731 - one spelling for every route below

    routes = [
        Route("/", _page("catalogue", "Catalogue")),
        Route("/version/{ref}", _page("version", "Version", lambda r: registry.resolve(p(r, "ref")))),
        Route("/compare", _page("compare", "Compare")),
        Route("/runs", _page("runs", "Runs")),
        Route("/run/{run_id}", _page("run", "Run", lambda r: registry.run(p(r, "run_id")))),
        Route("/audit", _page("audit", "Audit", lambda r: views.audit_target(registry, r.query_params.get("target", "")))),
        Route("/base/{key}", _page("base", "Base model", lambda r: registry.base(p(r, "key")))),
        Route("/dataset/{key}", _page("dataset", "Dataset", lambda r: views.find_dataset(registry, p(r, "key")))),
        Route("/fused/{key}", _page("fused", "Fused model", lambda r: views.find_fused(registry, p(r, "key")))),
        Route("/api/catalogue", _api(lambda r: catalogue.query(_query(r)))),
        Route("/api/facets", _api(lambda r: catalogue.facets())),
        Route("/api/version/{ref}", _api(lambda r: views.version_view(registry, catalogue, p(r, "ref")))),
        Route("/api/descendants/{ref}", _api(lambda r: views.descendants_view(registry, p(r, "ref")))),
        Route("/api/compare", _api(lambda r: views.compare_view(registry, _refs(r)))),
        Route("/api/runs", _api(lambda r: views.runs_view(registry, r.query_params.get("status") or None))),
        Route("/api/run/{run_id}", _api(lambda r: views.run_view(registry, p(r, "run_id")))),
        Route("/api/audit", _api(lambda r: views.audit_view(registry, r.query_params.get("target", "")))),
        Route("/api/base/{key}", _api(lambda r: views.base_view(registry, catalogue, p(r, "key")))),
        Route("/api/dataset/{key}", _api(lambda r: views.dataset_view(registry, p(r, "key")))),
        Route("/api/fused/{key}", _api(lambda r: views.fused_view(registry, p(r, "key")))),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

    @asynccontextmanager
    async def warm(app: Starlette):
        # The first full read of a large catalogue takes a second or so: done while the person opens the page.
        # (Lifespans of mounted applications do not run: under `serve`, the first request reads it.)
        threading.Thread(target=_quietly, args=(catalogue.refresh,), daemon=True, name="ui-catalogue").start()
        yield

    app = Starlette(routes=routes, lifespan=warm)
    app.state.registry = registry
    app.state.catalogue = catalogue
    app.add_middleware(ReadOnly)
    return app


def _quietly(read: Callable[[], object]) -> None:
    """A warm-up read: a damaged registry is reported by the request that reads it, not by a stray thread."""
    try:
        read()
    except (AdapterHubError, OSError):
        pass


def mount(registry_root: Path | str, path: str = "/ui") -> Mount:
    """The web page as a route of another Starlette application (`adapterhub serve` adds it at /ui)."""
    return Mount(path, app=create_app(registry_root), name="ui")
