"""mlx-lm adapter folders: `adapter_config.json` + `adapters.safetensors`.

Everything the registry records about an adapter is derived from its tensors
(rank, kind, layers, targets) and cross-checked with the config, because a
config can lie and the tensors cannot.
"""

from __future__ import annotations

import math
import re
from math import prod
from pathlib import Path
from typing import NamedTuple

from ..errors import InvalidAdapterError, NotFoundError
from ..records import CONFIG_FILE, WEIGHTS_FILE  # noqa: F401 (mlx-lm's file names, re-exported)
from ..files import read_json
from ..safetensors_io import (FLOAT_DTYPES, MLX_LOADABLE, Header, build_header, non_finite_tensors, quote_name,
                              read_header, refuse_pickle, safetensors_dtype, tensor_bytes)
from ..schemas import validate

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
# Hyper-parameters mlx-lm writes into adapter_config.json that describe training.
TRAINING_KEYS = (
    "iters", "batch_size", "learning_rate", "lr_schedule", "optimizer", "optimizer_config",
    "max_seq_length", "grad_accumulation_steps", "grad_checkpoint", "mask_prompt", "seed",
    "steps_per_eval", "val_batches", "save_every", "num_layers", "lora_parameters", "fine_tune_type", "loreft_parameters",
)


class ParsedAdapter(NamedTuple):
    """An adapter folder read and checked, ready to register."""

    config_path: Path
    weights_path: Path
    config: dict
    header: Header
    kind: str
    rank: int
    scale: float
    dropout: float
    layers: tuple[int, ...]
    targets: tuple[str, ...]
    dtype: str
    num_parameters: int
    # module path -> (in, out), or (in, out, experts) for an expert layer; none for LoReFT
    modules: dict[str, tuple[int, ...]]
    loreft: dict | None = None  # LoReFT's layers, positions, rank, hidden size and interventions per layer

    @property
    def hyperparameters(self) -> dict:
        return {k: self.config[k] for k in TRAINING_KEYS if k in self.config}


def lora_config(rank: int, scale: float, num_layers: int, keys: list[str], dropout: float = 0.0, **extra) -> dict:
    """The adapter_config.json mlx_lm.load(adapter_path=...) needs for a LoRA made outside training (stack, extract)."""
    return {"fine_tune_type": "lora", "num_layers": num_layers,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}, **extra}


def safetensors_chunks(tensors: dict):
    """The bytes of a safetensors file holding `tensors` (mlx or numpy arrays), in order, as mx.save_safetensors lays
    them out: names sorted, `format: mlx` metadata. A generator, so a writer can hash and store each part as it comes."""
    import mlx.core as mx

    arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in sorted(tensors.items())}
    yield build_header([(k, safetensors_dtype(a), tuple(a.shape)) for k, a in arrays.items()], {"format": "mlx"})
    for array in arrays.values():
        yield tensor_bytes(array)


def _bad(path: Path, why: str, hint: str = "re-train or re-save the adapter with mlx_lm.lora") -> InvalidAdapterError:
    return InvalidAdapterError(f"{path}: {why}", hint=hint)


def read_adapter_folder(folder: Path, checkpoint: str | None = None) -> ParsedAdapter:
    """Read and check an mlx-lm adapter folder.

    Args:
        folder: the folder holding adapter_config.json.
        checkpoint: a checkpoint file (e.g. `0000100_adapters.safetensors`) to import
            instead of adapters.safetensors; a name inside `folder` or a path.

    Raises:
        InvalidAdapterError: missing files, pickles, bad tensors, or a config that
            disagrees with the tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"adapter folder {folder} does not exist", hint="give the folder mlx_lm.lora wrote (--adapter-path)")
    for p in folder.iterdir():
        if p.name.startswith("adapter") and p.suffix in (".bin", ".pt", ".pth"):
            refuse_pickle(p)
    config_path = folder / CONFIG_FILE
    config = read_json(config_path)
    if config is None:
        raise _bad(folder, f"no {CONFIG_FILE}", hint="import the folder mlx_lm.lora wrote; it holds adapter_config.json")
    if not isinstance(config, dict):
        raise _bad(config_path, "is not a JSON object")
    if config.get("peft_type"):
        raise InvalidAdapterError(f"{folder} is a PEFT adapter folder, not an mlx-lm one", hint="register it with 'adapterhub import', which converts it")
    validate(config, "mlx_adapter_config", what=str(config_path))
    weights_path = Path(checkpoint) if checkpoint else folder / WEIGHTS_FILE
    if checkpoint and not weights_path.is_absolute() and not weights_path.exists():
        weights_path = folder / checkpoint
    refuse_pickle(weights_path)
    if not weights_path.is_file():
        raise _bad(folder, f"no {weights_path.name}", hint="import the folder mlx_lm.lora wrote, or name a checkpoint with --checkpoint")
    header = read_header(weights_path)
    return derive(config_path, weights_path, config, header)


def is_real(value: object) -> bool:
    """A finite JSON number: json.loads reads NaN, Infinity and 1e999 as floats, and bool is an int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value: object, limit: int = 40) -> str:
    """A config value for a one-line message, however long the file made it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_dropout(where: Path, value: object, key: str = "dropout") -> None:
    # mlx.nn.Dropout refuses p = 1 (it would divide by zero), and p < 0 means nothing.
    if value is not None and not (is_real(value) and 0 <= value < 1):
        raise _bad(where, f"has {key} {shown(value)}; it must be a number from 0 up to (not including) 1")


def _check_numbers(config_path: Path, params: dict, what: str) -> None:
    """Refuse what mlx-lm would train or fuse with but never meant: NaN/inf scales, zero ranks, dropout 1."""
    if "rank" in params and not (isinstance(params["rank"], int) and not isinstance(params["rank"], bool)
                                 and params["rank"] >= 1):
        raise _bad(config_path, f"has {what}.rank {shown(params['rank'])}; a rank is a whole number of at least 1")
    if "scale" in params and not is_real(params["scale"]):
        raise _bad(config_path, f"has {what}.scale {shown(params['scale'])}; it must be a finite number",
                   hint="fusing with it would write NaN or infinite weights; set the scale used in training")
    check_dropout(config_path, params.get("dropout"), f"{what}.dropout")


def _check_dtypes(weights_path: Path, header: Header) -> None:
    """Adapter weights are floating point in a dtype mlx loads: anything else only fails later, inside mlx."""
    for key, info in sorted(header.tensors.items()):
        if info.dtype in FLOAT_DTYPES:
            continue
        if info.dtype not in MLX_LOADABLE:
            raise _bad(weights_path, f"tensor {quote_name(key)} is {info.dtype}, which mlx cannot load",
                       hint="convert it to float32, float16 or bfloat16 and save it again")
        raise _bad(weights_path, f"tensor {quote_name(key)} is {info.dtype}; adapter weights must be floating point "
                                 f"({', '.join(FLOAT_DTYPES)})", hint="save the adapter's weights as floats")


_INTERVENTION = re.compile(r"^(?:.*\.)?layers\.(\d+)\.interventions\.(\d+)\.(rotate|learned_source\.weight|learned_source\.bias)$")


def _derive_loreft(config_path: Path, weights_path: Path, config: dict, header: Header, check_values: bool) -> ParsedAdapter:
    """A LoReFT adapter: per layer, interventions of R (r, d), W (r, d) and b (r,)."""
    from ..loreft import LoReFTConfig

    params = config.get("loreft_parameters")
    if not isinstance(params, dict):
        raise _bad(config_path, "says fine_tune_type 'loreft' but has no loreft_parameters", hint="train it with 'adapterhub train --kind loreft'")
    _check_numbers(config_path, {k: params[k] for k in ("rank", "dropout") if k in params}, "loreft_parameters")
    found: dict[tuple[int, int], dict[str, tuple]] = {}
    for key, info in header.tensors.items():
        match = _INTERVENTION.match(key)
        if not match:
            raise _bad(weights_path, f"tensor {quote_name(key)} is not a LoReFT parameter (rotate, learned_source.weight/bias)")
        found.setdefault((int(match.group(1)), int(match.group(2))), {})[match.group(3)] = tuple(info.shape)
    rank, hidden = params["rank"], params["hidden_size"]
    expected = {"rotate": (rank, hidden), "learned_source.weight": (rank, hidden), "learned_source.bias": (rank,)}
    for (layer, k), parts in sorted(found.items()):
        for part, shape in expected.items():
            if parts.get(part) != shape:
                raise _bad(weights_path, f"layer {layer} intervention {k}: {part} is {list(parts[part]) if part in parts else 'missing'}, "
                                         f"expected {list(shape)} (rank {rank}, hidden size {hidden})")
    layers = sorted({layer for layer, _ in found})
    per_layer = LoReFTConfig(layers=layers, rank=rank, positions=params["positions"],
                             share_weights=params["share_weights"]).interventions_per_layer
    if layers != sorted(params["layers"]) or any(sum(1 for (l, _) in found if l == layer) != per_layer for layer in layers):
        raise _bad(config_path, f"says layers {params['layers']} with {per_layer} intervention(s) each, "
                                f"but the tensors hold {len(found)} interventions on layers {layers}")
    bad = non_finite_tensors(header) if check_values else []
    if bad:
        raise _bad(weights_path, f"NaN or infinite values in {', '.join(bad[:5])}", hint="the training diverged; use an earlier checkpoint")
    dtypes = {t.dtype for t in header.tensors.values()}
    return ParsedAdapter(
        config_path=config_path, weights_path=weights_path, config=config, header=header, kind="loreft", rank=rank,
        scale=1.0, dropout=float(params.get("dropout", 0.0)), layers=tuple(layers), targets=("block_output",),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        num_parameters=sum(prod(t.shape) for t in header.tensors.values()), modules={},
        loreft={**{k: params[k] for k in ("rank", "positions", "share_weights", "activation", "hidden_size")},
                "layers": layers, "dropout": float(params.get("dropout", 0.0)), "interventions": per_layer},
    )


def derive(config_path: Path, weights_path: Path, config: dict, header: Header, check_values: bool = True) -> ParsedAdapter:
    """Everything recorded about an adapter, from its tensors, checked against its config."""
    if not header.tensors:
        raise _bad(weights_path, "holds no tensors")
    _check_dtypes(weights_path, header)
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "loreft":
        return _derive_loreft(config_path, weights_path, config, header, check_values)
    if fine_tune_type == "full":
        raise _bad(config_path, "is a full fine-tune, not an adapter", hint="fuse it into a model with mlx_lm instead")
    modules: dict[str, dict[str, tuple]] = {}
    for key, info in header.tensors.items():
        module, _, leaf = key.rpartition(".")
        # A name goes into one-line messages and records: control characters have no place in a module path.
        if leaf not in ("lora_a", "lora_b", "m") or not module or not key.isprintable():
            raise _bad(weights_path, f"tensor {quote_name(key)} is not a LoRA/DoRA parameter (lora_a, lora_b or m)")
        modules.setdefault(module, {})[leaf] = info.shape
    ranks, layers, targets, shapes = set(), set(), set(), {}
    has_magnitude = False
    for module, leaves in sorted(modules.items()):
        if "lora_a" not in leaves or "lora_b" not in leaves:
            raise _bad(weights_path, f"module '{module}' lacks {'lora_b' if 'lora_a' in leaves else 'lora_a'}")
        a, b = leaves["lora_a"], leaves["lora_b"]
        if len(a) == len(b) == 3:
            # mlx-lm's LoRASwitchLinear (mixture-of-experts layers): one update per expert,
            # lora_a (experts, r, in) and lora_b (experts, out, r).
            if a[0] != b[0]:
                raise _bad(weights_path, f"module '{module}': lora_a {list(a)} has {a[0]} experts but lora_b {list(b)} has {b[0]}")
            if a[1] != b[2]:
                raise _bad(weights_path, f"module '{module}': lora_a {list(a)} has rank {a[1]} but lora_b {list(b)} has rank {b[2]}")
            if "m" in leaves:
                raise _bad(weights_path, f"module '{module}' is an expert layer with a DoRA magnitude m; "
                                         "mlx-lm has no DoRA for expert layers (SwitchLinear doesn't support DoRA yet)")
            ranks.add(a[1])
            shapes[module] = (a[2], b[1], a[0])
        elif len(a) == len(b) == 2:
            if a[1] != b[0]:
                raise _bad(weights_path, f"module '{module}': lora_a {list(a)} has rank {a[1]} but lora_b {list(b)} has rank {b[0]}")
            if "m" in leaves:
                has_magnitude = True
                if tuple(leaves["m"]) != (b[1],):
                    raise _bad(weights_path, f"module '{module}': DoRA magnitude m has shape {list(leaves['m'])}, expected [{b[1]}]")
            ranks.add(a[1])
            shapes[module] = (a[0], b[1])
        else:
            raise _bad(weights_path, f"module '{module}' has lora_a {list(a)} and lora_b {list(b)}; LoRA factors are 2-D "
                                     "(a linear layer) or 3-D (the experts of a mixture-of-experts layer)")
        match = _LAYER.search(module)
        if match:
            layers.add(int(match.group(1)))
            targets.add(match.group(2))
        else:
            targets.add(module)
    if len(ranks) != 1:
        raise _bad(weights_path, f"modules have different ranks {sorted(ranks)}; mlx-lm adapters have one rank")
    rank = ranks.pop()
    kind = "dora" if has_magnitude else "lora"
    if fine_tune_type != kind:
        raise _bad(config_path, f"says fine_tune_type '{fine_tune_type}' but the tensors are {kind.upper()} "
                   f"({'with' if has_magnitude else 'without'} magnitude vectors 'm')")
    params = config.get("lora_parameters") or {}
    _check_numbers(config_path, params, "lora_parameters")
    if "rank" in params and params["rank"] != rank:
        raise _bad(config_path, f"says rank {params['rank']} but the tensors have rank {rank}")
    if "scale" not in params:
        raise _bad(config_path, "has no lora_parameters.scale", hint="add the scale used in training (mlx-lm's default is 20.0)")
    keys = params.get("keys")
    if keys and not targets <= set(keys):
        raise _bad(config_path, f"lists target keys {sorted(keys)} but the tensors also touch {sorted(targets - set(keys))}")
    num_layers = config.get("num_layers")
    if isinstance(num_layers, int) and num_layers > 0 and layers and len(layers) != num_layers:
        raise _bad(config_path, f"says num_layers {num_layers} but the tensors touch {len(layers)} layers")
    bad = non_finite_tensors(header) if check_values else []
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise _bad(weights_path, f"NaN or infinite values in {', '.join(bad[:5])}{more}", hint="the training diverged; use an earlier checkpoint or a lower learning rate")
    dtypes = {t.dtype for t in header.tensors.values()}
    return ParsedAdapter(
        config_path=config_path,
        weights_path=weights_path,
        config=config,
        header=header,
        kind=kind,
        rank=rank,
        scale=float(params["scale"]),
        dropout=float(params.get("dropout", 0.0)),
        layers=tuple(sorted(layers)),
        targets=tuple(sorted(targets)),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        num_parameters=sum(prod(t.shape) for t in header.tensors.values()),
        modules=shapes,
    )
