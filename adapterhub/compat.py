"""Adapter × base model compatibility, decided from headers and fingerprints before anything loads."""

from __future__ import annotations

import json
import re
from typing import NamedTuple

MAX_LISTED = 20
_FROM_LAYERS = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


class CompatReport(NamedTuple):
    """The verdict and every reason for it.

    verdict is one of: exact (same base weights and config), structural (the adapter records no
    base, shapes fit), quantized-variant, different-config (config.json's architecture fields
    differ from the adapter's base), different-weights, incompatible.
    """

    compatible: bool
    verdict: str
    adapter: str
    base: str
    # Tuples, not lists, as defaults: a NamedTuple's default is one object shared by every report.
    problems: list[str] | tuple = ()
    notes: list[str] | tuple = ()
    differing_files: list[str] | tuple = ()

    def to_dict(self) -> dict:
        return {
            "compatible": self.compatible, "verdict": self.verdict, "adapter": self.adapter, "base": self.base,
            "problems": list(self.problems), "notes": list(self.notes), "differing_files": list(self.differing_files),
        }

    def summary(self) -> str:
        listed = self.problems[:MAX_LISTED]
        extra = len(self.problems) - len(listed)
        lines = [f"{self.adapter} on {self.base}: {'compatible' if self.compatible else 'INCOMPATIBLE'} ({self.verdict})"]
        lines += [f"  ✗ {p}" for p in listed]
        if extra:
            lines.append(f"  … and {extra} more problems")
        lines += [f"  · {n}" for n in self.notes]
        return "\n".join(lines)


def _normalise(key: str) -> str:
    # Checkpoints name the same module with different prefixes (model., language_model.model., ...).
    match = _FROM_LAYERS.search(key)
    return match.group(1) if match else key


def _shown(value: object, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "…"


def config_changes(recorded: dict, current: dict) -> list[str]:
    """`field recorded → current` for each architecture field of config.json that differs, quantization aside.

    Only fields both hold are compared: a base registered before a field was fingerprinted
    says nothing about it, which is not the same as saying the field was absent (a fresh
    fingerprint holds every field, None when config.json lacks it).
    """
    return [f"{k} {_shown(recorded[k])} → {_shown(current[k])}"
            for k in sorted(recorded.keys() & current.keys()) if k != "quantization" and recorded[k] != current[k]]


def _logical_shape(module: str, tensors: dict[str, list], bits: int | None) -> tuple[int, ...] | None:
    """(in, out) of a base module as an adapter sees it, or (in, out, experts) for an expert layer; unpacks quantized weights."""
    info = tensors.get(module + ".weight")
    if info is None or len(info[1]) not in (2, 3):
        return None
    *experts, rows, cols = info[1]
    if module + ".scales" in tensors and bits:
        cols = cols * 32 // bits
    if experts:
        return cols, rows, experts[0]  # SwitchLinear: (experts, out, in)
    if "embed" in module.rsplit(".", 1)[-1]:
        return rows, cols  # embeddings: lora_a (num_embeddings, r), lora_b (r, dims)
    return cols, rows


def _shape_text(shape: tuple[int, ...]) -> str:
    text = f"in {shape[0]}, out {shape[1]}"
    return text + (f", {shape[2]} experts" if len(shape) == 3 else "")


class AdapterShape(NamedTuple):
    """What compatibility is decided on, on the adapter's side.

    modules: module path -> (in, out), or (in, out, experts) for an expert layer.
    layers: the decoder layers it touches.
    recorded_base: the base its record names ({name, sha256, structure_sha256, model_type}, plus that
        base's `config` when it is registered here), or None when it records none.
    recorded_base_files: that base's files, to say which differ.
    hidden_size: a LoReFT adapter's hidden size (it edits hidden states, not modules).
    """

    name: str
    modules: dict[str, tuple[int, ...]]
    layers: list[int]
    recorded_base: dict | None = None
    recorded_base_files: list[dict] | None = None
    hidden_size: int | None = None


def check(adapter: AdapterShape, base_name: str, base: dict, allow_different_weights: bool = False) -> CompatReport:
    """Decide whether an adapter fits a base model, given as its fingerprint (sha256, structure_sha256, config,
    tensors, files) and the name or path it was given by, for messages."""
    adapter_name, modules, layers, hidden_size = adapter.name, adapter.modules, adapter.layers, adapter.hidden_size
    adapter_base, adapter_base_files = adapter.recorded_base, adapter.recorded_base_files
    config = base["config"]
    quant = config.get("quantization") or {}
    by_normal = {_normalise(k.removesuffix(".weight")): k.removesuffix(".weight")
                 for k in base["tensors"] if k.endswith(".weight")}
    problems: list[str] = []
    total_layers = config.get("num_hidden_layers")
    if total_layers is not None:
        beyond = [i for i in layers if i >= total_layers]
        if beyond:
            problems.append(f"adapter touches layer(s) {', '.join(map(str, beyond))} but the base has {total_layers} layers (0–{total_layers - 1})")
    if hidden_size is not None and config.get("hidden_size") not in (None, hidden_size):
        problems.append(f"LoReFT interventions have hidden size {hidden_size} but the base's is {config['hidden_size']}")
    for module, wanted in sorted(modules.items()):
        base_module = by_normal.get(_normalise(module))
        if base_module is None:
            problems.append(f"module {module} is missing from the base")
            continue
        # mlx-lm may quantize some modules at another width (qwen3_moe keeps its routers at 8 bits).
        override = (quant.get("modules") or {}).get(base_module)
        bits = override.get("bits") if isinstance(override, dict) else quant.get("bits")
        shape = _logical_shape(base_module, base["tensors"], bits)
        if shape is None:
            problems.append(f"module {module} is not a linear or expert layer's weight in the base")
        elif len(shape) != len(wanted):
            what = "an expert layer (one update per expert)" if len(wanted) == 3 else "a single linear layer"
            where = "an expert layer" if len(shape) == 3 else "a single linear layer"
            problems.append(f"module {module}: the adapter updates it as {what}, but in the base it is {where}")
        elif shape != tuple(wanted):
            problems.append(f"module {module}: adapter expects ({_shape_text(tuple(wanted))}), base has ({_shape_text(shape)})")
    report = dict(adapter=adapter_name, base=base_name)
    if problems:
        return CompatReport(False, "incompatible", problems=problems, **report)
    if adapter_base is None:
        return CompatReport(True, "structural", notes=["the adapter records no base model; only shapes were checked"], **report)
    # The fingerprint's config when the adapter's base is registered here; else only what the version itself records.
    recorded_config = adapter_base.get("config")
    known_config = recorded_config is not None
    if recorded_config is None:
        recorded_config = {"model_type": adapter_base["model_type"]} if adapter_base.get("model_type") is not None else {}
    changed = config_changes(recorded_config, config)
    label = adapter_base.get("name") or adapter_base["sha256"][:12]
    recorded_files = {f["name"]: f["sha256"] for f in adapter_base_files or []}
    current_files = {f["name"]: f["sha256"] for f in base["files"]}
    same_quant = recorded_config.get("quantization") == config.get("quantization")
    if not changed and adapter_base["sha256"] == base["sha256"]:
        return CompatReport(True, "exact", notes=["same base weights and config.json the adapter was registered with"], **report)
    if not changed and known_config and recorded_files and recorded_files == current_files and same_quant:
        # A base fingerprinted before config.json counted toward its sha256: the same files and every config
        # field it recorded. Fields it never recorded cannot be compared, and the report says so.
        unrecorded = sorted(config.keys() - recorded_config.keys())
        notes = ["same base weights and config.json the adapter was registered with"]
        if unrecorded:
            listed = ", ".join(unrecorded[:3]) + (", …" if len(unrecorded) > 3 else "")
            notes.append(f"its base was registered before {len(unrecorded)} more config.json fields ({listed}) "
                         "counted toward a model's identity: those were not compared")
        return CompatReport(True, "exact", notes=notes, **report)
    if changed:
        what = f"config.json differs from the adapter's base {label}: {', '.join(changed)}"
        if allow_different_weights:
            return CompatReport(True, "different-config", notes=[f"{what}; results are unpredictable"], **report)
        return CompatReport(False, "different-config", problems=[
            f"{what}; a different model although the shapes fit (pass --allow-different-weights to accept)"], **report)
    if adapter_base["structure_sha256"] == base["structure_sha256"]:
        differing = sorted(name for name in current_files.keys() | recorded_files.keys()
                           if recorded_files.get(name) != current_files.get(name))
        what = f"weights differ from the adapter's base {label} in {', '.join(differing) or 'some files'}"
        if allow_different_weights:
            return CompatReport(True, "different-weights", notes=[f"same structure; {what}"], differing_files=differing, **report)
        return CompatReport(False, "different-weights", differing_files=differing,
                            problems=[f"same structure but {what} (pass --allow-different-weights to accept)"], **report)
    if not same_quant:
        q = config.get("quantization")
        state = f"{q['bits']}-bit quantized (group size {q['group_size']})" if q else "not quantized"
        return CompatReport(True, "quantized-variant", notes=[
            f"the base is a {state} variant of the adapter's base model; outputs differ slightly from the original"], **report)
    if allow_different_weights:
        return CompatReport(True, "different-weights", notes=["a different model whose shapes fit; results are unpredictable"], **report)
    return CompatReport(False, "different-weights", problems=[
        "a different model from the adapter's base (structure differs) although the shapes fit (pass --allow-different-weights to accept)"], **report)
