"""Streaming fuse: bake adapters into a base model, one tensor at a time.

Tensors no adapter touches are copied byte for byte; a targeted tensor is
computed exactly as mlx-lm computes it. When no dtype or shape changes, each
output shard reuses its base shard's header verbatim, so only the targeted
bytes differ from the base file. Restore data (XOR against the naive inverse,
compressed, plus the original bytes of every file fuse rewrites) goes to the
registry's object store, so `unfuse` can rebuild the base bit for bit.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import naming
from ..errors import ConflictError, IncompatibleError, InvalidAdapterError
from ..fingerprint import config_essentials, model_sha256, weight_files
from ..registry import RECORD_FILE
from ..safetensors_io import (StreamingWriter, build_header, header_bytes, read_header, safetensors_dtype,
                              tensor_bytes)
from ..schemas import validate
from ..card import fused_card
from ..store import atomic_write, read_json, require_new_folder, write_json
from . import restore as restore_data
from .fusion import deltas_for, fuse_module, group_members, module_updates, naive_base, quantization_for

INDEX_FILE = "model.safetensors.index.json"


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
        try:
            todo += registry.resolve(parent["ref"]).record["parents"]
        except Exception:  # noqa: BLE001 - a removed ancestor ends the walk, it does not fail it
            pass
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
    fingerprint, registered = registry.resolve_base(base)
    base_path = Path(base).expanduser() if Path(base).expanduser().is_dir() else Path(registered["path"])
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
    return FusePlan(base_record, base_path, versions, out, dequantize, keep_restore, notes=notes, force=force)


def _module_outputs(module, tensors, updates, config_quant, dequantize, base_dtypes, keep_restore):
    q = quantization_for(module, config_quant) if f"{module}.scales" in tensors else None
    deltas = deltas_for(updates, base_dtypes, module, q)
    fused, extras = fuse_module(module, tensors, updates, q, dequantize, deltas)
    members = group_members(module, tensors, q is not None)
    naive = naive_base(module, fused, updates, q, dequantize and q is not None, base_dtypes, extras, deltas) if keep_restore else {}
    return fused, extras, members, naive


def _residual(base, naive) -> bytes:
    """Runs on a worker thread: numpy releases the GIL for the heavy parts."""
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[base.dtype.size]
    is_float = "float" in str(base.dtype)
    return restore_data.encode(np.frombuffer(tensor_bytes(base), width), np.frombuffer(tensor_bytes(naive), width), is_float)


def execute_fuse(plan: FusePlan, registry, progress=None, force: bool | None = None) -> dict:
    """Write the fused model into `plan.out` and register it; returns its record.

    `force` (default: the plan's) replaces an existing `plan.out`. The model is written into a
    journalled staging folder and renamed into place only when every tensor is written and finite.
    """
    import mlx.core as mx

    started = time.perf_counter()
    force = plan.force if force is None else force
    inputs = (plan.base_path,)
    # Again here, before add_base writes to the registry: the folder may have appeared since the plan.
    require_new_folder(plan.out, (*inputs, registry.root), force)
    base_record = registry.add_base(plan.base_path)[0]
    plan = replace(plan, base=base_record)
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
    modules = set(updates)
    if plan.dequantize:
        modules |= {k[: -len(".scales")] for k in base_tensors if k.endswith(".scales")}
    member_of = {}
    for module in modules:
        for name in group_members(module, base_tensors, f"{module}.scales" in base_tensors):
            member_of[name] = module

    # Residuals encode on another core while the next tensors stream; MLX's buffer cache is capped
    # so freed tensors do not pile up: memory stays near one module, whatever the model's size.
    encoder, pending = ThreadPoolExecutor(max_workers=1), deque()
    restore = restore_data.RestoreWriter(registry.objects) if plan.keep_restore else None
    previous_cache_limit = mx.set_cache_limit(256 << 20)
    try:
        with registry.staged_output(plan.out, "fuse", inputs, force) as staging:
            out_files, index_map = [], {}
            computed: dict[str, tuple] = {}
            for path in files:
                header = headers[path.name]
                order = sorted(header.tensors, key=lambda n: header.tensors[n].begin)
                entries, sources = [], []
                for name in order:
                    module = member_of.get(name)
                    if module is None:
                        t = header.tensors[name]
                        entries.append((name, t.dtype, t.shape))
                        sources.append((name, None))
                        continue
                    if module not in computed:
                        computed[module] = _module_outputs(module, lazy, updates.get(module, []), config_quant,
                                                           plan.dequantize, base_dtypes, plan.keep_restore)
                    fused = computed[module][0]
                    if name in fused:
                        entries.append((name, safetensors_dtype(fused[name]), tuple(fused[name].shape)))
                        sources.append((name, module))
                same = all(header.tensors.get(n) is not None and (header.tensors[n].dtype, header.tensors[n].shape) == (d, s)
                           for n, d, s in entries) and len(entries) == len(order)
                raw_header = header_bytes(header) if same else build_header(entries, header.metadata or None)
                if restore:
                    restore.add(f"header/{path.name}", header_bytes(header))
                with open(path, "rb") as src, StreamingWriter(staging / path.name, raw_header, progress) as writer:
                    for name, module in sources:
                        if module is None:
                            t = header.tensors[name]
                            writer.copy_range(src, header.data_start + t.begin, t.end - t.begin)
                            continue
                        fused, extras, members, naive = computed[module]
                        mx.eval(fused[name])
                        _require_finite(fused[name], name, plan)
                        writer.write(tensor_bytes(fused.pop(name)))
                        if name == f"{module}.weight" and plan.keep_restore:
                            mx.eval(naive, extras)
                            for member in members:
                                pending.append((f"residual/{member}", encoder.submit(_residual, lazy[member], naive[member])))
                            for key, value in extras.items():
                                restore.add(f"extra/{key}", tensor_bytes(value.astype(mx.float32)))
                            naive.clear()
                            while len(pending) > 4:  # bounded: encoded parts go to disk, not memory
                                part, future = pending.popleft()
                                restore.add(part, future.result())
                        if not fused:
                            # Written in full: free it, and its base tensors too (an evaluated lazy array stays
                            # materialised while referenced), so memory stays near one module.
                            del computed[module]
                            for member in members:
                                lazy.pop(member, None)
                    sha, size = writer.close()
                out_files.append({"name": path.name, "sha256": sha, "size": size})
                index_map.update({name: path.name for name, _, _ in entries})
            for part, future in pending:
                restore.add(part, future.result())
            _copy_side_files(plan, staging, config, index_map, restore)
            restore_record = _restore_record(registry, restore.finish()) if restore else None
            record = {
                # Hashed as fingerprint_model hashes a folder, so the fused folder fingerprints to its record.
                "sha256": model_sha256(out_files, config_essentials(read_json(staging / "config.json") or {})),
                "path": str(plan.out.resolve()),
                "base": {k: plan.base[k] for k in ("name", "sha256", "structure_sha256", "model_type")},
                "adapters": [{"ref": v.ref, "sha256": v.sha256} for v in plan.adapters],
                "files": out_files, "dequantized": plan.dequantize, "restore": restore_record,
                "created_at": _now(),
            }
            validate(record, "fused_model", what="fused model record")
            write_json(staging / RECORD_FILE, record)
            with atomic_write(staging / "README.md", "w") as f:
                f.write(fused_card(registry, record, plan.out))
    except BaseException:
        encoder.shutdown(cancel_futures=True)
        if restore:
            restore.abort()
        raise
    finally:
        mx.set_cache_limit(previous_cache_limit)
    encoder.shutdown()
    registry.register_fused(record)
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _require_finite(tensor, name: str, plan: FusePlan) -> None:
    """Refuse a fused tensor holding inf or NaN: an update too large for the base's dtype overflows silently,
    and a model that loads but computes NaN is worse than no model."""
    import mlx.core as mx

    if not mx.issubdtype(tensor.dtype, mx.floating) or mx.all(mx.isfinite(tensor)).item():
        return
    refs = ", ".join(v.ref for v in plan.adapters)
    raise InvalidAdapterError(
        f"fusing {refs} makes {name} non-finite (inf or NaN) in {str(tensor.dtype).removeprefix('mlx.core.')}: "
        "the update is too large for the base's dtype", hint="check the adapter's scale and weights; nothing was written")


def _now() -> str:
    from ..registry import now

    return now()


def _copy_side_files(plan: FusePlan, staging: Path, config: dict, index_map: dict, restore) -> None:
    """Tokenizer, generation config and the rest: copied; config and index rewritten when the weights change shape."""
    for item in sorted(plan.base_path.iterdir()):
        if item.suffix == ".safetensors" or item.name in (RECORD_FILE,) or item.name.startswith("."):
            continue
        if item.name in ("README.md", "config.json", INDEX_FILE) and restore:
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
