"""`adapterhub serve`: the registry's adapters behind an OpenAI-compatible API, one copy of each base in memory.

- `protocol`: request bodies checked, response bodies shaped (the OpenAI wire format)
- `directory`: what a request's `model` names (a base, or an adapter ref resolved at request time), /v1/models
- `runner`: the one thread that does all model work: admission, prefill, batched decoding
- `layers`: the base's modules wrapped once; each row of a batch reads its own adapter
- `adapters`: adapters loaded hash-checked from the object store into a least-recently-used cache
- `decoding`: sampling, detokenizing and stop strings per request
- `app`: the Starlette application; `access_log`: one JSON line per request
- `server`: `serve()`: checks, loads, listens, stops cleanly on a signal

Starlette and uvicorn are the `serve` extra: import this package's modules inside the command that needs them.
"""
