"""Unfuse: the base model back from a fused one.

With restore data the base is rebuilt bit for bit (original headers, the naive
inverse XOR the stored difference, the original side files) and proven against
the base fingerprint in the registry. Without it, the updates are subtracted
and the report says how far from exact that is, instead of claiming exactness.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidAdapterError, NotFoundError
from ..fingerprint import config_essentials, model_sha256, weight_files
from ..safetensors_io import (StreamingWriter, build_header, parse_header, read_bits, read_header, safetensors_dtype,
                              tensor_bytes)
from ..schemas import validate
from ..store import read_json, require_new_folder
from . import restore as restore_data
from ..registry import RECORD_FILE
from .fuse import INDEX_FILE
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

    def to_dict(self) -> dict:
        return dict(self.__dict__)




def unfuse(registry, fused_dir: Path, out: Path, adapter_refs: list[str] | None = None, base: str | None = None,
           progress=None, force: bool = False) -> UnfuseReport:
    """Rebuild the base model of `fused_dir` into `out` (replacing an existing `out` only with `force`)."""
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

    comparison = _Comparison(registry, record, base)
    with registry.staged_output(out, "unfuse", inputs, force) as staging:
        out_files, computed = [], {}
        for fname, header in sorted(base_headers.items()):
            order = sorted(header.tensors, key=lambda n: header.tensors[n].begin)
            if restore:
                raw = restore[f"header/{fname}"]
            else:
                raw = None
            pending = []
            for name in order:
                module = member_of.get(name)
                if module is not None and module not in computed:
                    q = quantization_for(module, config_quant) if f"{module}.scales" in base_tensors else None
                    fused = {n: lazy[n] for n in group_members(module, lazy, q is not None and not dequantized)}
                    extras = _extras(restore, module)
                    module_updates_ = updates.get(module, [])
                    computed[module] = naive_base(module, fused, module_updates_, q, dequantized and q is not None,
                                                  base_dtypes, extras, deltas_for(module_updates_, base_dtypes, module, q))
                pending.append((name, module))
            if raw is None:
                raw = build_header([(n, safetensors_dtype(computed[m][n]) if m else header.tensors[n].dtype,
                                     tuple(computed[m][n].shape) if m else header.tensors[n].shape) for n, m in pending],
                                   header.metadata or None)
            with StreamingWriter(staging / fname, raw, progress) as writer:
                for name, module in pending:
                    if module is None:
                        source = where[name]
                        t = source.tensors[name]
                        with open(source.path, "rb") as src:
                            writer.copy_range(src, source.data_start + t.begin, t.end - t.begin)
                        continue
                    naive = computed[module].pop(name)
                    mx.eval(naive)
                    data = tensor_bytes(naive)
                    if restore:
                        residual = restore.get(f"residual/{name}")
                        if residual is None:
                            raise InvalidAdapterError(f"restore data has no entry for {name}",
                                                      hint="the restore data is damaged; run 'adapterhub verify'")
                        width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[naive.dtype.size]
                        data = restore_data.decode(np.frombuffer(data, width), residual, "float" in str(naive.dtype)).tobytes()
                    comparison.add(name, data, naive)
                    writer.write(data)
                    if not computed[module]:
                        del computed[module]  # done: drop it and the fused tensors it was read from
                        for member in group_members(module, lazy, True):
                            lazy.pop(member, None)
                sha, size = writer.close()
            out_files.append({"name": fname, "sha256": sha, "size": size})
        _side_files(fused_dir, staging, restore)
        # As fingerprint_model hashes a folder: the proof of exactness is this equal to the base's sha256.
        sha = model_sha256(out_files, config_essentials(read_json(staging / "config.json") or {}))
    return comparison.report(out, sha, bool(restore))


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
    from ..safetensors_io import MLX_DTYPES

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


class _Comparison:
    """Measures the result against the base: exactly by fingerprint, or element by element without restore data."""

    def __init__(self, registry, record: dict | None, base: str | None):
        self.registry = registry
        self.base_record = None
        if base:
            self.base_record = registry.add_base(base)[0] if Path(base).expanduser().is_dir() else registry.base(base)
        elif record:
            try:
                self.base_record = registry.base(record["base"]["sha256"])
            except NotFoundError:
                self.base_record = None
        self.base_headers = {}
        if self.base_record and Path(self.base_record["path"]).is_dir():
            for p in weight_files(Path(self.base_record["path"])):
                self.base_headers.update({n: read_header(p) for n in read_header(p).tensors})
        self.inexact = self.total = 0
        self.max_error = 0.0

    def add(self, name: str, data: bytes, naive) -> None:
        header = self.base_headers.get(name)
        if header is None:
            return
        import numpy as np

        base_bits = read_bits(header, name).reshape(-1)
        ours = np.frombuffer(data, dtype=base_bits.dtype)
        differ = base_bits != ours
        self.inexact += int(differ.sum())
        self.total += differ.size
        if differ.any() and header.tensors[name].dtype in ("F32", "F16", "BF16"):
            from ..safetensors_io import read_tensor
            import mlx.core as mx

            error = mx.max(mx.abs(read_tensor(header, name).astype(mx.float32) - naive.astype(mx.float32))).item()
            self.max_error = max(self.max_error, error)

    def report(self, out: Path, sha: str, restored: bool) -> UnfuseReport:
        base = self.base_record
        if base is None:
            return UnfuseReport(str(out), None, None, sha, notes=["no registered base to compare with: exactness unknown"])
        if sha == base["sha256"]:
            return UnfuseReport(str(out), True, base["name"], sha, 0.0, 0.0,
                                notes=[f"every weight file matches base {base['name']} (sha256 {base['sha256'][:12]})"])
        fraction = self.inexact / self.total if self.total else None
        notes = ["restore data did not reproduce the base: it or the fused files changed"] if restored else [
            "no restore data: the updates were subtracted, which rounding makes inexact"]
        return UnfuseReport(str(out), False, base["name"], sha, fraction, self.max_error, notes)
