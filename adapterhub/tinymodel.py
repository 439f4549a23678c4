"""Tiny local llama models, tokenizers and datasets: for the demo, the tests and the benches.

Nothing can be downloaded here, so everything a lifecycle needs is made from
scratch: random weights saved as mlx-lm saves them, a word-level tokenizer made
with the `tokenizers` library, and small JSONL datasets in mlx-lm's formats.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .store import atomic_write, write_json

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


def write_tokenizer(folder: Path) -> int:
    """A word-level tokenizer that transformers' AutoTokenizer (and so mlx_lm.load) accepts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

    vocab = {w: i for i, w in enumerate(_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 512, "clean_up_tokenization_spaces": False,
        # A minimal template, so completions and chat data (which mlx-lm formats with it) work too.
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    })
    return len(vocab)


def write_model(folder: Path, hidden_size: int = 64, num_layers: int = 4, intermediate_size: int = 128,
                num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int | None = None, seed: int = 0,
                dtype: str = "float32", shards: int = 1) -> Path:
    """A random-weight llama folder (config.json, *.safetensors, tokenizer) that mlx_lm.load accepts."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder = Path(folder)
    tokens = write_tokenizer(folder)
    vocab_size = max(vocab_size or 0, tokens)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden_size,
        "num_hidden_layers": num_layers, "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size, "tie_word_embeddings": True, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**{k: v for k, v in config.items() if k not in ("architectures", "bos_token_id", "eos_token_id", "torch_dtype")}))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.eval(weights)
    write_json(folder / "config.json", config)
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    else:
        index = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            mx.save_safetensors(str(folder / fname), {k: weights[k] for k in part}, metadata={"format": "mlx"})
            index.update({k: fname for k in part})
        write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": index})
    return folder


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
