"""Training runs in a registry: their records, and whether the process behind a running one is alive.

A part of `Registry` (it is mixed in); the trainer writes through it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NotFoundError
from .schemas import validate

RUNS = "runs.json"


class TrainingRuns:
    """Run records and process liveness (mixed into Registry)."""

    def start_run(self, record: dict) -> dict:
        validate(record, "training_run", what=f"run {record.get('id')}")
        with self.transaction():
            self.catalogue.insert(RUNS, record)
        return record

    def update_run(self, run_id: str, **fields) -> dict:
        with self.transaction():
            record = {**self.run(run_id), **fields}
            validate(record, "training_run", what=f"run {run_id}")
            self.catalogue.update(RUNS, fields, id=run_id)
        return record

    def run(self, run_id: str) -> dict:
        found = self.catalogue.find(RUNS, id=run_id)
        if found is None:
            raise NotFoundError(f"no training run '{run_id}'", hint="run 'adapterhub runs' to list them", kind="run", key=run_id)
        return found

    def runs(self, status: str | None = None) -> list[dict]:
        self.require()
        found = []
        for record in self.catalogue.rows(RUNS):
            record = {k: v for k, v in record.items() if k != "doc_id"}
            record["status"] = self.run_status(record)
            if status is None or record["status"] == status:
                found.append(record)
        return sorted(found, key=lambda r: r["started_at"])

    @staticmethod
    def run_status(record: dict) -> str:
        """A run recorded as running whose process is gone is interrupted, whatever the record says."""
        if record["status"] != "running":
            return record["status"]
        return "running" if process_alive(record.get("pid"), record.get("host")) else "interrupted"


def process_alive(pid: int | None, host: str | None) -> bool:
    """Whether `pid` on `host` still runs; a process on another host is taken to (it cannot be asked)."""
    import socket  # here, not at the top: list and show never need it

    if host != socket.gethostname() or not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed child not yet reaped still answers kill(pid, 0); its state in /proc says it is dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
