"""Unfuse: the base model back from a fused one.

With restore data the base is rebuilt bit for bit (original headers, the naive
inverse corrected by the stored residual, the original side files) and proven
against the base fingerprint in the registry. Without it, the updates are
subtracted and the report says how far from exact that is, instead of claiming
exactness.

The same pipeline as fuse: unchanged tensors are copied in the kernel by each
file's writer, the naive inverse is computed here, and residuals are decoded
and compared with the base on a worker thread, a few tensors behind.
"""

from __future__ import annotations

import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from ..bases import local_folder
from ..errors import InvalidAdapterError, NotFoundError
from ..files import read_json, require_new_folder
from ..fingerprint import config_essentials, model_sha256, weight_files
from ..records import RECORD_FILE
from ..safetensors_io import (DTYPE_SIZES, FLOAT_DTYPES, MLX_DTYPES, build_header, parse_header, read_bits, read_header,
                              safetensors_dtype, tensor_bits)
from ..schemas import validate
from ..tensor_writers import ByteBudget, Profile, ShardWriter
from . import restore as restore_data
from .fuse import IN_FLIGHT_BYTES, INDEX_FILE
from .fusion import deltas_for, group_members, module_updates, naive_base, quantization_for


@dataclass
class UnfuseReport:
    out: str
    exact: bool | None  # True: proven against the base fingerprint; None: nothing to compare with
    base: str | None
    sha256: str
    inexact_fraction: float | None = None
    max_abs_error: float | None = None
    notes: list[str] = field(default_factory=list)
    profile: dict | None = None  # seconds per activity (see tensor_writers.Profile), when asked for

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "profile" or v is not None}


def unfuse(registry, fused_dir: Path, out: Path, adapter_refs: list[str] | None = None, base: str | None = None,
           progress=None, force: bool = False, profile: bool = False) -> UnfuseReport:
    """Rebuild the base model of `fused_dir` into `out` (replacing an existing `out` only with `force`).

    `profile`: also time each activity (reading, computing, writing, ...), reported under `profile`.
    """
    import mlx.core as mx

    fused_dir, out = Path(fused_dir), Path(out)
    record = read_json(fused_dir / RECORD_FILE)
    if record is None and not adapter_refs:
        raise NotFoundError(f"{fused_dir} has no {RECORD_FILE}, so its adapters are unknown",
                            hint="name them with --adapter REF (for a model fused elsewhere)")
    if record is not None:
        # The folder's record travels with the model and anyone may have edited it: its hashes become
        # object-store paths below, so it must have the shape fuse wrote before any of it is used.
        validate(record, "fused_model", what=f"{fused_dir / RECORD_FILE}")
    inputs = (fused_dir, *_compared_base_folder(registry, record, base))
    # Before anything is read or registered: a refused output leaves the registry as it was.
    require_new_folder(out, (*inputs, registry.root), force)
    refs = adapter_refs or [a["ref"] for a in record["adapters"]]
    versions = [registry.resolve(r) for r in refs]
    if record and not adapter_refs:
        for v, a in zip(versions, record["adapters"]):
            if v.sha256 != a["sha256"]:
                raise InvalidAdapterError(f"{v.ref} in the registry is not the adapter this model was fused with",
                                          hint="the registry changed; restore that version or pass --adapter")
    restore = None
    if record and record.get("restore") and not adapter_refs:
        if not registry.objects.has(record["restore"]["sha256"]):
            raise NotFoundError(f"restore data {record['restore']['sha256'][:12]} is not in this registry",
                                hint="unfuse with the registry that made this model, or pass --adapter for an approximate unfuse")
        restore = restore_data.read(registry.objects.verified(record["restore"]["sha256"], "restore data"))
    dequantized = bool(record and record.get("dequantized"))

    timings = Profile(activities=profile)
    fused_files = weight_files(fused_dir)
    fused_headers = {p.name: read_header(p) for p in fused_files}
    lazy = {}
    for p in fused_files:
        lazy.update(mx.load(str(p)))
    where = {name: h for h in fused_headers.values() for name in h.tensors}
    if restore:
        base_headers = {k[len("header/"):]: parse_header(v, fused_dir / k[len("header/"):]) for k, v in restore.items()
                        if k.startswith("header/")}
        config = read_json(fused_dir / "config.json")
        if "file/config.json" in restore:
            import json

            config = json.loads(restore["file/config.json"])
    else:
        base_headers, config = fused_headers, read_json(fused_dir / "config.json")
    base_tensors = {k: v for h in base_headers.values() for k, v in h.structure().items()}
    adapters = [(v.ref, v.record["kind"], v.record["scale"], registry.weights(v)) for v in versions]
    updates = module_updates(adapters, base_tensors)
    config_quant = config.get("quantization") or config.get("quantization_config")
    modules = set(updates)
    if dequantized:
        modules |= {k[: -len(".scales")] for k in base_tensors if k.endswith(".scales")}
    member_of = {n: m for m in modules for n in group_members(m, base_tensors, f"{m}.scales" in base_tensors)}
    base_dtypes = {k: getattr(mx, _mlx_dtype(v[0])) for k, v in base_tensors.items()}
    # Every module's naive inverse as a lazy graph: dtypes and shapes fix each file's layout before anything runs.
    computed = {}
    for module in sorted(modules):
        q = quantization_for(module, config_quant) if f"{module}.scales" in base_tensors else None
        fused = {n: lazy[n] for n in group_members(module, lazy, q is not None and not dequantized)}
        ups = updates.get(module, [])
        computed[module] = naive_base(module, fused, ups, q, dequantized and q is not None, base_dtypes,
                                      _extras(restore, module), deltas_for(ups, base_dtypes, module, q))
    layouts = [_layout(fname, header, restore, member_of, computed, where, fused_dir)
               for fname, header in sorted(base_headers.items())]

    comparison = _Comparison(registry, record, base)
    budget = ByteBudget(IN_FLIGHT_BYTES)
    previous_cache_limit = mx.set_cache_limit(256 << 20)  # as in fuse: freed tensors do not pile up
    try:
        with registry.staged_output(out, "unfuse", inputs, force) as staging:
            writers, out_files = [], []
            # Residuals are decoded (without restore data: results compared with the base) on a worker
            # thread, a few tensors behind the one computed here; each file's writer takes them in order.
            worker, pending = ThreadPoolExecutor(max_workers=1), deque()
            try:
                for (fname, raw, parts, source, _) in layouts:
                    writers.append(ShardWriter(staging / fname, raw, parts, source, budget, timings, progress))
                for writer, (_, _, _, _, tensors) in zip(writers, layouts):
                    for name, module in tensors:
                        if module is None:  # an unchanged tensor kept in another file than its base file's namesake
                            pending.append((writer, worker.submit(read_bits, where[name], name)))
                        else:
                            with timings.timing("computing"):
                                mx.eval(list(computed[module].values()))  # a module's outputs share their inputs
                                naive = computed[module].pop(name)
                            residual = restore.get(f"residual/{name}") if restore else None
                            if restore and residual is None:
                                raise InvalidAdapterError(f"restore data has no entry for {name}",
                                                          hint="the restore data is damaged; run 'adapterhub verify'")
                            pending.append((writer, worker.submit(_rebuilt, timings, comparison, name, tensor_bits(naive),
                                                                  safetensors_dtype(naive), residual)))
                            if not computed[module]:
                                del computed[module]  # done: drop it and the fused tensors it was read from
                                for member in group_members(module, lazy, True):
                                    lazy.pop(member, None)
                        while len(pending) > 2:
                            done_writer, future = pending.popleft()
                            done_writer.put(future.result())
                while pending:
                    done_writer, future = pending.popleft()
                    done_writer.put(future.result())
                for (fname, *_), writer in zip(layouts, writers):
                    sha, size = writer.close()
                    out_files.append({"name": fname, "sha256": sha, "size": size})
            except BaseException:
                worker.shutdown(cancel_futures=True)
                for writer in writers:
                    writer.abort()
                raise
            worker.shutdown()
            _side_files(fused_dir, staging, restore)
            # As fingerprint_model hashes a folder: the proof of exactness is this equal to the base's sha256.
            sha = model_sha256(out_files, config_essentials(read_json(staging / "config.json") or {}))
    finally:
        mx.set_cache_limit(previous_cache_limit)
    rebuilt = [name for *_, tensors in layouts for name, module in tensors if module is not None]
    report = comparison.report(out, sha, bool(restore), rebuilt)
    if profile:
        report.profile = timings.to_dict()
    return report


def _layout(fname: str, header, restore: dict | None, member_of: dict, computed: dict, where: dict, fused_dir: Path):
    """One base file: (name, header bytes, ShardWriter parts, source file, (tensor, module) pairs handed over in order).

    Unchanged tensors are copied from the fused file of the same name, in runs; one that lives
    elsewhere (a model sharded otherwise) is read and handed over like a computed one.
    """
    order = sorted(header.tensors, key=lambda n: header.tensors[n].begin)
    source = fused_dir / fname if any(where[n].path.name == fname for n in order if n in where) else None
    entries, parts, tensors = [], [], []
    for name in order:
        module = member_of.get(name)
        if module is None:
            if name not in where:
                raise InvalidAdapterError(f"the fused model has no {name}", hint="the fused files changed; run 'adapterhub verify'")
            held = where[name]
            t = held.tensors[name]
            entries.append((name, t.dtype, t.shape))
            begin = held.data_start + t.begin
            if held.path.name != fname:
                parts.append(("put", t.end - t.begin))
                tensors.append((name, None))
            elif parts and parts[-1][0] == "copy" and parts[-1][1] + parts[-1][2] == begin:
                parts[-1] = ("copy", parts[-1][1], parts[-1][2] + t.end - t.begin)
            else:
                parts.append(("copy", begin, t.end - t.begin))
            continue
        naive = computed[module][name]
        dtype = safetensors_dtype(naive)
        entries.append((name, dtype, tuple(naive.shape)))
        parts.append(("put", prod(naive.shape) * DTYPE_SIZES[dtype]))
        tensors.append((name, module))
    # With restore data: the base's own header, byte for byte.
    raw = restore[f"header/{fname}"] if restore else build_header(entries, header.metadata or None)
    return fname, raw, parts, source, tensors


def _rebuilt(profile: Profile, comparison: "_Comparison", name: str, naive, dtype: str, residual: bytes | None):
    """On the worker thread: the base tensor's bits, from the naive inverse and its residual.

    Without restore data the naive inverse is the result, compared with the base element by
    element as it goes. With it, the fingerprint proves the result exact, and only a result
    that misses is compared, afterwards (_Comparison.report).
    """
    if residual is None:
        comparison.add(name, naive, dtype)
        return naive
    with profile.timing("restore"):
        return restore_data.decode(naive, residual, dtype in FLOAT_DTYPES) if residual else naive


def _compared_base_folder(registry, record: dict | None, base: str | None) -> tuple[Path, ...]:
    """The base folder the result is compared with: read while `out` is written, so `out` must not land on it."""
    if base and Path(base).expanduser().is_dir():
        return (Path(base).expanduser(),)
    try:
        found = registry.base(base) if base else registry.base(record["base"]["sha256"]) if record else None
    except NotFoundError:
        found = None
    return (Path(found["path"]),) if found and found.get("path") else ()


def _mlx_dtype(safetensors_dtype_name: str) -> str:
    return MLX_DTYPES[safetensors_dtype_name]


def _extras(restore: dict | None, module: str) -> dict:
    import mlx.core as mx
    import numpy as np

    key = f"extra/{module}.dora_norms"
    if not restore or key not in restore:
        return {}
    return {f"{module}.dora_norms": mx.array(np.frombuffer(restore[key], dtype="<f4"))}


def _side_files(fused_dir: Path, staging: Path, restore: dict | None) -> None:
    for item in sorted(fused_dir.iterdir()):
        if item.suffix == ".safetensors" or item.name in (RECORD_FILE, "README.md") or item.name.startswith("."):
            continue
        if restore and item.name in (INDEX_FILE, "config.json") and f"file/{item.name}" in restore:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
    for key, data in (restore or {}).items():
        if key.startswith("file/"):
            (staging / key[len("file/"):]).write_bytes(data)


def _as_float32(bits, dtype: str):
    """Raw F32 / F16 / BF16 bits as float32 values (numpy has no bfloat16: it is float32's top half)."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view({"F16": np.float16, "F32": np.float32}[dtype]).astype(np.float32)


class _Comparison:
    """Measures the result against the base: exactly by fingerprint, or element by element without restore data."""

    def __init__(self, registry, record: dict | None, base: str | None):
        self.registry = registry
        self.base_record = None
        self._register = None  # a base folder not registered yet: registered once the result is written
        if base and Path(base).expanduser().is_dir():
            resolved = registry.resolve_base(base)
            self.base_record = resolved.record.record if resolved.record else None
            if self.base_record is None:
                self.base_record, self._register = resolved.fingerprint, base
        elif base:
            self.base_record = registry.base(base)
        elif record:
            try:
                self.base_record = registry.base(record["base"]["sha256"])
            except NotFoundError:
                self.base_record = None
        self.base_headers = {}
        base_folder = local_folder(self.base_record)
        if base_folder:
            for p in weight_files(base_folder):
                self.base_headers.update({n: read_header(p) for n in read_header(p).tensors})
        self.inexact = self.total = 0
        self.max_error = 0.0

    def add(self, name: str, data, dtype: str) -> None:
        """`data`: the bits written for `name` (on the worker thread, so no MLX here)."""
        header = self.base_headers.get(name)
        if header is None:
            return
        base_bits = read_bits(header, name).reshape(-1)
        ours = np.frombuffer(data, dtype=base_bits.dtype)
        differ = base_bits != ours
        self.inexact += int(differ.sum())
        self.total += differ.size
        if differ.any() and header.tensors[name].dtype == dtype and dtype in FLOAT_DTYPES:
            error = np.max(np.abs(_as_float32(base_bits, dtype) - _as_float32(ours, dtype)))
            self.max_error = max(self.max_error, float(error))

    def report(self, out: Path, sha: str, restored: bool, rebuilt: list[str]) -> UnfuseReport:
        """`rebuilt`: the tensors computed (the rest were copied), compared now if restore data missed the base."""
        if self._register:
            self.base_record = self.registry.add_base(self._register)[0]
        base = self.base_record
        if base is None:
            return UnfuseReport(str(out), None, None, sha, notes=["no registered base to compare with: exactness unknown"])
        if sha == base["sha256"]:
            return UnfuseReport(str(out), True, base["name"], sha, 0.0, 0.0,
                                notes=[f"every weight file matches base {base['name']} (sha256 {base['sha256'][:12]})"])
        if restored:
            written = {n: h for p in weight_files(out) for h in [read_header(p)] for n in h.tensors}
            for name in rebuilt:
                if name in written:
                    self.add(name, read_bits(written[name], name), written[name].tensors[name].dtype)
        fraction = self.inexact / self.total if self.total else None
        notes = ["restore data did not reproduce the base: it or the fused files changed"] if restored else [
            "no restore data: the updates were subtracted, which rounding makes inexact"]
        return UnfuseReport(str(out), False, base["name"], sha, fraction, self.max_error, notes)
