"""LoReFT on MLX: a low-rank edit of hidden states at chosen layers and prompt positions.

    h <- h + Rᵀ(act(W h + b) − R h)        R: (r, d) with orthonormal rows; W: (r, d), b: (r,)

as pyreft's `LoreftIntervention`, applied to a decoder layer's output (pyreft's
`block_output`) at the first / last prompt tokens (`f1+l1`: the first token and
the last one). R is kept orthonormal by a QR retraction after every optimizer
step (`retract`: written as array ops on the default device, so a training step
never waits on the host). Generated tokens are never intervened: only the
prompt's positions, during prefill, as in pyreft.

Usable without the CLI:

    model, tokenizer = mlx_lm.load(path)
    apply(model, LoReFTConfig(layers=[2, 3], rank=4, positions="f1+l1"))
    set_prompt_lengths(model, mx.array([prompt_length]))   # before a forward over prompts
    ...
    text = generate(model, tokenizer, prompt)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .errors import AdapterHubError

ACTIVATIONS = {"linear": lambda x: x, "relu": nn.relu, "gelu": nn.gelu, "tanh": mx.tanh, "silu": nn.silu}
_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")
# Newton steps per retraction (`orthonormal_rows`). The error squares each step; R is retracted after every update,
# so its rows start a few hundredths from perpendicular (1e-2 → 3e-4 → 1e-7 → 0), and 6 steps still settle
# rows 0.5 from perpendicular.
RETRACTION_STEPS = 6


def parse_positions(text: str) -> tuple[int, int]:
    """pyreft's notation -> (first n prompt tokens, last n prompt tokens): `f1+l1`, `f3+l3`, `l1`, `f2`."""
    match = _POSITIONS.match(text.strip().lower())
    first, last = (int(g) if g else 0 for g in match.groups()) if match else (0, 0)
    if not match or (first == 0 and last == 0) or text.strip().startswith("+") or text.strip().endswith("+"):
        raise AdapterHubError(f"--positions '{text}' is not pyreft's notation",
                              hint="write f<N>+l<M> (first N and last M prompt tokens), e.g. f1+l1, f3+l3, or l1")
    return first, last


def parse_layers(text: str | list, num_layers: int | None = None) -> list[int]:
    """`8;16`, `8,16`, a list, or `all` (needs the model's layer count)."""
    if isinstance(text, list):
        return sorted({int(i) for i in text})
    if str(text).strip().lower() == "all":
        if num_layers is None:
            raise AdapterHubError("--layers all needs the model's layer count", hint="give explicit layers, e.g. 2;3")
        return list(range(num_layers))
    try:
        layers = sorted({int(p) for p in re.split(r"[;,\s]+", str(text).strip()) if p})
    except ValueError:
        raise AdapterHubError(f"--layers '{text}' is not a list of layer indices", hint="write e.g. 8;16, or all") from None
    if not layers or layers[0] < 0:
        raise AdapterHubError(f"--layers '{text}' names no valid layer", hint="write e.g. 8;16, or all")
    return layers


@dataclass(frozen=True)
class LoReFTConfig:
    layers: list[int]
    rank: int = 4
    positions: str = "f1+l1"
    share_weights: bool = False
    dropout: float = 0.0
    activation: str = "linear"
    hidden_size: int | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def interventions_per_layer(self) -> int:
        first, last = parse_positions(self.positions)
        return 1 if self.share_weights or not (first and last) else 2


class LoReFTIntervention(nn.Module):
    """h + Rᵀ(act(W h + b) − R h), with R's rows orthonormal."""

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0, activation: str = "linear"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise AdapterHubError(f"activation '{activation}' is not one of {', '.join(ACTIVATIONS)}", hint="use linear (pyreft's default)")
        if not 1 <= rank <= hidden_size:
            raise AdapterHubError(f"LoReFT rank {rank} must be between 1 and the hidden size {hidden_size}", hint="lower --rank")
        # Orthonormal rows from the QR of a random matrix, as pyreft initialises its rotation.
        q, _ = mx.linalg.qr(mx.random.normal((hidden_size, rank)), stream=mx.cpu)
        self.rotate = q.T
        self.learned_source = nn.Linear(hidden_size, rank)
        self.dropout = nn.Dropout(dropout)
        self._activation = activation

    def delta(self, h: mx.array, mask: mx.array | None = None) -> mx.array:
        """The edit Rᵀ(act(W h + b) − R h); with `mask` ((batch, length, 1), 0 or 1), only at the masked positions."""
        rotate = self.rotate.astype(h.dtype)
        edit = ACTIVATIONS[self._activation](self.learned_source(h).astype(h.dtype)) - h @ rotate.T
        if mask is not None:
            edit = edit * mask  # masked at rank r, before the projection back to the hidden size: r wide, not d
        return self.dropout(edit @ rotate)

    def __call__(self, h: mx.array) -> mx.array:
        return h + self.delta(h)

    def retract(self) -> None:
        """Back onto orthonormal rows after an optimizer step."""
        self.rotate = orthonormal_rows(self.rotate)


def _matmul_f32(a: mx.array, b: mx.array) -> mx.array:
    """a @ b as a multiply and a sum, in float32 throughout. A GPU may run a float32 matmul in TF32 (a 10-bit
    mantissa: MLX_ENABLE_TF32's default), which would leave R Rᵀ − I near 1e-3. The (…, m, k, n) temporary is
    small for a rotation: rank × hidden × rank."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def orthonormal_rows(rows: mx.array, steps: int = RETRACTION_STEPS) -> mx.array:
    """Q in rows = L Q (L lower triangular with a positive diagonal): Gram–Schmidt on the rows in order, what
    mx.linalg.qr(rowsᵀ) gives with its signs fixed. `rows`: (…, r, d), r ≤ d; float32 inside, returned as given.

    Array ops only, so it runs on the default device inside the compiled step: MLX's QR runs on the CPU stream
    alone, a device-to-host round trip every step. Q = L⁻¹ R, and L⁻¹ comes from the r × r Gram matrix G = R Rᵀ
    by Newton's iteration X ← X − T X, T the lower triangle of X G Xᵀ − I with its diagonal halved: X stays lower
    triangular and X G Xᵀ − I squares each step. The rows are scaled to unit length first (Q does not change), so
    only the angles between them count.
    """
    x = rows.astype(mx.float32)
    gram = _matmul_f32(x, x.swapaxes(-1, -2))
    scale = mx.rsqrt(mx.diagonal(gram, axis1=-2, axis2=-1))
    gram = gram * scale[..., :, None] * scale[..., None, :]
    identity = mx.eye(x.shape[-2], dtype=mx.float32)
    lower = mx.tril(mx.ones_like(identity), -1) + 0.5 * identity
    inverse = mx.broadcast_to(identity, gram.shape)
    for _ in range(steps):
        error = _matmul_f32(_matmul_f32(inverse, gram), inverse.swapaxes(-1, -2)) - identity
        inverse = inverse - _matmul_f32(error * lower, inverse)
    return _matmul_f32(inverse, x * scale[..., :, None]).astype(rows.dtype)


class _Prompts:
    """Where each row's prompt ends, and the masks of the positions to edit, shared by every wrapped layer.

    The masks are the same at every layer: each is made once per forward (per sequence length), by the first
    layer that asks. A plain object, not an array attribute: it stays out of the model's state and parameters.
    """

    def __init__(self, lengths: mx.array):
        self.lengths = lengths
        self._masks: dict[tuple, list[mx.array]] = {}

    def masks(self, length: int, first: int, last: int, count: int, dtype) -> list[mx.array]:
        """(batch, length, 1) masks, in `dtype`, of the positions each of `count` interventions edits."""
        key = (length, first, last, count, dtype)
        if key not in self._masks:
            prompt = self.lengths[:, None]
            pos = mx.arange(length)[None, :]
            chosen = [m for m in ((pos < mx.minimum(prompt, first)) if first else None,
                                  ((pos >= prompt - last) & (pos < prompt)) if last else None) if m is not None]
            if count == 1 and len(chosen) == 2:
                chosen = [chosen[0] | chosen[1]]  # shared weights: one intervention over both sets of positions
            self._masks[key] = [m[..., None].astype(dtype) for m in chosen]
        return self._masks[key]


class LoReFTLayer(nn.Module):
    """A decoder layer whose output is edited at the prompt positions the model was last told about."""

    def __init__(self, layer: nn.Module, config: LoReFTConfig, hidden_size: int):
        super().__init__()
        self.layer = layer
        first, last = parse_positions(config.positions)
        self.first, self.last = first, last
        self.interventions = [LoReFTIntervention(hidden_size, config.rank, config.dropout, config.activation)
                              for _ in range(config.interventions_per_layer)]
        self._prompts: _Prompts | None = None

    def __getattr__(self, key: str):
        # Models read attributes of their layers (e.g. `use_sliding`): answer for the wrapped one.
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "layer" not in self:
                raise
            return getattr(self["layer"], key)

    def __call__(self, x, *args, **kwargs):
        h = self.layer(x, *args, **kwargs)
        if self._prompts is None:
            return h  # decoding: generated tokens are not intervened
        out = h
        masks = self._prompts.masks(h.shape[1], self.first, self.last, len(self.interventions), h.dtype)
        for intervention, mask in zip(self.interventions, masks):
            out = out + intervention.delta(h, mask)
        return out


def _layers(model) -> list:
    return model.layers


def layer_slots(model) -> tuple[list, int]:
    """The list that holds the decoder layers, and where `model.layers[0]` sits in it.

    Models that support pipelining (qwen2, ...) answer `model.layers` with a fresh slice of
    `model.model.layers`: a layer put into that slice would never run, and nothing would train.
    """
    layers = _layers(model)
    if not layers:
        return layers, 0
    seen, stack = set(), [model]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.values() if isinstance(node, dict) else node:
            if isinstance(value, list):
                start = next((i for i, item in enumerate(value) if item is layers[0]), None)
                if start is not None and [id(item) for item in value[start:start + len(layers)]] == list(map(id, layers)):
                    return value, start
            if isinstance(value, (dict, list)):
                stack.append(value)
    raise AdapterHubError(f"cannot find where {type(model).__name__} keeps its decoder layers",
                          hint="LoReFT needs a model whose layers live in a list, as mlx-lm's models keep them")


def check_layers(layers: list[int], num_layers: int) -> None:
    beyond = [i for i in layers if i >= num_layers]
    if beyond:
        raise AdapterHubError(f"--layers {beyond} beyond the model's {num_layers} layers (0–{num_layers - 1})",
                              hint="pick layers the base has")


def hidden_size_of(model) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "hidden_size", None)
    if size is None:
        raise AdapterHubError("cannot tell this model's hidden size", hint="LoReFT needs a model whose args give hidden_size")
    return size


def apply(model, config: LoReFTConfig) -> list[LoReFTLayer]:
    """Freeze the model and wrap the chosen decoder layers; only the interventions train."""
    slots, offset = layer_slots(model)
    check_layers(config.layers, len(_layers(model)))
    model.freeze()
    hidden = hidden_size_of(model)
    wrapped = []
    for i in config.layers:
        slots[offset + i] = LoReFTLayer(slots[offset + i], config, hidden)
        wrapped.append(slots[offset + i])
    return wrapped


def wrapped_layers(model) -> list[LoReFTLayer]:
    return [layer for layer in _layers(model) if isinstance(layer, LoReFTLayer)]


def set_prompt_lengths(model, prompt_lengths: mx.array | None) -> None:
    """Tell every intervention where the prompts end (tokens per row); None turns interventions off."""
    prompts = None if prompt_lengths is None else _Prompts(prompt_lengths)  # one for all layers: masks made once
    for layer in wrapped_layers(model):
        layer._prompts = prompts


def retract(model) -> None:
    """Every rotation back onto orthonormal rows, all in one batch (a few kernels, not a few per intervention);
    lazy and on the default device, so it runs inside the compiled training step."""
    interventions = [i for layer in wrapped_layers(model) for i in layer.interventions]
    if not interventions:
        return
    rows = orthonormal_rows(mx.stack([i.rotate for i in interventions]))  # one config: every R is (rank, hidden)
    for k, intervention in enumerate(interventions):
        intervention.rotate = rows[k]


def loss(model, batch, lengths):
    """mlx-lm's loss on the completion only, with interventions at each row's prompt positions."""
    from mlx_lm.tuner.trainer import default_loss

    set_prompt_lengths(model, lengths[:, 0])  # the offset where the completion starts = prompt tokens
    try:
        return default_loss(model, batch, lengths)
    finally:
        # The graph holds what it needs; the prompts must not outlive this call (inside a compiled step they
        # are placeholders that a later forward could not use).
        set_prompt_lengths(model, None)


def load(model, weights: dict, config: LoReFTConfig) -> None:
    apply(model, config)
    model.load_weights(list(weights.items()), strict=False)
    model.eval()


def config_from(parameters: dict) -> LoReFTConfig:
    """A LoReFTConfig from `loreft_parameters` (adapter_config.json) or a version record's `loreft`."""
    return LoReFTConfig(**{k: parameters[k] for k in ("layers", "rank", "positions", "share_weights", "dropout",
                                                      "activation", "hidden_size") if k in parameters})


def load_folder(model, folder) -> LoReFTConfig:
    """Apply an exported LoReFT folder (adapter_config.json + adapters.safetensors) to a loaded mlx-lm model."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("fine_tune_type") != "loreft":
        raise AdapterHubError(f"{folder} is not a LoReFT adapter folder", hint="load LoRA/DoRA folders with mlx_lm.load(adapter_path=...)")
    parameters = config_from(config["loreft_parameters"])
    load(model, mx.load(str(Path(folder) / "adapters.safetensors")), parameters)
    return parameters


def generate(model, tokenizer, prompt: str | list[int], max_tokens: int = 100) -> str:
    """Greedy decoding: the whole prompt (text, or token ids as generation.templated gives) in one prefill with
    interventions, then plain decoding."""
    from mlx_lm.models.cache import make_prompt_cache

    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    cache = make_prompt_cache(model)
    set_prompt_lengths(model, mx.array([len(tokens)]))
    logits = model(mx.array([tokens]), cache=cache)
    set_prompt_lengths(model, None)
    generated = []
    token = mx.argmax(logits[:, -1, :], axis=-1)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    for _ in range(max_tokens):
        value = token.item()
        if value in eos:
            break
        generated.append(value)
        logits = model(token[None], cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)
    return tokenizer.decode(generated)
