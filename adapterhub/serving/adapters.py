"""Adapters in memory: loaded from the registry's object store on first use, kept in a least-recently-used
cache of a fixed size, never evicted while a request is using them.

Loading reads the weights through `registry.weights(version)`, which re-hashes the blob first, and
builds mlx-lm's own layer for every module the adapter updates around the base's module (no copy of
the base); the router (layers.py) gets the layers and, for plain linear modules, the update tables of
the mixed path. A LoReFT adapter gets mlx-lm-style wrapped decoder layers (loreft.LoReFTLayer) that
the runner puts in place for its prompt only.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from ..errors import IncompatibleError
from ..records import CONFIG_FILE, AdapterVersion
from .layers import AdapterRouter, linear_update

_INTERVENTION_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(interventions\..+)$")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # what mlx-lm's load_adapters accepts from an adapter file


def cache_key(version: AdapterVersion) -> tuple[str, str]:
    """Weights and config together: the same tensors under another scale or kind are another adapter."""
    return version.sha256, version.file_sha(CONFIG_FILE)


@dataclass
class ResidentAdapter:
    """An adapter in memory on one base: its router slot, and how its rows may be batched."""

    version: AdapterVersion
    slot: int
    mixable: bool  # its rows decode in batches with other adapters' rows
    dora: bool = False
    interventions: dict[int, nn.Module] = field(default_factory=dict)  # LoReFT: decoder layer -> wrapped layer
    pins: int = 0  # requests using it now

    @property
    def key(self) -> tuple[str, str]:
        return cache_key(self.version)

    @property
    def row_slot(self) -> int:
        """The slot its rows read while decoding: LoReFT edits the prompt only, so it decodes as the base."""
        return 0 if self.interventions else self.slot


def _mlx_lm_layer(base: nn.Module, kind: str, rank: int, scale: float, path: str) -> nn.Module:
    """The layer `mlx_lm.load(adapter_path=...)` would put at `path` (tuner.utils.linear_to_lora_layers' choice)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    dora = kind == "dora"
    if not dora and hasattr(base, "to_lora"):
        return base.to_lora(r=rank, scale=scale, dropout=0.0)
    if isinstance(base, (nn.Linear, nn.QuantizedLinear)):
        layer = DoRALinear if dora else LoRALinear
    elif isinstance(base, (SwitchLinear, QuantizedSwitchLinear)) and not dora:
        layer = LoRASwitchLinear
    elif isinstance(base, (nn.Embedding, nn.QuantizedEmbedding)):
        layer = DoRAEmbedding if dora else LoRAEmbedding
    else:
        raise IncompatibleError(f"module {path} of the base is a {type(base).__name__}, which mlx-lm has no "
                                f"{kind.upper()} layer for", hint="serve this adapter on the base it was trained on")
    return layer.from_base(base, r=rank, scale=scale, dropout=0.0)


def _module_weights(version: AdapterVersion, weights: dict[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in ADAPTER_LEAVES:
            raise IncompatibleError(f"{version.ref} has a tensor '{key}' that is not a LoRA or DoRA parameter",
                                    hint=f"run 'adapterhub audit {version.ref}'")
        modules.setdefault(path, {})[leaf] = value
    return modules


def load_adapter(registry, version: AdapterVersion, router: AdapterRouter, slot: int) -> ResidentAdapter:
    """Read `version`'s weights (hash-checked) and put them in `slot` of the base behind `router`."""
    weights = mx.load(str(registry.weights(version)), format="safetensors")
    if version.kind == "loreft":
        return _load_loreft(version, weights, router.model, slot)
    layers, updates = {}, {}
    for path, tensors in _module_weights(version, weights).items():
        try:
            base = router.base_module(path)
        except (KeyError, AttributeError, IndexError, ValueError):
            raise IncompatibleError(f"{version.ref} updates {path}, which this base does not have",
                                    hint=f"run 'adapterhub check {version.ref} --base BASE'") from None
        layer = _mlx_lm_layer(base, version.kind, version.rank, version.scale, path)
        for leaf, value in tensors.items():
            expected = getattr(layer, leaf, None)
            if not isinstance(expected, mx.array) or expected.shape != value.shape:
                shape = tuple(expected.shape) if isinstance(expected, mx.array) else None
                raise IncompatibleError(f"{version.ref}'s {path}.{leaf} has shape {tuple(value.shape)}, but the base's "
                                        f"module takes {shape}", hint=f"run 'adapterhub check {version.ref} --base BASE'")
            setattr(layer, leaf, value)
        layer.eval()
        layers[path] = layer
        update = linear_update(layer, version.scale)
        if update is not None:
            updates[path] = update
    mx.eval([layer.parameters() for layer in layers.values()], [(u.a, u.b, u.gain) for u in updates.values()])
    router.load(slot, layers, updates)
    return ResidentAdapter(version, slot, mixable=len(updates) == len(layers), dora=version.kind == "dora")


def _load_loreft(version: AdapterVersion, weights: dict[str, mx.array], model: nn.Module, slot: int) -> ResidentAdapter:
    from .. import loreft

    config = loreft.config_from(version.record["loreft"])
    by_layer: dict[int, list] = {}
    for key, value in weights.items():
        match = _INTERVENTION_KEY.search(key)
        if not match:
            raise IncompatibleError(f"{version.ref} has a tensor '{key}' that is not a LoReFT intervention's",
                                    hint=f"run 'adapterhub audit {version.ref}'")
        by_layer.setdefault(int(match[1]), []).append((match[2], value))
    slots, offset = loreft.layer_slots(model)
    loreft.check_layers(config.layers, len(slots) - offset)
    hidden = loreft.hidden_size_of(model)
    wrapped = {}
    for i in config.layers:
        layer = loreft.LoReFTLayer(slots[offset + i], config, hidden)
        layer.load_weights(by_layer.get(i, []), strict=False)
        layer.eval()
        mx.eval(layer.parameters())
        wrapped[i] = layer
    return ResidentAdapter(version, slot, mixable=True, interventions=wrapped)


@contextmanager
def interventions(model: nn.Module, adapter: ResidentAdapter | None, prompt_length: int) -> Iterator[None]:
    """A LoReFT adapter's layers in the model for one prompt's forward, as loreft.generate applies them."""
    if adapter is None or not adapter.interventions:
        yield
        return
    from .. import loreft

    slots, offset = loreft.layer_slots(model)
    originals = {}
    try:
        for i, layer in adapter.interventions.items():
            originals[i], slots[offset + i] = slots[offset + i], layer
        loreft.set_prompt_lengths(model, mx.array([prompt_length]))
        yield
    finally:
        loreft.set_prompt_lengths(model, None)
        for i, layer in originals.items():
            slots[offset + i] = layer


class AdapterCache:
    """The resident adapters of one base, least recently used first. Pinned adapters (in use) stay.

    Args:
        capacity: how many adapters may be resident (slots 1..capacity of the router).
        load: (version, slot) -> ResidentAdapter.
        unload: called with an adapter that leaves, to empty its slot.
    """

    def __init__(self, capacity: int, load: Callable[[AdapterVersion, int], ResidentAdapter],
                 unload: Callable[[ResidentAdapter], None]):
        self.capacity = capacity
        self._load, self._unload = load, unload
        self._resident: OrderedDict[tuple[str, str], ResidentAdapter] = OrderedDict()
        self._free = list(range(capacity, 0, -1))
        self.loads = 0
        self.evictions = 0

    def acquire(self, version: AdapterVersion) -> ResidentAdapter | None:
        """`version` resident and pinned; None when every slot holds an adapter a request is using."""
        key = cache_key(version)
        found = self._resident.get(key)
        if found is not None:
            self._resident.move_to_end(key)
            found.pins += 1
            return found
        if not self._free:
            victim = next((a for a in self._resident.values() if a.pins == 0), None)
            if victim is None:
                return None
            del self._resident[victim.key]
            self._unload(victim)
            self._free.append(victim.slot)
            self.evictions += 1
        slot = self._free.pop()
        try:
            adapter = self._load(version, slot)
        except BaseException:
            self._unload(ResidentAdapter(version, slot, mixable=True))
            self._free.append(slot)
            raise
        adapter.pins = 1
        self._resident[key] = adapter
        self.loads += 1
        return adapter

    def release(self, adapter: ResidentAdapter) -> None:
        adapter.pins -= 1

    def resident(self) -> list[dict]:
        """What is in memory, least recently used first."""
        return [{"ref": a.version.ref, "sha256": a.version.sha256, "kind": a.version.kind, "in_use": a.pins}
                for a in self._resident.values()]
