"""The registry as a read-only web page: catalogue, versions, lineage, loss curves, compare, audit, runs.

A face (layer 7): `app.create_app(root)` is a Starlette application that `adapterhub ui` runs with
uvicorn, and `app.mount(root)` the same application as a route for `adapterhub serve` (at /ui).
`catalogue`, `views` and `graph` read the registry into plain dicts and import no HTTP stack; the
pages' HTML, CSS and JavaScript (with Vega, vendored in static/vendor/) ship in static/.
Importing this package imports nothing: Starlette loads only when the app module is imported.
"""
