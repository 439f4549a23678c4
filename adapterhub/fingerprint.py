"""Base model identity: file hashes, the structure hash, the hash cache, the Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from .errors import InvalidAdapterError, NotFoundError
from .safetensors_io import PICKLE_SUFFIXES, quote_name, read_header, refuse_pickle, sha256_file, unloadable_by_mlx
from .files import read_json, write_json

# config.json fields that decide how mlx-lm builds the model and reads its weights: two folders with
# the same weights but another value here are different models (or one mlx-lm cannot load at all).
# Bookkeeping (_name_or_path, torch_dtype, transformers_version, token ids) is left out on purpose.
CONFIG_ESSENTIALS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size",
    "head_dim", "tie_word_embeddings", "hidden_act", "hidden_activation",
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps",
    "rope_theta", "rope_scaling", "rope_traditional", "partial_rotary_factor", "rotary_dim",
    "max_position_embeddings", "sliding_window", "layer_types", "attention_bias", "mlp_bias",
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
)
INDEX_FILE = "model.safetensors.index.json"
DATASET_SPLITS = ("train", "valid", "test")
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")


def cache_dir() -> Path:
    """Where machine-local caches live: they key on inodes, so they never travel with a registry."""
    env = os.environ.get("ADAPTERHUB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub"


class HashCache:
    """sha256 by (real path, size, mtime, inode): an unchanged file is never re-read."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "file-hashes.json"
        self._entries: dict[str, str] | None = None
        self._dirty: dict[str, str] = {}

    @staticmethod
    def key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def get(self, path: Path) -> str | None:
        if self._entries is None:
            self._entries = read_json(self.path, {}) or {}
        return self._entries.get(self.key(path))

    def put(self, path: Path, sha256: str) -> None:
        self._dirty[self.key(path)] = sha256

    def save(self) -> None:
        if not self._dirty:
            return
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            entries = read_json(self.path, {}) or {}
            entries.update(self._dirty)
            write_json(self.path, entries)
        self._entries, self._dirty = entries, {}


def hf_cache_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache already names the file by, if it is an LFS blob link."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _HF_BLOB.match(target.name):
        return target.name
    return None


def hash_files(paths: list[Path], cache: HashCache | None = None, reread: bool = False,
               progress: Callable[[int], None] | None = None, workers: int | None = None) -> dict[Path, str]:
    """sha256 of each file: from the HF cache's blob names, the hash cache, or read on parallel threads.

    hashlib releases the GIL while it hashes, so threads use every core.
    """
    cache = cache or HashCache()
    result: dict[Path, str] = {}
    todo: list[Path] = []
    for p in paths:
        known = None if reread else (hf_cache_sha256(p) or cache.get(p))
        if known:
            result[p] = known
        else:
            todo.append(p)
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        workers = workers or min(len(todo), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for p, sha in zip(todo, pool.map(lambda p: sha256_file(p, progress), todo)):
                result[p] = sha
                cache.put(p, sha)
        cache.save()
    return result


def config_essentials(config: dict) -> dict:
    """What identifies a model's architecture in its config.json, quantization included.

    Every key is present (None when the config lacks it), so a record tells "absent" from "not recorded".
    """
    text = config.get("text_config")
    text = text if isinstance(text, dict) else {}
    essentials = {k: config.get(k, text.get(k)) for k in CONFIG_ESSENTIALS}
    quant = config.get("quantization") or config.get("quantization_config")
    essentials["quantization"] = None
    if isinstance(quant, dict):
        essentials["quantization"] = {"group_size": quant.get("group_size"), "bits": quant.get("bits")}
        # Only when they say something: the common affine, uniform case keeps the shape records always had.
        # Another mode packs the same shapes differently (mlx-lm reads a missing one as affine).
        if quant.get("mode", "affine") != "affine":
            essentials["quantization"]["mode"] = quant["mode"]
        # Per-module overrides (another bit width, or not quantized at all), as mlx-lm's quantize writes them.
        modules = {k: v for k, v in sorted(quant.items()) if isinstance(v, (dict, bool))}
        if modules:
            essentials["quantization"]["modules"] = modules
    return essentials


def canonical_sha256(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_sha256(files: list[dict], essentials: dict) -> str:
    """A model's content hash: its weight files and the config.json fields that say how to read them.

    Anyone who writes a model folder and wants to compare it with a fingerprint (unfuse
    proving it rebuilt the base) must hash it this way.
    """
    return canonical_sha256({"weights": [[f["name"], f["sha256"]] for f in files], "config": essentials})


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files, each inside the folder; pickle-only models are refused.

    The index (model.safetensors.index.json), when there is one, must name only shards
    that are files of this folder: a loader that follows it must read what was hashed here.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(pickles[0])
        raise InvalidAdapterError(f"{model_dir} has no .safetensors weight files", hint="point at a model folder that mlx_lm.load accepts")
    root = model_dir.resolve()
    for shard in _indexed_shards(model_dir):
        _require_inside(root, model_dir / shard, f"{model_dir / INDEX_FILE} names shard {quote_name(shard)}, which")
    for p in files:
        _require_inside(root, p, f"{p.name}")
    return files


def _indexed_shards(model_dir: Path) -> list[str]:
    index_path = model_dir / INDEX_FILE
    index = read_json(index_path)
    if index is None:
        return []
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidAdapterError(f"{index_path} has no weight_map of tensor names to shard file names",
                                  hint="regenerate the index, or remove it (mlx_lm.load does not need it)")
    hint = "an index names shards by their file names in the model folder; regenerate it"
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # A plain file name only: no folders, no '..', no absolute path, no NUL that os calls choke on.
        if not shard or "\x00" in shard or Path(shard).name != shard or shard in (".", ".."):
            raise InvalidAdapterError(f"{index_path} names shard {quote_name(shard)}, which is not a file in {model_dir}",
                                      hint=hint)
        if not shard.endswith(".safetensors"):
            raise InvalidAdapterError(f"{index_path} names shard {quote_name(shard)}, which is not a .safetensors file",
                                      hint=hint)
        if not (model_dir / shard).is_file():
            raise InvalidAdapterError(f"{index_path} names shard {quote_name(shard)}, which is missing from {model_dir}",
                                      hint="download the missing shard, or regenerate the index")
    return shards


def _require_inside(root: Path, path: Path, what: str) -> None:
    """Refuse a file that is a link out of the model folder; a Hugging Face cache's blob links are the exception."""
    real = path.resolve()
    if real.is_relative_to(root):
        return
    # snapshots/<revision>/<file> -> ../../blobs/<hash>: the cache's own layout, its blobs named by content.
    if root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs":
        return
    raise InvalidAdapterError(f"{what} is a link to {real}, outside {root}",
                              hint="copy the file into the model folder; a registered base is read from its folder alone")


def fingerprint_model(path: Path, cache: HashCache | None = None, reread: bool = False,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Fingerprint a model folder: per-file sha256, manifest sha256, structure sha256, essentials.

    Args:
        path: a folder with config.json and *.safetensors.
        cache: the hash cache (the user's by default).
        reread: hash every file again, ignoring the caches (`--verify`).
        progress: called with byte counts as files are read.
    """
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(f"model folder {path} does not exist", hint="give a local model folder or a registered base name")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{path} has no config.json", hint="point at a model folder that mlx_lm.load accepts")
    files = weight_files(path)
    headers = {p: read_header(p) for p in files}
    for p, header in headers.items():
        unloadable = unloadable_by_mlx(header)
        if unloadable:
            name, dtype = next(iter(unloadable.items()))
            more = f" (and {len(unloadable) - 1} more)" if len(unloadable) > 1 else ""
            raise InvalidAdapterError(f"{p}: tensor {quote_name(name)}{more} is {dtype}, which mlx cannot load",
                                      hint="convert the model with mlx_lm.convert (add --dtype float16 or bfloat16)")
    hashes = hash_files(files, cache, reread, progress)
    file_records = [{"name": p.name, "sha256": hashes[p], "size": p.stat().st_size} for p in files]
    tensors: dict[str, list] = {}
    for header in headers.values():
        tensors.update(header.structure())
    essentials = config_essentials(config)
    return {
        "sha256": model_sha256(file_records, essentials),
        "structure_sha256": canonical_sha256({"tensors": tensors, "config": essentials}),
        "model_type": essentials["model_type"],
        "config": essentials,
        "files": file_records,
        "tensors": tensors,
        "path": str(path.resolve()),
    }


def fingerprint_dataset(path: Path, cache: HashCache | None = None) -> dict:
    """A dataset folder's identity: sha256 of each file, a manifest sha256, examples per split."""
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(f"dataset folder {path} does not exist", hint="give a folder with train.jsonl / valid.jsonl / test.jsonl")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InvalidAdapterError(f"dataset folder {path} is empty", hint="give a folder with train.jsonl / valid.jsonl / test.jsonl")
    splits = [path / f"{split}.jsonl" for split in DATASET_SPLITS]
    if not any(p.is_file() for p in splits):
        # mlx_lm.lora reads exactly these names: a folder without them trained nothing.
        raise InvalidAdapterError(f"dataset folder {path} has no train.jsonl, valid.jsonl or test.jsonl",
                                  hint="give the folder mlx_lm.lora --data read: train.jsonl / valid.jsonl / test.jsonl, "
                                       "one JSON example per line")
    examples = {}
    for p in files:
        if p.suffix == ".jsonl" and p.parent == path:
            with open(p, "rb") as f:
                examples[p.stem] = sum(1 for line in f if line.strip())
    if not any(examples.get(split) for split in DATASET_SPLITS):
        present = ", ".join(p.name for p in splits if p.is_file())
        raise InvalidAdapterError(f"dataset folder {path} holds no examples: no line of {present} holds one",
                                  hint="give the folder the adapter was trained on: train.jsonl / valid.jsonl / test.jsonl, "
                                       "one JSON example per line")
    hashes = hash_files(files, cache)
    records = [{"name": str(p.relative_to(path)), "sha256": hashes[p], "size": p.stat().st_size} for p in files]
    return {
        "sha256": canonical_sha256([[r["name"], r["sha256"]] for r in records]),
        "files": records,
        "examples": examples,
        "path": str(path.resolve()),
    }
