"""stack: several adapters into one that plain mlx-lm loads.

cat is exact: ranks add, and each source's scale and weight are folded into
its lora_b, so the stacked update is exactly the weighted sum. linear mixes
equal-rank factors the way PEFT's `add_weighted_adapter` does, which is an
approximation (cross terms); svd factors the exact weighted sum to rank R.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import AdapterHubError, IncompatibleError
from .. import ranges
from ..formats.mlx import lora_config
from ..records import ParentEdge
from .fuse import refuse_related
from .lowrank import truncated

METHODS = ("cat", "linear", "svd")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass
class StackReport:
    method: str
    rank: int
    weights: list[float]
    per_module: dict[str, float] = field(default_factory=dict)  # svd: energy kept; linear: relative error
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _factors(registry, version) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import mlx.core as mx

    weights = mx.load(str(registry.weights(version)), format="safetensors")
    return {k[: -len(".lora_a")]: (np.array(weights[k].astype(mx.float32)), np.array(weights[k[:-1] + "b"].astype(mx.float32)))
            for k in weights if k.endswith(".lora_a")}


def _frobenius_sq(left: np.ndarray, right: np.ndarray) -> float:
    """||left @ right||² from the factors alone."""
    return float(np.sum((left.T @ left) * (right @ right.T)))


def _combine(method: str, rank: int | None, coefficients, roots, signs, versions, raw: list) -> tuple:
    """One linear layer's stacked factors (lora_a (in, R), lora_b (R, out)) and the method's measure (or None).

    `raw` holds each source's (lora_a, lora_b), or None where a source does not touch the layer.
    """
    n_in, n_out = next((a.shape[0], b.shape[1]) for a, b in (r for r in raw if r is not None))
    # An adapter that does not touch this module contributes zero factors of its own rank.
    raw = [r if r is not None else (np.zeros((n_in, v.record["rank"]), np.float32), np.zeros((v.record["rank"], n_out), np.float32))
           for r, v in zip(raw, versions)]
    cat_a = np.concatenate([a for a, _ in raw], axis=1)
    cat_b = np.concatenate([c * b for c, (_, b) in zip(coefficients, raw)], axis=0)
    if method == "cat":
        return cat_a, cat_b, None
    if method == "svd":
        return truncated(cat_b.T, cat_a.T, rank)
    lora_a = sum(r * a for r, (a, _) in zip(roots, raw))
    lora_b = sum(s * r * b for s, r, (_, b) in zip(signs, roots, raw))
    exact = _frobenius_sq(cat_b.T, cat_a.T)
    error = _frobenius_sq(np.concatenate([lora_b.T, -cat_b.T], axis=1), np.concatenate([lora_a.T, cat_a.T], axis=0))
    return lora_a, lora_b, float(np.sqrt(error / exact)) if exact > 0 else 0.0


def stack(registry, refs: list[str], name: str, weights: list[float] | None = None, method: str = "cat",
          rank: int | None = None, tags: dict | None = None, description: str | None = None):
    """Combine adapters into a new version of `name`; returns (version, report)."""
    if method not in METHODS:
        raise AdapterHubError(f"unknown stack method '{method}'", hint=f"use one of {', '.join(METHODS)}")
    # Checked before anything is read: numpy would take a negative rank as "all but the last few".
    if rank is not None:
        ranges.require("--rank", rank, ranges.COUNT, hint="pass e.g. --rank 16")
    for w in weights or ():
        ranges.require("--weights", w, ranges.WEIGHT, floating=True, hint="give one finite weight per adapter, e.g. --weights 0.5,1")
    versions = [registry.resolve(r) for r in refs]
    if len(versions) < 2:
        raise AdapterHubError("stack needs at least two adapters", hint="list two or more refs")
    weights = list(weights) if weights else [1.0] * len(versions)
    if len(weights) != len(versions):
        raise AdapterHubError(f"{len(weights)} weights for {len(versions)} adapters", hint="give one weight per adapter")
    refuse_related(registry, versions, "stacking them")
    for v in versions:
        if v.record["kind"] == "dora":
            raise IncompatibleError(f"{v.ref} is a DoRA adapter: DoRA renormalises each weight row by a learned magnitude, "
                                    "so its update is not a low-rank term that adds to others", hint="fuse it on its own instead")
    bases = {(v.record["base"] or {}).get("sha256") for v in versions}
    if None in bases or len(bases) != 1:
        listing = ", ".join(f"{v.ref} on {(v.record['base'] or {}).get('name', 'an unknown base')}" for v in versions)
        raise IncompatibleError(f"stacked adapters must share one recorded base ({listing})",
                                hint="stack adapters trained on the same base model")
    ranks = {v.record["rank"] for v in versions}
    if method == "linear" and len(ranks) != 1:
        raise IncompatibleError(f"linear stacking needs equal ranks, got {sorted(ranks)}", hint="use --method cat or svd")
    if method == "svd" and not rank:
        raise AdapterHubError("--method svd needs --rank R", hint="pass the rank of the result, e.g. --rank 16")
    base = registry.base(bases.pop())

    factors = [_factors(registry, v) for v in versions]
    coefficients = [w * v.record["scale"] for w, v in zip(weights, versions)]
    modules = sorted(set().union(*factors))
    report = StackReport(method, 0, weights)
    out_weights: dict[str, np.ndarray] = {}
    roots = np.sqrt(np.abs(coefficients))
    signs = np.where(np.array(coefficients) < 0, -1.0, 1.0)
    for module in modules:
        experts = {f[module][0].shape[0] for f in factors if module in f and f[module][0].ndim == 3}
        if experts and (len(experts) > 1 or any(module in f and f[module][0].ndim != 3 for f in factors)):
            raise IncompatibleError(f"the adapters disagree on {module}: some update it as an expert layer "
                                    f"with {sorted(experts)} experts, others differently", hint="stack adapters of one base model")
        if experts:
            # An expert layer holds one independent update per expert: each is stacked as a linear layer's would be.
            count = experts.pop()
            per_expert = [_combine(method, rank, coefficients, roots, signs, versions,
                                   [(f[module][0][e].T, f[module][1][e].T) if module in f else None for f in factors])
                          for e in range(count)]
            out_weights[module + ".lora_a"] = np.stack([a.T for a, _, _ in per_expert])
            out_weights[module + ".lora_b"] = np.stack([b.T for _, b, _ in per_expert])
            measures = [m for _, _, m in per_expert if m is not None]
            if measures:  # the worst expert speaks for the module
                report.per_module[module] = min(measures) if method == "svd" else max(measures)
            continue
        lora_a, lora_b, measure = _combine(method, rank, coefficients, roots, signs, versions,
                                           [f.get(module) for f in factors])
        if measure is not None:
            report.per_module[module] = measure
        out_weights[module + ".lora_a"], out_weights[module + ".lora_b"] = lora_a, lora_b
    report.rank = out_weights[modules[0] + ".lora_a"].shape[1]  # (in, R), or (experts, R, in)
    if method == "linear":
        report.notes.append("linear mixes the factors, not the updates: an approximation (relative error per module in per_module)")
    layers = sorted({int(m.group(1)) for m in map(_LAYER.search, modules) if m})
    keys = sorted({m.group(2) for m in map(_LAYER.search, modules) if m})
    num_layers = base["config"]["num_hidden_layers"] - layers[0] if layers else 0
    parents = [ParentEdge(v.ref, v.sha256, "stacked-from", w).to_dict() for v, w in zip(versions, weights)]
    text = description or f"{method} stack of " + ", ".join(f"{v.ref}×{w:g}" for v, w in zip(versions, weights))
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out_weights.items()}
    version, _ = registry.add_version(name, tensors, lora_config(report.rank, 1.0, num_layers, keys), base=base["name"],
                                      tags=tags, description=text, parents=parents)
    return version, report

