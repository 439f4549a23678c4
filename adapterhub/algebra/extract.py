"""extract: recover a LoRA from a fused model by truncated SVD of `fused - base`.

A pipeline too: the two models are compared tensor by tensor in large blocks on
worker threads (reads release the GIL), then each differing weight is read and
dequantized here while the previous one's SVD runs on a worker thread.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AdapterHubError, IncompatibleError
from .. import naming, ranges
from ..files import read_json
from ..fingerprint import weight_files
from ..formats.mlx import lora_config
from ..records import RECORD_FILE, ParentEdge
from ..safetensors_io import CHUNK, Header, read_header, read_tensor
from .fusion import quantization_for
from .lowrank import truncated_dense

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


_buffers = threading.local()


def _same_bytes(a: Header, b: Header, name: str) -> bool:
    """Whether two files hold the same bytes for tensor `name`, compared in blocks read into buffers this thread reuses."""
    ta, tb = a.tensors[name], b.tensors[name]
    if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
        return False
    if not hasattr(_buffers, "pair"):
        _buffers.pair = (bytearray(CHUNK), bytearray(CHUNK))
    left, right = _buffers.pair
    with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
        done, length = 0, ta.end - ta.begin
        while done < length:
            n = min(CHUNK, length - done)
            got = (os.preadv(fa.fileno(), [memoryview(left)[:n]], a.data_start + ta.begin + done),
                   os.preadv(fb.fileno(), [memoryview(right)[:n]], b.data_start + tb.begin + done))
            if got != (n, n):
                return False  # a truncated file: not the same tensor
            if not ((left == right) if n == CHUNK else (left[:n] == right[:n])):
                return False
            done += n
    return True


def _identical(base_headers: dict, fused_headers: dict) -> dict[str, bool]:
    """Tensor name -> whether both models hold it with the same bytes, for every tensor they share."""
    names = sorted(n for n in base_headers if n in fused_headers)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        same = pool.map(lambda n: _same_bytes(base_headers[n], fused_headers[n], n), names)
        return dict(zip(names, same))


def _factors(delta: np.ndarray, rank: int):
    """On the worker thread: a linear layer's padded factors, or an expert layer's list of them (numpy releases the GIL)."""
    if delta.ndim == 3:
        return [_padded(*truncated_dense(d, rank), rank) for d in delta], np.sum(delta.astype(np.float64) ** 2, axis=(1, 2))
    return _padded(*truncated_dense(delta, rank), rank), None


def _collect(module: str, future, weights: dict, report: ExtractReport) -> None:
    factors, energy = future.result()
    if energy is None:
        weights[module + ".lora_a"], weights[module + ".lora_b"], report.relative_error[module] = factors
        return
    # One update per expert, in mlx-lm's LoRASwitchLinear layout: lora_a (experts, r, in), lora_b (experts, out, r).
    weights[module + ".lora_a"] = np.stack([a.T for a, _, _ in factors])
    weights[module + ".lora_b"] = np.stack([b.T for _, b, _ in factors])
    total = float(energy.sum())
    # The module's relative error over all its experts: sqrt(sum of lost energy / total energy).
    report.relative_error[module] = float(np.sqrt(sum(e ** 2 * w for (_, _, e), w in zip(factors, energy)) / total)) if total > 0 else 0.0


def extract(registry, base: str, fused_dir: Path, rank: int, name: str, tags: dict | None = None,
            description: str | None = None):
    """Register the best rank-R LoRA that turns `base` into `fused_dir`; returns (version, report)."""
    ranges.require("--rank", rank, ranges.COUNT, hint="pass e.g. --rank 16")
    fused_dir = Path(fused_dir)
    resolved = registry.resolve_base(base, need_files=True)
    base_fp, base_path = resolved.fingerprint, resolved.path
    # The name is checked as the import at the end will check it, before minutes of SVDs rather than after.
    naming.check_tags(dict(tags or {}))
    naming.check_name(name, registry.policy, dict(tags or {}), resolved.name or naming.suggest_name(base_path.resolve().name))
    fused_fp = registry.resolve_base(fused_dir).fingerprint if (fused_dir / "config.json").exists() else None
    if fused_fp is None:
        raise AdapterHubError(f"{fused_dir} is not a model folder", hint="give the folder fuse wrote")
    if base_fp["sha256"] == fused_fp["sha256"]:
        raise AdapterHubError("the fused model is identical to the base: there is nothing to extract", hint="check --fused")
    base_headers = {n: h for p in weight_files(base_path) for h in [read_header(p)] for n in h.tensors}
    fused_headers = {n: h for p in weight_files(fused_dir) for h in [read_header(p)] for n in h.tensors}
    base_quant = (read_json(base_path / "config.json") or {}).get("quantization")
    fused_quant = (read_json(fused_dir / "config.json") or {}).get("quantization")
    differing, report = [], ExtractReport(rank)
    same = _identical(base_headers, fused_headers)
    for tensor in sorted(t for t in base_headers if t.endswith(".weight") or "." not in t):
        if tensor not in fused_headers:
            raise IncompatibleError(f"the fused model lacks {tensor}: it was not made from this base", hint="check --base")
        module = tensor[: -len(".weight")]
        group = [n for n in (tensor, module + ".scales", module + ".biases") if n in base_headers]
        if all(same.get(n, False) for n in group):
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
                                       and t in fused_headers and not same[t])
    if not differing:
        raise AdapterHubError("no linear layer weight differs between the two models", hint="nothing a LoRA could express")
    # mlx-lm gives every module one rank. A matrix smaller than it (a mixture-of-experts router has one row
    # per expert) holds its whole update in fewer components, and zero factors fill the rest; only a rank
    # beyond every matrix is lowered, as it could add nothing.
    report.rank = rank = min(rank, max(min(_logical_shape(fused_headers, t, fused_quant)) for t in differing))
    weights: dict[str, np.ndarray] = {}
    # Each difference is read and dequantized here (MLX) while the previous one's SVD runs on the worker.
    with ThreadPoolExecutor(max_workers=1) as worker:
        previous = None
        for tensor in differing:
            delta = _float_weight(fused_headers, tensor, fused_quant) - _float_weight(base_headers, tensor, base_quant)
            current = (tensor[: -len(".weight")], worker.submit(_factors, delta, rank))
            if previous:
                _collect(*previous, weights, report)
            previous = current
        _collect(*previous, weights, report)
    matches = [_LAYER.search(t) for t in differing]
    keys = sorted({m.group(2) for m in matches})
    num_layers = base_fp["config"]["num_hidden_layers"] - min(int(m.group(1)) for m in matches)
    record = read_json(fused_dir / RECORD_FILE)
    fused_sha = record["sha256"] if record else fused_fp["sha256"]
    parents = [ParentEdge(str(fused_dir.resolve()), fused_sha, "extracted-from").to_dict()]
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    version, _ = registry.add_version(name, tensors, lora_config(rank, 1.0, num_layers, keys), base=str(base_path),
                                      tags=tags, parents=parents,
                                      description=description or f"rank-{rank} extraction from {fused_dir.name}")
    return version, report
