"""Data-parallel training under mlx.launch: which process this is, and what the processes agree on.

mlx.launch (ring over TCP, MPI, JACCL over Thunderbolt, NCCL on CUDA) starts one process per
rank with the same command line. Rank 0 plans the run: it alone reads and writes the registry,
so the other hosts need the base and the data at the same paths, never a registry. The others
receive the plan, hash their own copies of the base and the data, and follow.

Every exchange here is a collective that all ranks enter: a rank that cannot go on says so in
the exchange, and all ranks refuse together with the same message, instead of one leaving the
others blocked in their next all_sum.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from ..errors import AdapterHubError, printable

# What mlx.launch sets for each backend (MLX's "distributed without mlx.launch" lists them),
# so the run record can say which one carried the gradients; "any" would not tell.
_BACKEND_ENVIRONMENT = (
    ("jaccl", ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")),
    ("nccl", ("NCCL_HOST_IP",)),
    ("ring", ("MLX_HOSTFILE",)),
    ("mpi", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")),
)
SAME_FILES = "give every host the same files at the same paths (or a shared folder), then launch again"


class PeerRefusal(AdapterHubError):
    """A refusal every rank raises at once, with the same message: rank 0 prints it, the others only exit 1."""


class LauncherGone(KeyboardInterrupt):
    """mlx.launch died (killed, or its terminal closed): the run stops as it would on Ctrl-C, resumable.

    A KeyboardInterrupt, so the trainer records the run as interrupted, as for any stop from outside.
    """


def _launched_backend() -> str | None:
    for backend, names in _BACKEND_ENVIRONMENT:
        if any(os.environ.get(name) for name in names):
            return backend
    return None


@dataclass(frozen=True)
class World:
    """This process among those training one adapter; a world of one when not launched by mlx.launch."""

    group: object
    rank: int
    size: int
    backend: str | None
    parent_pid: int

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes (checkpoints, the run record, the version): rank 0 alone."""
        return self.rank == 0

    def launcher_gone(self) -> bool:
        """True once the process that started this one has died: orphans are re-parented, so the parent pid changes."""
        return self.distributed and os.getppid() != self.parent_pid

    # ---- host-side exchanges: small, rare, at start-up and at report time ----------------------

    def _host_stream(self):
        import mlx.core as mx

        # As mlx-lm reports its losses: host-side values go over the CPU stream, except on NCCL, which talks GPU to GPU.
        return None if self.backend == "nccl" else mx.cpu

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's payload, in rank order."""
        if not self.distributed:
            return [payload]
        import mlx.core as mx
        import numpy as np

        stream = self._host_stream()
        lengths = mx.distributed.all_gather(mx.array([len(payload)], dtype=mx.int32), group=self.group, stream=stream).tolist()
        width = max(lengths)
        padded = np.zeros(width, np.uint8)
        padded[:len(payload)] = np.frombuffer(payload, np.uint8)
        data = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group, stream=stream)).tobytes()
        return [data[i * width:i * width + n] for i, n in enumerate(lengths)]

    def gather(self, doc) -> list:
        """Every rank's JSON document, in rank order."""
        return [json.loads(b) for b in self.gather_bytes(json.dumps(doc, sort_keys=True).encode())]

    def share(self, doc):
        """Rank 0's JSON document, on every rank."""
        return self.gather(doc if self.writes else None)[0]

    def maximum(self, value: int) -> int:
        """The largest of every rank's `value`."""
        return max(self.gather(value)) if self.distributed else value

    def share_tree(self, tree):
        """Rank 0's arrays, bit for bit, in place of every rank's own (same structure, shapes and dtypes on all).

        One all_sum of every array's bytes, the other ranks adding zeros: integer addition of zero changes
        no bit, where a float sum would turn rank 0's -0.0 into 0.0.
        """
        if not self.distributed:
            return tree
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        own = tree_flatten(tree)
        if not own:
            return tree
        # By name: a tree loaded from a checkpoint lists its arrays in another order than one built here.
        flat = sorted(own, key=lambda item: item[0])
        self.agree_on([(k, list(v.shape), str(v.dtype)) for k, v in flat], "adapter tensors and optimizer state")
        parts = [(v if self.writes else mx.zeros_like(v)).reshape(-1).view(mx.uint8) for _, v in flat]
        summed = mx.distributed.all_sum(mx.concatenate(parts), group=self.group)
        offsets, start = [], 0
        for part in parts[:-1]:
            start += part.size
            offsets.append(start)
        shared = {k: piece.view(v.dtype).reshape(v.shape) for (k, v), piece in zip(flat, mx.split(summed, offsets))}
        mx.eval(list(shared.values()))
        return tree_unflatten([(k, shared[k]) for k, _ in own])

    def agree_on(self, value, what: str) -> None:
        """Refuse on every rank when ranks hold different `value`s (a JSON-able description of `what`)."""
        rows = self.gather(value)
        for rank, row in enumerate(rows[1:], 1):
            if row != rows[0]:
                differs = next(((a, b) for a, b in zip(row, rows[0]) if a != b), (f"{len(row)} entries", f"{len(rows[0])}"))
                raise PeerRefusal(f"rank {rank}'s {what} differ from rank 0's ({differs[0]} against {differs[1]})",
                                  hint="install the same mlx and mlx-lm versions on every host")


def init() -> World:
    """This process's place among the ranks mlx.launch started (a world of one otherwise)."""
    import mlx.core as mx

    backend = _launched_backend()
    group = mx.distributed.init(backend=backend or "any")
    size = group.size()
    return World(group, group.rank(), size, (backend or "unknown") if size > 1 else None, os.getppid())


def refuse_together(world: World, error: BaseException | None) -> None:
    """Every rank raises when any rank had an error (the lowest rank's message); a world of one re-raises its own."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    message = None if error is None else printable(str(error)) or type(error).__name__
    rows = world.gather({"host": socket.gethostname(), "error": message})
    failed = [(rank, row) for rank, row in enumerate(rows) if row["error"]]
    if not failed:
        return
    rank, row = failed[0]
    if rank == world.rank and world.writes:
        raise error  # rank 0's own error keeps its type: the CLI shows it as it would without mlx.launch
    where = "" if rank == 0 else f"rank {rank} on {row['host']}: "
    raise PeerRefusal(where + row["error"]) from (error if rank == world.rank else None)


def check_same_inputs(world: World, mine: dict) -> None:
    """All-gather each rank's hashes of the base and the data (and its library versions); refuse any difference.

    Args:
        mine: {"base": sha256, "data": sha256, "versions": {...}} as this rank computed them from its own files.
    """
    if not world.distributed:
        return
    rows = world.gather({**mine, "host": socket.gethostname()})
    first = rows[0]
    for rank, row in enumerate(rows[1:], 1):
        for key, what in (("base", "base model"), ("data", "data")):
            if row[key] != first[key]:
                raise PeerRefusal(f"rank {rank} on {row['host']}: its {what} differs from rank 0's on {first['host']} "
                                  f"(sha256 {row[key][:12]} against {first[key][:12]})", hint=SAME_FILES)
        if row["versions"] != first["versions"]:
            theirs = ", ".join(f"{k} {v}" for k, v in sorted(row["versions"].items()))
            ours = ", ".join(f"{k} {v}" for k, v in sorted(first["versions"].items()))
            raise PeerRefusal(f"rank {rank} on {row['host']} runs {theirs}, rank 0 on {first['host']} runs {ours}",
                              hint="install the same versions on every host")
