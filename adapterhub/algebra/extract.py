"""extract: recover a LoRA from a fused model by truncated SVD of `fused - base`."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AdapterHubError, IncompatibleError
from .. import ranges
from ..fingerprint import weight_files
from ..safetensors_io import read_bits, read_header, read_tensor
from ..store import read_json
from ..registry import RECORD_FILE
from .fusion import quantization_for
from .lowrank import truncated_dense, write_mlx_adapter

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")


@dataclass
class ExtractReport:
    rank: int
    relative_error: dict[str, float] = field(default_factory=dict)
    not_representable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _float_weight(headers: dict, name: str, config_quant: dict | None):
    """A linear (out, in) or expert (experts, out, in) weight as float32 numpy, dequantized when quantized."""
    import mlx.core as mx

    module = name[: -len(".weight")]
    weight = read_tensor(headers[name], name)
    if module + ".scales" in headers:
        q = quantization_for(module, config_quant)
        biases = read_tensor(headers[module + ".biases"], module + ".biases") if module + ".biases" in headers else None
        weight = mx.dequantize(weight, read_tensor(headers[module + ".scales"], module + ".scales"), biases,
                               group_size=q.group_size, bits=q.bits, mode=q.mode)
    return np.array(weight.astype(mx.float32))


def _logical_shape(headers: dict, name: str, config_quant: dict | None) -> tuple[int, int]:
    *_, rows, cols = headers[name].tensors[name].shape
    module = name[: -len(".weight")]
    if module + ".scales" in headers:
        cols = cols * 32 // quantization_for(module, config_quant).bits
    return rows, cols


def _padded(lora_a: np.ndarray, lora_b: np.ndarray, error: float, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Factors of a smaller rank, zero-filled to `rank`: the same update, in the one rank mlx-lm loads."""
    missing = rank - lora_a.shape[1]
    return np.pad(lora_a, ((0, 0), (0, missing))), np.pad(lora_b, ((0, missing), (0, 0))), error


def extract(registry, base: str, fused_dir: Path, rank: int, name: str, tags: dict | None = None,
            description: str | None = None):
    """Register the best rank-R LoRA that turns `base` into `fused_dir`; returns (version, report)."""
    ranges.require("--rank", rank, ranges.COUNT, hint="pass e.g. --rank 16")
    fused_dir = Path(fused_dir)
    base_fp, _ = registry.resolve_base(base)
    base_path = Path(base_fp["path"])
    fused_fp = registry.resolve_base(fused_dir)[0] if (fused_dir / "config.json").exists() else None
    if fused_fp is None:
        raise AdapterHubError(f"{fused_dir} is not a model folder", hint="give the folder fuse wrote")
    if base_fp["sha256"] == fused_fp["sha256"]:
        raise AdapterHubError("the fused model is identical to the base: there is nothing to extract", hint="check --fused")
    base_headers = {n: h for p in weight_files(base_path) for h in [read_header(p)] for n in h.tensors}
    fused_headers = {n: h for p in weight_files(fused_dir) for h in [read_header(p)] for n in h.tensors}
    base_quant = (read_json(base_path / "config.json") or {}).get("quantization")
    fused_quant = (read_json(fused_dir / "config.json") or {}).get("quantization")
    differing, report = [], ExtractReport(rank)
    for tensor in sorted(t for t in base_headers if t.endswith(".weight") or "." not in t):
        if tensor not in fused_headers:
            raise IncompatibleError(f"the fused model lacks {tensor}: it was not made from this base", hint="check --base")
        module = tensor[: -len(".weight")]
        group = [n for n in (tensor, module + ".scales", module + ".biases") if n in base_headers]
        if all(n in fused_headers and np.array_equal(read_bits(base_headers[n], n), read_bits(fused_headers[n], n)) for n in group):
            continue
        if (module + ".scales" in base_headers) != (module + ".scales" in fused_headers) and np.array_equal(
                _float_weight(base_headers, tensor, base_quant), _float_weight(fused_headers, tensor, fused_quant)):
            continue  # stored differently (a --dequantize fuse of a quantized base), the same values: untouched
        # 2-D: a linear layer; 3-D: the stacked experts of a mixture-of-experts layer (mlx-lm's SwitchLinear).
        if _LAYER.search(tensor) and len(base_headers[tensor].tensors[tensor].shape) in (2, 3):
            differing.append(tensor)
        else:
            report.not_representable.append(tensor)
    report.not_representable += sorted(t for t in base_headers if not t.endswith((".weight", ".scales", ".biases"))
                                       and t in fused_headers and not np.array_equal(read_bits(base_headers[t], t), read_bits(fused_headers[t], t)))
    if not differing:
        raise AdapterHubError("no linear layer weight differs between the two models", hint="nothing a LoRA could express")
    # mlx-lm gives every module one rank. A matrix smaller than it (a mixture-of-experts router has one row
    # per expert) holds its whole update in fewer components, and zero factors fill the rest; only a rank
    # beyond every matrix is lowered, as it could add nothing.
    report.rank = rank = min(rank, max(min(_logical_shape(fused_headers, t, fused_quant)) for t in differing))
    weights: dict[str, np.ndarray] = {}
    for tensor in differing:
        delta = _float_weight(fused_headers, tensor, fused_quant) - _float_weight(base_headers, tensor, base_quant)
        module = tensor[: -len(".weight")]
        if delta.ndim == 3:
            # One update per expert, in mlx-lm's LoRASwitchLinear layout: lora_a (experts, r, in), lora_b (experts, out, r).
            parts = [_padded(*truncated_dense(d, rank), rank) for d in delta]
            weights[module + ".lora_a"] = np.stack([a.T for a, _, _ in parts])
            weights[module + ".lora_b"] = np.stack([b.T for _, b, _ in parts])
            energy = np.sum(delta.astype(np.float64) ** 2, axis=(1, 2))
            total = float(energy.sum())
            # The module's relative error over all its experts: sqrt(sum of lost energy / total energy).
            report.relative_error[module] = float(np.sqrt(sum(e ** 2 * w for (_, _, e), w in zip(parts, energy)) / total)) if total > 0 else 0.0
            continue
        lora_a, lora_b, error = _padded(*truncated_dense(delta, rank), rank)
        weights[module + ".lora_a"], weights[module + ".lora_b"] = lora_a, lora_b
        report.relative_error[module] = error
    matches = [_LAYER.search(t) for t in differing]
    keys = sorted({m.group(2) for m in matches})
    num_layers = base_fp["config"]["num_hidden_layers"] - min(int(m.group(1)) for m in matches)
    record = read_json(fused_dir / RECORD_FILE)
    fused_sha = record["sha256"] if record else fused_fp["sha256"]
    with tempfile.TemporaryDirectory(prefix="adapterhub-extract-") as tmp:
        folder = write_mlx_adapter(Path(tmp) / "adapter", weights, rank, 1.0, num_layers, keys)
        parents = [{"ref": str(fused_dir.resolve()), "sha256": fused_sha, "relation": "extracted-from"}]
        version, _ = registry.import_adapter(folder, name, base=str(base_path), tags=tags, parents=parents,
                                             description=description or f"rank-{rank} extraction from {fused_dir.name}")
    return version, report
