"""The math of fusing low-rank updates into base weights, forwards and back.

Forwards is exactly mlx-lm's `LoRALinear.fuse` / `DoRALinear.fuse`, operation
for operation, so the results are bit-identical to what `mlx_lm.fuse` writes.
Backwards (`naive_base`) is the deterministic inverse that rounding makes
inexact; restore data is the XOR between it and the true base, so
`naive_base(...) ^ restore == base` exactly.

Everything here builds lazy MLX graphs: nothing is computed until a caller
evaluates one module's outputs, so memory stays near one tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import IncompatibleError

_FROM_LAYERS = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


@dataclass(frozen=True)
class Update:
    """One adapter's low-rank update of one module, as mlx-lm holds it."""

    ref: str
    kind: str
    scale: float
    lora_a: mx.array  # (in, r); an expert layer's: (experts, r, in)
    lora_b: mx.array  # (r, out); an expert layer's: (experts, out, r)
    m: mx.array | None = None  # DoRA magnitude, (out,)

    def delta(self, dtype) -> mx.array:
        if self.lora_a.ndim == 3:
            # LoRASwitchLinear.fuse, operation for operation: each expert's W += (scale * B_e) @ A_e.
            return ((self.scale * self.lora_b) @ self.lora_a).astype(dtype)
        b_t, a_t = self.scale * self.lora_b.T, self.lora_a.T
        if mx.default_device() == mx.cpu:
            # The same product with its operands laid out row-major, which the CPU's BLAS walks in
            # memory order (3x faster at 3072x3072). Same bits: MLX makes one sgemm call (alpha 1,
            # beta 0) whose every element is the sum over the rank, in rank order, of the same
            # products, whatever the operands' layout; tests/test_fuse.py checks it against mlx-lm.
            # Other devices get mlx-lm's expression verbatim: a GPU may pick kernels by layout.
            b_t, a_t = mx.contiguous(b_t), mx.contiguous(a_t)
        return (b_t @ a_t).astype(dtype)


@dataclass(frozen=True)
class Quantization:
    group_size: int
    bits: int
    mode: str = "affine"


def _normalise(key: str) -> str:
    match = _FROM_LAYERS.search(key)
    return match.group(1) if match else key


def module_updates(adapters: list[tuple[str, str, float, Path]], base_tensors: dict[str, list]) -> dict[str, list[Update]]:
    """Base module path -> the updates of every adapter that touches it, in the order given.

    Args:
        adapters: (ref, kind, scale, weights file) per adapter.
        base_tensors: the base's tensor name -> [dtype, shape].
    """
    by_normal = {_normalise(k[: -len(".weight")]): k[: -len(".weight")] for k in base_tensors if k.endswith(".weight")}
    updates: dict[str, list[Update]] = {}
    for ref, kind, scale, path in adapters:
        weights = mx.load(str(path), format="safetensors")
        for key in sorted(k for k in weights if k.endswith(".lora_a")):
            module = key[: -len(".lora_a")]
            base_module = by_normal.get(_normalise(module))
            if base_module is None:
                raise IncompatibleError(f"{ref} updates {module}, which the base does not have", hint=f"run 'adapterhub check {ref} --base ...'")
            if "embed" in base_module.rsplit(".", 1)[-1]:
                raise IncompatibleError(f"{ref} has a LoRA on the embedding {base_module}; fusing embedding LoRA is not supported",
                                        hint="load the adapter at run time instead of fusing it")
            updates.setdefault(base_module, []).append(
                Update(ref, kind, scale, weights[key], weights[module + ".lora_b"], weights.get(module + ".m")))
    for module, ups in updates.items():
        if len(ups) > 1 and any(u.kind == "dora" for u in ups):
            raise IncompatibleError(f"{module} is updated by several adapters including a DoRA one ({', '.join(u.ref for u in ups)})",
                                    hint="DoRA renormalises the weight, so its update does not add to others; fuse it alone")
    return updates


def quantization_for(module: str, config_quantization: dict | None) -> Quantization | None:
    """The quantization of one module, honouring per-module overrides in config.json."""
    if not config_quantization:
        return None
    override = config_quantization.get(module)
    if override is False:
        return None
    q = override if isinstance(override, dict) else config_quantization
    return Quantization(q["group_size"], q["bits"], q.get("mode", "affine"))


def group_members(module: str, base_tensors: dict, quantized: bool) -> list[str]:
    """The base tensors a module's fused weight is computed from."""
    names = [f"{module}.weight"]
    if quantized:
        names += [f"{module}.scales"] + ([f"{module}.biases"] if f"{module}.biases" in base_tensors else [])
    return names


def _dequantized(tensors: dict[str, mx.array], module: str, q: Quantization | None) -> mx.array:
    weight = tensors[f"{module}.weight"]
    if q is None:
        return weight
    return mx.dequantize(weight, tensors[f"{module}.scales"], tensors.get(f"{module}.biases"),
                         group_size=q.group_size, bits=q.bits, mode=q.mode)


def _quantized(weight: mx.array, module: str, q: Quantization) -> dict[str, mx.array]:
    parts = mx.quantize(weight, q.group_size, q.bits, mode=q.mode)
    out = {f"{module}.weight": parts[0], f"{module}.scales": parts[1]}
    if len(parts) > 2:
        out[f"{module}.biases"] = parts[2]
    return out


def deltas_for(updates: list[Update], base_dtypes: dict[str, object], module: str, q: Quantization | None) -> list[mx.array]:
    """Each update's delta in the dtype mlx-lm adds it in: the base weight's, dequantized if need be.

    Computed once and shared by fuse and its inverse: the same expression gives
    the same bits, and the matmul is the costly part.
    """
    dtype = base_dtypes[f"{module}.scales"] if q is not None else base_dtypes[f"{module}.weight"]
    return [u.delta(dtype) for u in updates]


def fuse_module(module: str, tensors: dict[str, mx.array], updates: list[Update], q: Quantization | None,
                dequantize: bool, deltas: list[mx.array]) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """Fused outputs of one module, and the extras its inverse needs (DoRA row norms).

    With no updates this only dequantizes (for `--dequantize` on an untouched layer).
    """
    weight = _dequantized(tensors, module, q)
    extras: dict[str, mx.array] = {}
    for update, delta in zip(updates, deltas):
        weight = weight + delta
        if update.m is not None:
            norms = mx.linalg.norm(weight, axis=1)
            extras[f"{module}.dora_norms"] = norms
            weight = (update.m / norms)[:, None] * weight
    if q is not None and not dequantize:
        return _quantized(weight, module, q), extras
    return {f"{module}.weight": weight}, extras


def naive_base(module: str, fused: dict[str, mx.array], updates: list[Update], q: Quantization | None, dequantized: bool,
               base_dtypes: dict[str, object], extras: dict[str, mx.array], deltas: list[mx.array]) -> dict[str, mx.array]:
    """The base tensors recomputed from fused ones: exact up to rounding, which restore data corrects."""
    weight = fused[f"{module}.weight"] if (q is None or dequantized) else _dequantized(fused, module, q)
    original = base_dtypes[f"{module}.scales"] if q is not None else base_dtypes[f"{module}.weight"]
    for update, delta in zip(reversed(updates), reversed(deltas)):
        if update.m is not None:
            norms = extras.get(f"{module}.dora_norms")
            if norms is None:
                raise IncompatibleError(f"{module} was fused from DoRA adapter {update.ref} without restore data",
                                        hint="DoRA cannot be unfused without the row norms kept in restore data")
            weight = (weight * (norms / update.m)[:, None]).astype(original)
        weight = weight - delta
    weight = weight.astype(original)
    if q is not None:
        out = _quantized(weight, module, q)
        return {k: v.astype(base_dtypes[k]) for k, v in out.items()}
    return {f"{module}.weight": weight}
