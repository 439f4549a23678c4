"""What commands write outside the registry: fused model folders and the staging journal.

A part of `Registry` (it is mixed in). Every output folder is staged beside its `--out`
under files.check_output's rule, and journalled, so a killed fuse's gigabytes are found.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AdapterHubError, CorruptRegistryError
from .files import check_output, enclosing_registry, staged_folder, staging_path
from .records import now
from .runs import process_alive
from .schemas import validate

FUSED, STAGING = "fused.json", "staging.json"


class Outputs:
    """Fused model rows, staged output folders and what no output may overwrite (mixed into Registry)."""

    def register_fused(self, record: dict) -> dict:
        """Catalogue a fused model folder (written first by the caller: files before the row)."""
        validate(record, "fused_model", what="fused model record")
        with self.transaction():
            self.catalogue.upsert(FUSED, record, "sha256")
        return record

    def fused_models(self) -> list[dict]:
        self.require()
        return [{k: v for k, v in row.items() if k != "doc_id"} for row in self.catalogue.rows(FUSED)]

    def fused(self, sha256: str) -> dict | None:
        return next((f for f in self.fused_models() if f["sha256"] == sha256), None)

    def protected_paths(self) -> list[Path]:
        """What no output may overwrite, even with --force: the registry and every folder it records models in."""
        folders = [b["path"] for b in self.bases() if b.get("path")] + [f["path"] for f in self.fused_models() if f.get("path")]
        return [self.root, *map(Path, folders)]

    @contextmanager
    def staged_output(self, out: Path | str, purpose: str, inputs: tuple[Path, ...] = (), force: bool = False) -> Iterator[Path]:
        """A staging folder for a command's output (fuse, unfuse, export), journalled in the catalogue.

        The staging folder sits beside `out`, outside the registry, so a process killed
        mid-write would leave it where nothing looks; the journal row lets `verify` report
        it and `verify --repair` remove it. The row goes in before the folder exists and
        leaves after the rename, so no staging folder is ever unaccounted for.
        """
        import socket  # here, not at the top: list and show never write outputs

        out = Path(out).expanduser().absolute()
        protected = (*inputs, *self.protected_paths())
        check_output(out, protected, force)
        row = {"path": str(staging_path(out, purpose, os.getpid())), "out": str(out), "purpose": purpose,
               "pid": os.getpid(), "host": socket.gethostname(), "started_at": now()}
        with self.transaction():
            self.catalogue.insert(STAGING, row)
        try:
            with staged_folder(out, purpose, protected, force) as staging:
                yield staging
        finally:
            with self.transaction():
                self.catalogue.remove(STAGING, path=row["path"])

    def staging_rows(self) -> tuple[list[dict], list[dict]]:
        """The staging journal as (rows of live processes, rows of killed ones), each row checked first.

        A row is text anyone can edit and repair deletes the folder it names: a row is only
        believed when its path is exactly the staging folder of its `out`, outside the registry.

        Raises:
            CorruptRegistryError: a row that is not such a journal row, before anything is removed.
        """
        journal = self.catalog / STAGING
        live, killed = [], []
        for r in self.catalogue.rows(STAGING):
            row = {k: v for k, v in r.items() if k != "doc_id"}
            try:
                validate(row, "staging", what=f"{journal} row {r['doc_id']}")
            except AdapterHubError as e:
                raise CorruptRegistryError(e.message, hint="remove that row from the journal by hand") from None
            out = Path(row["out"])
            if Path(row["path"]) != staging_path(out, row["purpose"], row["pid"]) or enclosing_registry(out) is not None:
                raise CorruptRegistryError(f"{journal} row {r['doc_id']} names {row['path']}, which is not the staging folder "
                                           f"of an output outside the registry", hint="remove that row from the journal by hand")
            (live if process_alive(row["pid"], row["host"]) else killed).append(r)
        return live, killed
