"""Registries shared through S3-compatible buckets: no server of ours, only conditional writes.

- `config`: the registry's remotes (remotes.json), remote refs (`team:sql-lora@3`)
- `bucket`: obstore's S3 client narrowed to what a registry needs; credentials; errors
- `layout`: the bucket's keys and documents, and how each proves itself
- `cas`: compare-and-swap on refs documents, create-only leases on blob uploads
- `catalogue`: resolving, listing, showing; aliases and tags by compare-and-swap
- `push`, `pull`: versions with their lineage, out and in
- `lineage`, `verify`: the lineage and audit of a remote version; the whole remote checked

Only `config` is imported by the CLI at start-up; the S3 client loads when a command connects.
"""
