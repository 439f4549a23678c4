"""One base model, many adapters: each targeted module of the base is wrapped once, and every forward
says which adapter each row of the batch reads.

The base weights are never changed or copied. A wrapped module answers a forward in one of two ways:

- uniform (every row reads the same adapter, or none): that adapter's own mlx-lm layer for the module
  (LoRALinear, DoRALinear, LoRASwitchLinear, LoRAEmbedding, ...), built around the base module, so a
  request alone computes exactly what `mlx_lm.load(adapter_path=...)` and `adapterhub generate` compute;
- mixed (rows read different adapters): the base output once for the whole batch, plus each row's own
  low-rank update through gathered matmuls over a table of every resident adapter (slot 0 is the
  zero update, for rows without one), as Punica and S-LoRA batch LoRA adapters. DoRA rows also get
  their adapter's column gains. Only plain linear layers (quantized or not) take part; an adapter that
  touches expert or embedding layers decodes in uniform batches only (runner.py keeps batches so).

The wrapper holds no arrays of its own (the router keeps the tables), so the model's parameter tree
keeps exactly the base's weights under `<module>.base`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

MIXABLE = (nn.Linear, nn.QuantizedLinear)


class ServedModule(nn.Module):
    """A base module whose output the router completes with the adapter each row reads."""

    def __init__(self, base: nn.Module, path: str, router: "AdapterRouter"):
        super().__init__()
        self.base = base
        self._path = path
        self._router = router

    def __getattr__(self, key: str):
        # Models read attributes of their modules (weight shapes, group sizes): answer for the base.
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "base" not in self:
                raise
            return getattr(self["base"], key)

    def __call__(self, x, *args, **kwargs):
        return self._router.forward(self._path, self["base"], x, *args, **kwargs)

    def as_linear(self, x):
        # Tied embeddings compute the logits through the embedding module.
        return self._router.forward(self._path, self["base"], x, as_linear=True)


@dataclass
class _Table:
    """Every slot's update of one linear module: a (slots, in, r), b (slots, r, out) with the scale folded in,
    and for DoRA the per-output gains (slots, out), 1 where a slot is not DoRA."""

    a: mx.array
    b: mx.array
    gain: mx.array | None = None


@dataclass(frozen=True)
class LowRank:
    """One adapter's update of one linear module, as the mixed path reads it."""

    a: mx.array  # (in, r)
    b: mx.array  # (r, out), scale included
    gain: mx.array | None = None  # DoRA: m / ‖W + scale·Bᵀ·Aᵀ‖ per output


class AdapterRouter:
    """The adapters of one base model: their layers by slot, the mixed path's tables, and who reads what.

    Only the runner's thread calls it, between forwards (load, clear, use) and inside them (forward).
    """

    def __init__(self, model: nn.Module, slots: int):
        self.model = model
        self.slots = slots  # slot 0 is "no adapter"; 1..slots-1 hold resident adapters
        self._layers: dict[int, dict[str, nn.Module]] = {}
        self._tables: dict[str, _Table] = {}
        self._wrapped: dict[str, nn.Module] = {}
        self._uniform: int | None = 0
        self._rows: mx.array | None = None
        self._dora_rows = False

    # ---- the model's modules ---------------------------------------------------------------------------

    def base_module(self, path: str) -> nn.Module:
        """The base module at `path`, wrapping it on first use."""
        if path in self._wrapped:
            return self._wrapped[path]
        parent, leaf = _parent(self.model, path)
        base = parent[int(leaf)] if isinstance(parent, list) else getattr(parent, leaf, None)
        if not isinstance(base, nn.Module):
            raise KeyError(path)
        served = ServedModule(base, path, self)
        if isinstance(parent, list):
            parent[int(leaf)] = served
        else:
            setattr(parent, leaf, served)
        self._wrapped[path] = base
        return base

    # ---- slots ------------------------------------------------------------------------------------------

    def load(self, slot: int, layers: dict[str, nn.Module], updates: dict[str, LowRank]) -> None:
        """Give `slot` an adapter: its mlx-lm layers (uniform path) and its linear updates (mixed path)."""
        self.clear(slot)
        self._layers[slot] = layers
        for path, update in updates.items():
            table = self._table(path, update)
            rank = update.a.shape[-1]
            table.a[slot, :, :rank] = update.a.astype(table.a.dtype)
            table.b[slot, :rank, :] = update.b.astype(table.b.dtype)
            if update.gain is not None:
                if table.gain is None:
                    table.gain = mx.ones((self.slots, update.b.shape[-1]), dtype=mx.float32)
                table.gain[slot] = update.gain.astype(mx.float32)
        mx.eval([(t.a, t.b, t.gain) for t in self._tables.values()])

    def clear(self, slot: int) -> None:
        """Empty `slot`: its rows read the zero update until another adapter is loaded into it."""
        self._layers.pop(slot, None)
        for table in self._tables.values():
            table.a[slot] = 0
            table.b[slot] = 0
            if table.gain is not None:
                table.gain[slot] = 1

    def _table(self, path: str, update: LowRank) -> _Table:
        """The table of `path`, made or widened so that `update`'s rank fits (zero columns add nothing)."""
        (fan_in, rank), fan_out = update.a.shape, update.b.shape[-1]
        table = self._tables.get(path)
        if table is None:
            table = self._tables[path] = _Table(mx.zeros((self.slots, fan_in, rank), mx.float32),
                                                mx.zeros((self.slots, rank, fan_out), mx.float32))
        elif table.a.shape[-1] < rank:
            extra = rank - table.a.shape[-1]
            table.a = mx.pad(table.a, [(0, 0), (0, 0), (0, extra)])
            table.b = mx.pad(table.b, [(0, 0), (0, extra), (0, 0)])
        return table

    # ---- the next forward -------------------------------------------------------------------------------

    def use(self, slot: int) -> None:
        """Every row of the next forward reads `slot` (0: the base alone)."""
        self._uniform, self._rows = slot, None

    def use_rows(self, slots: list[int], dora: bool) -> None:
        """Row i of the next forward reads slots[i]; `dora`: some row reads a DoRA adapter."""
        if len(set(slots)) == 1:
            self.use(slots[0])
            return
        self._uniform, self._rows, self._dora_rows = None, mx.array(slots, dtype=mx.uint32), dora

    def forward(self, path: str, base: nn.Module, x, *args, as_linear: bool = False, **kwargs):
        if self._uniform is not None:
            module = self._layers.get(self._uniform, {}).get(path, base)
            return module.as_linear(x) if as_linear else module(x, *args, **kwargs)
        y = base.as_linear(x) if as_linear else base(x, *args, **kwargs)
        table = self._tables.get(path)
        if table is None:
            return y
        rows = self._rows
        z = mx.gather_mm(mx.gather_mm(x.astype(table.a.dtype), table.a, rhs_indices=rows), table.b, rhs_indices=rows)
        if self._dora_rows and table.gain is not None:
            # DoRA: gain · (x Wᵀ + update) + bias; the gain is 1 for the other rows, which leaves them y + update.
            bias = base.bias if "bias" in base else None
            plain = y - bias if bias is not None else y
            out = table.gain[rows][:, None, :] * (plain.astype(mx.float32) + z)
            return (out + bias if bias is not None else out).astype(x.dtype)
        return y + z.astype(x.dtype)


def _parent(model: nn.Module, path: str):
    """The module (or list) holding the last part of `path`, and that part."""
    *parents, leaf = path.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node, leaf


def linear_update(layer: nn.Module, scale: float) -> LowRank | None:
    """The mixed path's view of an mlx-lm LoRALinear or DoRALinear around a plain linear layer; None otherwise."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    if not isinstance(layer, (LoRALinear, DoRALinear)) or not isinstance(layer.linear, MIXABLE):
        return None
    b = scale * layer.lora_b
    if isinstance(layer, LoRALinear):
        return LowRank(layer.lora_a, b)
    # DoRALinear's own normalisation, computed once: it depends on the weights alone, not on the input.
    weight = layer._dequantized_weight()
    adapted = weight + (scale * layer.lora_b.T) @ layer.lora_a.T
    return LowRank(layer.lora_a, b, layer.m / mx.linalg.norm(adapted, axis=1))
