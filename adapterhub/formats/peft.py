"""PEFT LoRA folders: `adapter_config.json` (peft_type LORA) + `adapter_model.safetensors`.

PEFT stores `lora_A.weight` as (r, in) and `lora_B.weight` as (out, r) under
`base_model.model.<module>`, and scales the update by `lora_alpha / r` (or
`lora_alpha / sqrt(r)` with rsLoRA); mlx-lm stores `lora_a` (in, r) and `lora_b`
(r, out) under `<module>` with one `scale`. Converting is a transpose of raw
bits in both directions, so a round trip is bit-exact whatever the dtype. DoRA's
`lora_magnitude_vector` is mlx-lm's `m`: both divide by the row norms of
W + scale·BA, so the same numbers mean the same model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import sqrt
from pathlib import Path

from ..errors import IncompatibleError, InvalidAdapterError, NotFoundError
from ..files import read_json, write_json
from ..safetensors_io import (FLOAT_DTYPES, MLX_DTYPES, MLX_LOADABLE, build_header, quote_name, read_bits, read_header,
                              refuse_pickle)
from ..tensor_writers import StreamingWriter
from .mlx import is_real, shown

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<leaf>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_TO_MLX = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "m"}
_TO_PEFT = {v: k for k, v in _TO_MLX.items()}
# What PEFT can hold that an mlx-lm adapter cannot: (config key, why it cannot be represented).
_UNREPRESENTABLE = (
    ("modules_to_save", "keeps full trained copies of these modules, and mlx-lm adapters hold only low-rank updates"),
    ("rank_pattern", "gives some modules another rank, and an mlx-lm adapter has one rank"),
    ("alpha_pattern", "gives some modules another alpha, and an mlx-lm adapter has one scale"),
    ("layer_replication", "duplicates layers of the base model"),
    ("target_parameters", "adapts raw parameters rather than linear layers"),
    ("trainable_token_indices", "trains embedding rows, not a low-rank update"),
)


def is_peft_folder(folder: Path) -> bool:
    config = read_json(Path(folder) / CONFIG_FILE)
    return isinstance(config, dict) and "peft_type" in config


def _refuse(folder: Path, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{folder}: {why}", hint="merge those parts into the base with PEFT first, or retrain as a plain LoRA")


def read_config(folder: Path) -> dict:
    """The PEFT config, refused with the reason when mlx-lm could not run it as the same model."""
    folder = Path(folder)
    for pickle in ("adapter_model.bin", "adapter_model.pt"):
        if (folder / pickle).exists() and not (folder / WEIGHTS_FILE).exists():
            refuse_pickle(folder / pickle)
    config = read_json(folder / CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise InvalidAdapterError(f"{folder} is a PEFT {config.get('peft_type')} adapter; only LoRA (and DoRA) convert to mlx-lm",
                                  hint="import a PEFT LoRA folder (peft_type LORA)")
    for key, why in _UNREPRESENTABLE:
        if config.get(key):
            raise _refuse(folder, f"PEFT '{key}' {why}")
    if config.get("fan_in_fan_out"):
        raise _refuse(folder, "fan_in_fan_out stores transposed (Conv1D, GPT-2 style) weights that mlx-lm models do not use")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise _refuse(folder, f"trained biases (bias={config.get('bias')!r}) are not part of an mlx-lm adapter")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise InvalidAdapterError(f"{folder / CONFIG_FILE} lacks an integer 'r' or a numeric 'lora_alpha'",
                                  hint="is it the adapter_config.json PEFT wrote?")
    # The scale mlx-lm gets is lora_alpha / r: a NaN, an infinity or a zero rank would fuse into NaN weights.
    if isinstance(config["r"], bool) or config["r"] < 1:
        raise _bad_number(folder, f"r {shown(config['r'])}; a rank is a whole number of at least 1")
    if not is_real(config["lora_alpha"]):
        raise _bad_number(folder, f"lora_alpha {shown(config['lora_alpha'])}; it must be a finite number")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (is_real(dropout) and 0 <= dropout < 1):
        raise _bad_number(folder, f"lora_dropout {shown(dropout)}; it must be a number from 0 up to (not including) 1")
    if config.get("use_rslora") not in (None, True, False) or config.get("use_dora") not in (None, True, False):
        raise _bad_number(folder, "a use_rslora or use_dora that is not true or false")
    if not (folder / WEIGHTS_FILE).is_file():
        raise NotFoundError(f"{folder} has no {WEIGHTS_FILE}", hint="save the adapter with PeftModel.save_pretrained (safetensors is its default)")
    return config


def _bad_number(folder: Path, what: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{folder / CONFIG_FILE} has {what}", hint="is it the adapter_config.json PEFT wrote?")


def scale_of(config: dict) -> float:
    """mlx-lm's `scale` for a PEFT config: lora_alpha / r, or lora_alpha / sqrt(r) under rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (sqrt(r) if config.get("use_rslora") else r)


@dataclass(frozen=True)
class Converted:
    """A PEFT folder in mlx-lm's terms, in memory: tensors under mlx-lm's names, its adapter_config.json, and the
    PEFT config it came from."""

    tensors: dict
    config: dict
    peft_config: dict


def to_mlx(folder: Path) -> Converted:
    """A PEFT folder's tensors and config as mlx-lm holds them; the transposes are of raw bits, so exact."""
    import mlx.core as mx

    folder = Path(folder)
    config = read_config(folder)
    header = read_header(folder / WEIGHTS_FILE)
    entries, sources, targets = [], {}, set()
    for key in sorted(header.tensors):
        match = _KEY.match(key)
        if not match:
            raise _refuse(folder, f"tensor {quote_name(key)} is not a LoRA parameter of a linear layer "
                                  "(embedding LoRA and extra trained weights do not convert)")
        module, leaf = match.group("module"), _TO_MLX[match.group("leaf")]
        info = header.tensors[key]
        if info.dtype not in FLOAT_DTYPES:
            # Checked before any bits move: the converted file must be one mlx loads, with float updates.
            why = "which mlx cannot load" if info.dtype not in MLX_LOADABLE else "and LoRA weights must be floating point"
            raise InvalidAdapterError(f"{folder / WEIGHTS_FILE}: tensor {quote_name(key)} is {info.dtype}, {why}",
                                      hint="save the PEFT adapter in float32, float16 or bfloat16 "
                                           "(model.to(torch.float32) before save_pretrained)")
        shape = tuple(reversed(info.shape)) if leaf != "m" else tuple(info.shape)
        entries.append((f"{module}.{leaf}", info.dtype, shape))
        sources[f"{module}.{leaf}"] = key
        layer = _LAYER.search(module)
        targets.add(layer.group(2) if layer else module)
    if any(name.endswith(".m") for name, _, _ in entries) != bool(config.get("use_dora")):
        raise _refuse(folder, "use_dora and the presence of lora_magnitude_vector tensors disagree")
    ranks = {shape[1] for name, _, shape in entries if name.endswith(".lora_a")}
    if ranks != {config["r"]}:
        raise _refuse(folder, f"says r={config['r']} but its lora_A tensors have rank(s) {sorted(ranks)}")
    tensors = {}
    for name, dtype, _ in sorted(entries):
        bits = read_bits(header, sources[name])
        tensors[name] = mx.array((bits if name.endswith(".m") else bits.T).copy(order="C")).view(
            getattr(mx, MLX_DTYPES[dtype]))
    return Converted(tensors, {
        "fine_tune_type": "dora" if config.get("use_dora") else "lora",
        # Every layer: mlx-lm wraps the last num_layers layers, and PEFT may adapt any subset; a wrapped
        # layer without weights keeps lora_b = 0 and computes exactly what the base computes.
        "num_layers": -1,
        "lora_parameters": {"rank": config["r"], "scale": scale_of(config), "dropout": float(config.get("lora_dropout") or 0.0),
                            "keys": sorted(targets)},
    }, config)


# A mixture-of-experts router in mlx-lm (mixtral's block_sparse_moe.gate, qwen2/3_moe's mlp.gate).
_ROUTER = re.compile(r"(?:^|\.)(?:block_sparse_moe|mlp)\.gate$")


def unrepresentable(header) -> list[str]:
    """Why each module of an mlx-lm adapter has no PEFT LoRA equivalent (empty when all have one).

    PEFT's LoRA wraps nn.Linear layers. transformers (5.x) keeps a mixture-of-experts' experts as one
    3-D parameter per projection, and its router as a bare weight parameter (a TopKRouter, not a Linear):
    PEFT reaches those only through `target_parameters`, another format with other semantics.
    """
    experts, routers = [], []
    for key, info in sorted(header.tensors.items()):
        module, _, leaf = key.rpartition(".")
        if leaf != "lora_a":
            continue
        if len(info.shape) == 3:
            experts.append(f"{module} is the expert layer of a mixture of experts (one LoRA per expert); "
                           "PEFT's LoRA wraps linear layers, and transformers keeps experts as one 3-D parameter per projection")
        elif _ROUTER.search(module):
            routers.append(f"{module} is the router of a mixture of experts; "
                           "PEFT's LoRA wraps linear layers, and transformers keeps a router as a bare weight parameter")
    return experts + routers


def from_mlx(weights: Path, record: dict, out: Path, base_model_name_or_path: str | None) -> None:
    """Write `out/adapter_model.safetensors` + `adapter_config.json` that PeftModel.from_pretrained loads."""
    header = read_header(weights)
    reasons = unrepresentable(header)
    if reasons:
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        raise IncompatibleError(f"{record['name']}@{record['version']} has no PEFT equivalent: {reasons[0]}{more}",
                                  hint="export it with --format mlx; a LoRA on the attention layers alone exports to PEFT")
    entries, sources = [], {}
    for key in sorted(header.tensors):
        module, _, leaf = key.rpartition(".")
        info = header.tensors[key]
        name = f"{_PREFIX}{module}.{_TO_PEFT[leaf]}"
        entries.append((name, info.dtype, tuple(reversed(info.shape)) if leaf != "m" else tuple(info.shape)))
        sources[name] = key
    entries.sort()
    with StreamingWriter(Path(out) / WEIGHTS_FILE, build_header(entries, {"format": "pt"})) as writer:
        for name, _, _ in entries:
            bits = read_bits(header, sources[name])
            writer.write((bits if name.endswith("lora_magnitude_vector") else bits.T).copy(order="C").tobytes())
        writer.close()
    rank = record["rank"]
    write_json(Path(out) / CONFIG_FILE, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": record["scale"] * rank, "lora_dropout": record.get("dropout", 0.0),
        "target_modules": sorted(record["targets"]), "layers_to_transform": sorted(record["layers"]) or None,
        "use_dora": record["kind"] == "dora", "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    })
