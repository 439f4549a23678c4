"""Base model identity: file hashes, the structure hash, the hash cache, the Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from .errors import InvalidAdapterError, NotFoundError
from .safetensors_io import PICKLE_SUFFIXES, read_header, refuse_pickle, sha256_file
from .store import read_json, write_json

CONFIG_ESSENTIALS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size",
)
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
    """What identifies a model's shape in its config.json, quantization included."""
    text = config.get("text_config", {})
    essentials = {k: config.get(k, text.get(k)) for k in CONFIG_ESSENTIALS}
    quant = config.get("quantization") or config.get("quantization_config")
    essentials["quantization"] = (
        {"group_size": quant.get("group_size"), "bits": quant.get("bits")} if quant else None
    )
    return essentials


def canonical_sha256(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files; pickle-only models are refused."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(pickles[0])
        raise InvalidAdapterError(f"{model_dir} has no .safetensors weight files", hint="point at a model folder that mlx_lm.load accepts")
    return files


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
    hashes = hash_files(files, cache, reread, progress)
    file_records = [{"name": p.name, "sha256": hashes[p], "size": p.stat().st_size} for p in files]
    tensors: dict[str, list] = {}
    for header in headers.values():
        tensors.update(header.structure())
    essentials = config_essentials(config)
    return {
        "sha256": canonical_sha256([[f["name"], f["sha256"]] for f in file_records]),
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
    hashes = hash_files(files, cache)
    records = [{"name": str(p.relative_to(path)), "sha256": hashes[p], "size": p.stat().st_size} for p in files]
    examples = {}
    for p in files:
        if p.suffix == ".jsonl" and p.parent == path:
            with open(p, "rb") as f:
                examples[p.stem] = sum(1 for line in f if line.strip())
    return {
        "sha256": canonical_sha256([[r["name"], r["sha256"]] for r in records]),
        "files": records,
        "examples": examples,
        "path": str(path.resolve()),
    }
