"""Streaming fuse: bake adapters into a base model, as a pipeline with bounded memory.

Tensors no adapter touches are copied byte for byte; a targeted tensor is
computed exactly as mlx-lm computes it, on MLX's default device. When no dtype
or shape changes, each output shard reuses its base shard's header verbatim, so
only the targeted bytes differ from the base file. Restore data (the residual
against the naive inverse, compressed, plus the original bytes of every file
fuse rewrites) goes to the registry's object store, so `unfuse` can rebuild the
base bit for bit.

Every output file's layout is fixed before the first byte is written, so the
work splits across threads: this thread reads and computes one module at a
time; each output file has a writer (tensor_writers.ShardWriter) that copies
the untouched ranges in the kernel and hashes and writes everything in order;
restore data is encoded and written on a worker thread. A byte budget bounds
what is computed and not yet written. With `profile=True` the returned record's
`profile` says where the seconds went.

The model card is the caller's: fuse is an operation, cards are presentation
(a layer above it), so the CLI hands its card writer in.
"""

from __future__ import annotations

import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable

from .. import naming
from ..errors import ConflictError, IncompatibleError, InvalidAdapterError
from ..files import atomic_write, read_json, require_new_folder, write_json
from ..fingerprint import config_essentials, model_sha256, weight_files
from ..records import RECORD_FILE, now
from ..safetensors_io import (DTYPE_SIZES, build_header, has_non_finite, header_bytes, read_header, safetensors_dtype,
                              tensor_bits, tensor_bytes)
from ..schemas import validate
from ..tensor_writers import ByteBudget, Profile, ShardWriter
from . import restore as restore_data
from .fusion import deltas_for, fuse_module, group_members, module_updates, naive_base, quantization_for

INDEX_FILE = "model.safetensors.index.json"
REWRITTEN_FILES = ("README.md", "config.json", INDEX_FILE)  # fuse may write its own: restore data keeps the base's
# Computed tensors handed to the writers and not yet written: enough to keep every writer busy,
# small against the model (a tensor larger than this still passes, alone).
IN_FLIGHT_BYTES = 512 << 20
# (registry, fused model record, the folder it will be in) -> README.md text, e.g. adapterhub.card.fused_card.
CardWriter = Callable[[object, dict, Path], str]
# (registry, the written folder, the one adapter fused, base=the base folder) -> a fidelity report, e.g.
# adapterhub.fidelity.fidelity: measured on the staging folder, before the model is moved into place.
FidelityCheck = Callable[..., dict]
FIDELITY_FIELDS = ("prompts", "positions", "max_logit_diff", "mean_logit_diff", "token_agreement",
                   "same_continuations", "exact")


@dataclass(frozen=True)
class FusePlan:
    """Everything fuse will do, decided and checked before anything is written."""

    base: dict  # the registered base record
    base_path: Path
    adapters: list  # AdapterVersion, in the order their updates are applied
    out: Path
    dequantize: bool
    keep_restore: bool
    modules: dict[str, list[str]] = field(default_factory=dict)  # base module -> adapter refs
    force: bool = False  # replace an existing `out` (never one inside the registry or the base)
    notes: list[str] = field(default_factory=list)
    allow_different_weights: bool = False  # the base was accepted with other weights than the adapters' own

    def to_dict(self) -> dict:
        return {"base": self.base["name"], "base_sha256": self.base["sha256"], "base_path": str(self.base_path),
                "adapters": [v.ref for v in self.adapters], "out": str(self.out), "dequantize": self.dequantize,
                "restore": self.keep_restore, "modules": len(self.modules), "notes": self.notes}

    def describe(self) -> str:
        lines = [f"fuse {', '.join(v.ref for v in self.adapters)} into {self.base['name']} ({self.base_path})",
                 f"  -> {self.out}: {len(self.modules)} modules updated"
                 + (", dequantized" if self.dequantize else "") + ("" if self.keep_restore else ", no restore data")]
        return "\n".join(lines + [f"  · {n}" for n in self.notes])


def ancestors(registry, version) -> dict[str, str]:
    """sha256 -> ref of every version `version` descends from, through recorded parents."""
    found: dict[str, str] = {}
    todo = list(version.record["parents"])
    while todo:
        parent = todo.pop()
        if parent["sha256"] in found:
            continue
        found[parent["sha256"]] = parent["ref"]
        known = registry.find(parent["ref"])
        if known is not None:  # a removed ancestor ends the walk, it does not fail it
            todo += known.record["parents"]
    return found


def refuse_related(registry, versions: list, why: str) -> None:
    """Refuse a set of adapters where one is listed twice or descends from another: either applies an update twice."""
    seen: dict[str, str] = {}
    for v in versions:
        # By hash, not by ref: `a`, `a@1`, a sha prefix and a second name for the same weights are one adapter.
        if v.sha256 in seen:
            raise ConflictError(f"the same adapter is listed twice ({seen[v.sha256]} and {v.ref}, sha256 {v.sha256[:12]}); "
                                f"{why} would apply its update twice", hint="list each adapter once")
        seen[v.sha256] = v.ref
    for v in versions:
        if v.record["kind"] == "loreft":
            raise IncompatibleError(f"{v.ref} is a LoReFT adapter: it edits hidden states at chosen positions, "
                                    "which is not a weight update", hint="apply it at run time with 'adapterhub generate'")
        line = ancestors(registry, v)
        for other in versions:
            if other is not v and other.sha256 in line:
                raise IncompatibleError(
                    f"{other.ref} is an ancestor of {v.ref}; a chained adapter already contains its parent, so {why} "
                    "would apply the parent twice", hint=f"use {v.ref} alone")


def plan_fuse(registry, refs: list[str], base: str, out: Path, dequantize: bool = False, keep_restore: bool = True,
              allow_different_weights: bool = False, force: bool = False) -> FusePlan:
    versions = [registry.resolve(r) for r in refs]
    refuse_related(registry, versions, "fusing them")
    # Planning writes nothing: an unregistered base is only fingerprinted here, and registered by execute_fuse.
    resolved = registry.resolve_base(base, need_files=True)
    fingerprint, base_path = resolved.fingerprint, resolved.path
    registered = resolved.record.record if resolved.record else None
    out = Path(out)
    # Checked at plan time, so --dry-run refuses what the real run would.
    require_new_folder(out, (base_path, registry.root), force)
    base_record = registered or {**fingerprint, "name": naming.suggest_name(base_path.resolve().name)}
    notes = []
    for v in versions:
        report = registry.check(v.ref, str(base_path), allow_different_weights)
        if not report.compatible:
            raise IncompatibleError(f"{v.ref} is not compatible with {base_record['name']}: {report.problems[0]}",
                                    hint=f"run 'adapterhub check {v.ref} --base {base}'")
        notes += [f"{v.ref}: {n}" for n in report.notes if report.verdict != "exact"]
    quant = base_record["config"]["quantization"]
    if quant and not dequantize and keep_restore:
        notes.append("quantized base: the fused model stays quantized; unfuse restores the base exactly from restore data")
    if quant and not keep_restore:
        notes.append("quantized base without restore data: unfuse can only re-quantize an approximation")
    return FusePlan(base_record, base_path, versions, out, dequantize, keep_restore, notes=notes, force=force,
                    allow_different_weights=allow_different_weights)


@dataclass
class _Module:
    """One module's outputs as lazy MLX graphs: their dtypes and shapes fix each file's layout before anything runs."""

    fused: dict  # output tensor name -> array, dropped as each is handed to its writer
    extras: dict  # what the inverse needs beyond the fused weights (DoRA row norms)
    members: list  # the base tensors it is computed from
    naive: dict  # the naive inverse, for restore data ({} without restore data)
    evaluated: bool = False


def _module(module, tensors, updates, config_quant, dequantize, base_dtypes, keep_restore) -> _Module:
    q = quantization_for(module, config_quant) if f"{module}.scales" in tensors else None
    deltas = deltas_for(updates, base_dtypes, module, q)
    fused, extras = fuse_module(module, tensors, updates, q, dequantize, deltas)
    members = group_members(module, tensors, q is not None)
    naive = naive_base(module, fused, updates, q, dequantize and q is not None, base_dtypes, extras, deltas) if keep_restore else {}
    return _Module(fused, extras, members, naive)


class _RestoreParts:
    """Restore data written on one worker thread, in the order its parts are queued.

    Encoding a residual (numpy releases the GIL) and writing it overlap the next modules;
    at most a few parts wait, so memory stays bounded.
    """

    WAITING = 4

    def __init__(self, writer: restore_data.RestoreWriter, profile: Profile):
        self.writer, self._profile = writer, profile
        self._worker, self._pending = ThreadPoolExecutor(max_workers=1), deque()

    def add(self, name: str, data: bytes) -> None:
        self._queue(self.writer.add, name, data)

    def residual(self, name: str, base, naive, is_float: bool) -> None:
        """base and naive: bit arrays (numpy views of evaluated mlx arrays, which they keep alive)."""
        self._queue(self._encode, name, base, naive, is_float)

    def _encode(self, name: str, base, naive, is_float: bool) -> None:
        with self._profile.timing("restore"):
            data = restore_data.encode(base, naive, is_float)
        self.writer.add(name, data)

    def _queue(self, work, *args) -> None:
        self._pending.append(self._worker.submit(work, *args))
        self._wait(self.WAITING)

    def _wait(self, waiting: int) -> None:
        with self._profile.timing("waiting"):
            while len(self._pending) > waiting:
                self._pending.popleft().result()

    def finish(self) -> dict:
        """Every part written, the file hashed and synced: {sha256, size}. The writer's `keep` stores it."""
        self._wait(0)
        self._worker.shutdown()
        return self.writer.finish(self._profile)

    def abort(self) -> None:
        self._worker.shutdown(cancel_futures=True)
        self.writer.abort()


def _layout(header, entries: list[tuple[str, str, tuple, str | None]]) -> tuple[bytes, list[tuple], list[tuple[str, str]]]:
    """An output file's header, its parts for ShardWriter, and the (tensor, module) pairs to compute, in file order.

    `entries` is the output in base order: (name, dtype, shape, module or None for a tensor
    copied as it is). Runs of copied tensors are one range of the base file: one large copy.
    """
    same = len(entries) == len(header.tensors) and all(
        (header.tensors[n].dtype, header.tensors[n].shape) == (d, tuple(s)) for n, d, s, _ in entries)
    # Unchanged dtypes and shapes: the base header verbatim, so only the fused tensors' bytes differ from the base file.
    raw = header_bytes(header) if same else build_header([(n, d, s) for n, d, s, _ in entries], header.metadata or None)
    parts, computed = [], []
    for name, dtype, shape, module in entries:
        if module is None:
            t = header.tensors[name]
            if parts and parts[-1][0] == "copy" and parts[-1][1] + parts[-1][2] == header.data_start + t.begin:
                parts[-1] = ("copy", parts[-1][1], parts[-1][2] + t.end - t.begin)
            else:
                parts.append(("copy", header.data_start + t.begin, t.end - t.begin))
        else:
            parts.append(("put", prod(shape) * DTYPE_SIZES[dtype]))
            computed.append((name, module))
    return raw, parts, computed


def execute_fuse(plan: FusePlan, registry, progress=None, force: bool | None = None, card: CardWriter | None = None,
                 profile: bool = False, fidelity: FidelityCheck | None = None) -> dict:
    """Write the fused model into `plan.out` and register it; returns its record, with `seconds`.

    A pipeline: this thread reads and computes the targeted tensors, module by module, on
    MLX's default device; one writer thread per output file copies the untouched ranges in
    the kernel and hashes and writes everything, in order; restore data is encoded on a
    worker thread. A byte budget bounds what is computed and not yet written.

    Args:
        force: replace an existing `plan.out` (default: the plan's). The model is written into a
            journalled staging folder and renamed into place only when every tensor is written and finite.
        card: writes the fused folder's README.md from its record (the CLI passes
            adapterhub.card.fused_card); None writes no README.md.
        profile: also time each activity (reading, computing, writing, ...), returned under `profile`.
        fidelity: compares the written model with base + adapter on a few prompts (the CLI passes
            adapterhub.fidelity.fidelity), recorded under `fidelity`; one adapter only: several fused
            together have no single reference to load. None records none.
    """
    import mlx.core as mx

    timings = Profile(activities=profile)
    force = plan.force if force is None else force
    inputs = (plan.base_path,)
    # Again here, before anything is written: the folder may have appeared since the plan.
    require_new_folder(plan.out, (*inputs, registry.root), force)
    adapters = [(v.ref, v.record["kind"], v.record["scale"], registry.weights(v)) for v in plan.adapters]
    files = weight_files(plan.base_path)
    headers = {p.name: read_header(p) for p in files}
    base_tensors = {k: v for h in headers.values() for k, v in h.structure().items()}
    updates = module_updates(adapters, base_tensors)
    config = read_json(plan.base_path / "config.json")
    config_quant = config.get("quantization") or config.get("quantization_config")
    lazy = {}
    for p in files:
        lazy.update(mx.load(str(p)))
    base_dtypes = {k: v.dtype for k, v in lazy.items()}
    names = set(updates)
    if plan.dequantize:
        names |= {k[: -len(".scales")] for k in base_tensors if k.endswith(".scales")}
    modules = {m: _module(m, lazy, updates.get(m, []), config_quant, plan.dequantize, base_dtypes, plan.keep_restore)
               for m in sorted(names)}
    member_of = {name: m for m, module in modules.items() for name in module.members}

    layouts, index_map = [], {}
    for path in files:
        header = headers[path.name]
        entries = []
        for name in sorted(header.tensors, key=lambda n: header.tensors[n].begin):
            module = member_of.get(name)
            if module is None:
                entries.append((name, header.tensors[name].dtype, header.tensors[name].shape, None))
            elif name in modules[module].fused:  # a --dequantize fuse drops scales and biases
                tensor = modules[module].fused[name]
                entries.append((name, safetensors_dtype(tensor), tuple(tensor.shape), module))
        layouts.append(_layout(header, entries))
        index_map.update({name: path.name for name, *_ in entries})

    restore = None
    if plan.keep_restore:
        # Every part the restore data may hold, named before the first is written (RestoreWriter reserves its header).
        announced = [f"header/{p.name}" for p in files] + [f"file/{n}" for n in REWRITTEN_FILES]
        announced += [f"{kind}/{key}" for m in modules.values()
                      for kind, keys in (("residual", m.members), ("extra", m.extras)) for key in keys]
        restore = _RestoreParts(restore_data.RestoreWriter(registry.objects, announced), timings)
    budget = ByteBudget(IN_FLIGHT_BYTES)
    # MLX's buffer cache is capped so freed tensors do not pile up: memory stays near a few
    # modules and the bytes in flight, whatever the model's size.
    previous_cache_limit = mx.set_cache_limit(256 << 20)
    try:
        with registry.staged_output(plan.out, "fuse", inputs, force) as staging:
            if restore:
                for path in files:
                    restore.add(f"header/{path.name}", header_bytes(headers[path.name]))
            _copy_side_files(plan, staging, config, index_map, restore)
            writers = []
            try:
                for path, (raw, parts, _) in zip(files, layouts):
                    writers.append(ShardWriter(staging / path.name, raw, parts, path, budget, timings, progress))
                for writer, (_, _, computed) in zip(writers, layouts):
                    for name, module in computed:
                        m = modules[module]
                        if not m.evaluated:
                            _evaluate(m, lazy, plan, restore, timings)
                        writer.put(tensor_bits(m.fused.pop(name)))
                        if not m.fused:
                            # Handed over in full: drop it and its base tensors (an evaluated lazy array
                            # stays materialised while referenced), so memory stays near a few modules.
                            del modules[module]
                            for member in m.members:
                                lazy.pop(member, None)
                # The restore data is finished while the writers finish their files, and stored once they have.
                restore_record = _restore_record(registry, restore.finish()) if restore else None
                out_files = []
                for path, writer in zip(files, writers):
                    sha, size = writer.close()
                    out_files.append({"name": path.name, "sha256": sha, "size": size})
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
            if restore:
                restore.writer.keep()
            measured = None
            if fidelity and len(plan.adapters) == 1:
                report = fidelity(registry, staging, plan.adapters[0].ref, base=plan.base_path,
                                  allow_different_weights=plan.allow_different_weights)
                measured = {k: report[k] for k in FIDELITY_FIELDS}
            # Registered only now, with the fused model: a refused fuse leaves the registry as it was.
            base = registry.add_base(plan.base_path)[0]
            record = {
                # Hashed as fingerprint_model hashes a folder, so the fused folder fingerprints to its record.
                "sha256": model_sha256(out_files, config_essentials(read_json(staging / "config.json") or {})),
                "path": str(plan.out.resolve()),
                "base": {k: base[k] for k in ("name", "sha256", "structure_sha256", "model_type")},
                "adapters": [{"ref": v.ref, "sha256": v.sha256} for v in plan.adapters],
                "files": out_files, "dequantized": plan.dequantize, "restore": restore_record,
                "fidelity": measured, "created_at": now(),
            }
            validate(record, "fused_model", what="fused model record")
            write_json(staging / RECORD_FILE, record)
            if card:
                with atomic_write(staging / "README.md", "w") as f:
                    f.write(card(registry, record, plan.out))
    except BaseException:
        if restore:
            restore.abort()
        raise
    finally:
        mx.set_cache_limit(previous_cache_limit)
    registry.register_fused(record)
    return _with_profile(record, timings)


def _with_profile(report: dict, timings: Profile) -> dict:
    """The report plus `seconds`, and `profile` when activities were timed: both kept out of the stored record."""
    times = timings.to_dict()
    return {**report, "seconds": times["wall"], **({"profile": times} if timings.activities else {})}


def _evaluate(m: _Module, lazy: dict, plan: FusePlan, restore: _RestoreParts | None, profile: Profile) -> None:
    """Read, compute and check one module; queue its restore data. Its outputs are evaluated
    together: they share their inputs, so one pass computes them all."""
    import mlx.core as mx

    with profile.timing("reading"):
        mx.eval([lazy[name] for name in m.members])
    with profile.timing("computing"):
        mx.eval(list(m.fused.values()))
        for name, value in m.fused.items():
            if has_non_finite(tensor_bits(value), safetensors_dtype(value)):
                _refuse_non_finite(value, name, plan)
    m.evaluated = True
    if restore is None:
        return
    with profile.timing("restore"):
        mx.eval(m.naive, m.extras)
        for member in m.members:
            is_float = mx.issubdtype(lazy[member].dtype, mx.floating)
            restore.residual(f"residual/{member}", tensor_bits(lazy[member]), tensor_bits(m.naive[member]), is_float)
        for key, value in m.extras.items():
            restore.add(f"extra/{key}", tensor_bytes(value.astype(mx.float32)))
    m.naive.clear()


def _refuse_non_finite(tensor, name: str, plan: FusePlan) -> None:
    """Refuse a fused tensor holding inf or NaN: an update too large for the base's dtype overflows silently,
    and a model that loads but computes NaN is worse than no model."""
    refs = ", ".join(v.ref for v in plan.adapters)
    raise InvalidAdapterError(
        f"fusing {refs} makes {name} non-finite (inf or NaN) in {str(tensor.dtype).removeprefix('mlx.core.')}: "
        "the update is too large for the base's dtype", hint="check the adapter's scale and weights; nothing was written")


def _copy_side_files(plan: FusePlan, staging: Path, config: dict, index_map: dict, restore) -> None:
    """Tokenizer, generation config and the rest: copied; config and index rewritten when the weights change shape."""
    for item in sorted(plan.base_path.iterdir()):
        if item.suffix == ".safetensors" or item.name in (RECORD_FILE,) or item.name.startswith("."):
            continue
        if item.name in REWRITTEN_FILES and restore:
            restore.add(f"file/{item.name}", item.read_bytes())
        if item.name == "README.md":
            continue
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)
    if plan.dequantize:
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        write_json(staging / "config.json", config)
    if (plan.base_path / INDEX_FILE).exists():
        index = read_json(plan.base_path / INDEX_FILE)
        if set(index.get("weight_map", {})) != set(index_map):
            index["weight_map"] = dict(sorted(index_map.items()))
            write_json(staging / INDEX_FILE, index)


def _restore_record(registry, stored: dict) -> dict:
    return {**stored, "registry": str(registry.root.resolve()),
            "path": str(registry.objects.path(stored["sha256"]).relative_to(registry.root))}
