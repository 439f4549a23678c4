"""Tiny local models of every architecture in the matrix, tokenizers and datasets: for the demo, tests and benches.

Nothing can be downloaded here, so everything a lifecycle needs is made from
scratch: random weights from mlx-lm's own model classes, saved as mlx-lm saves
them, a byte-level BPE tokenizer made with the `tokenizers` library, and small
JSONL datasets in mlx-lm's formats.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .files import atomic_write, write_json

_SUBJECTS = ["the cat", "a dog", "the robot", "my friend", "the teacher", "a bird", "the model", "our team"]
_VERBS = ["sees", "likes", "builds", "finds", "paints", "reads", "trains", "opens"]
_OBJECTS = ["a box", "the door", "a song", "the map", "a letter", "the garden", "a puzzle", "the window"]
_COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red"}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def sentences(count: int, seed: int, style: str = "story") -> list[dict]:
    """Deterministic toy examples. `story` is {"text"}; `colours` is {"prompt", "completion"}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        if style == "colours":
            thing = rng.choice(sorted(_COLOURS))
            rows.append({"prompt": f"what colour is the {thing} ?", "completion": f"the {thing} is {_COLOURS[thing]} ."})
        else:
            rows.append({"text": f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} ."})
    return rows


def write_dataset(folder: Path, seed: int = 0, style: str = "story", sizes=(64, 16, 16)) -> Path:
    """A dataset folder with train/valid/test.jsonl as mlx_lm.lora reads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in zip(("train", "valid", "test"), sizes, (0, 1, 2)):
        with atomic_write(folder / f"{split}.jsonl", "w") as f:
            for row in sentences(n, seed * 10 + offset, style):
                f.write(json.dumps(row) + "\n")
    return folder


def _vocabulary() -> list[str]:
    words = set()
    for phrase in _SUBJECTS + _VERBS + _OBJECTS + list(_COLOURS) + list(_COLOURS.values()):
        words.update(phrase.split())
    words.update(["what", "colour", "is", "?", ".", "the"])
    return SPECIAL_TOKENS + sorted(words)


# Qwen2's pre-tokenizer split: transformers rebuilds a qwen2 or phi3 tokenizer from vocab and merges with
# its own class whatever tokenizer_config.json says, so only a byte-level BPE reads the same in every class.
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer (one token per toy word) that transformers loads as any model type's class."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    words = [w for w in _vocabulary() if w not in SPECIAL_TOKENS]
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False)
    # Each word with and without its leading space, so every word of the toy corpus is one token; and the newline
    # that ends a chat template's turn.
    tokenizer.train_from_iterator([w for w in words for _ in range(3)] + [" " + w for w in words for _ in range(3)]
                                  + ["\n"] * 3, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 512, "clean_up_tokenization_spaces": False,
        # A minimal template, so completions and chat data (which mlx-lm formats with it) work too. Turns end in a
        # newline, a token of its own: a generation prompt ending in a space would end in a token that training
        # never saw (byte-level BPE joins a space to the word after it).
        "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    })
    return tokenizer.get_vocab_size()


# The architecture matrix: what each model type adds to the shared tiny shape (mlx_lm's own classes build them).
ARCHITECTURES: dict[str, dict] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True},
    # tied embeddings, bias on q/k/v, and model.layers answered with a fresh slice (pipelining)
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # q/k norms, an explicit head_dim
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # RMSNorm applies 1 + weight; attention and final logits soft-capped
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    # fused qkv_proj and gate_up_proj, an untied lm_head
    "phi3": {"architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 512, "tie_word_embeddings": False},
    # experts stacked in switch_mlp, a router, an untied lm_head
    "mixtral": {"architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2,
                "rope_theta": 1000000.0, "tie_word_embeddings": False},
}


def model_config(arch: str = "llama", hidden_size: int = 64, num_layers: int = 4, intermediate_size: int = 128,
                 num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 256, dtype: str = "float32") -> dict:
    """The config.json of a tiny model of `arch`, as a Hugging Face export would write it."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"no tiny {arch!r} model: one of {', '.join(ARCHITECTURES)}")
    return {
        "model_type": arch, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads, "rms_norm_eps": 1e-5, "vocab_size": vocab_size,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": dtype,
        **ARCHITECTURES[arch],
    }


def write_model(folder: Path, hidden_size: int = 64, num_layers: int = 4, intermediate_size: int = 128,
                num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int | None = None, seed: int = 0,
                dtype: str = "float32", shards: int = 1, arch: str = "llama") -> Path:
    """A random-weight model folder (config.json, *.safetensors, tokenizer) of `arch` that mlx_lm.load accepts."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder = Path(folder)
    tokens = write_tokenizer(folder)
    config = model_config(arch, hidden_size, num_layers, intermediate_size, num_heads, num_kv_heads,
                          max(vocab_size or 0, tokens), dtype)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.eval(weights)
    write_json(folder / "config.json", config)
    _save_weights(folder, weights, shards)
    return folder


def _save_weights(folder: Path, weights: dict, shards: int = 1) -> None:
    import mlx.core as mx

    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    index = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(folder / fname), {k: weights[k] for k in part}, metadata={"format": "mlx"})
        index.update({k: fname for k in part})
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": index})


def write_quantized(source: Path, out: Path, bits: int, group_size: int, quant_predicate=None) -> Path:
    """`source` quantized as mlx_lm.convert does (its quantize_model), tokenizer files copied as they are.

    `quant_predicate(path, module)` may give some modules other settings (a dict) or none (False), as
    mlx_lm's mixed-precision recipes and models such as qwen3_moe (routers at 8 bits) do.
    """
    import contextlib
    import io
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import quantize_model

    model, _, config = load(str(source), return_config=True, lazy=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=quant_predicate)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    _save_weights(out, weights)
    write_json(out / "config.json", config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(source) / name, out / name)
    return out


def write_adapter(model_dir: Path, out: Path, rank: int = 4, scale: float = 10.0, num_layers: int = 2,
                  kind: str = "lora", keys: list[str] | None = None, seed: int = 0) -> Path:
    """An mlx-lm adapter folder with random non-zero updates, built with mlx-lm's own LoRA/DoRA layers.

    Untrained LoRA has lora_b = 0 (no update at all), so lora_b and DoRA's m are
    perturbed: fusing then changes every targeted weight, as a trained adapter would.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(model, num_layers, params, use_dora=(kind == "dora"))
    mx.random.seed(seed)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            value = 0.01 * mx.random.normal(value.shape).astype(value.dtype)
        elif name.endswith(".m"):
            value = value * (1 + 0.05 * mx.random.normal(value.shape)).astype(value.dtype)
        weights[name] = value
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    write_json(out / "adapter_config.json", {"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params})
    return out
