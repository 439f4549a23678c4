"""How faithfully a fused model folder reproduces base + adapter: logits and greedy tokens of both on the same
prompts. `fidelity` reports; `check_fidelity` (`eval DIR --against REF`) passes or fails it against a tolerance.

    fidelity(registry, "fused/", "sql-lora@3", ["SELECT"])["max_logit_diff"]
"""

from __future__ import annotations

import json
from pathlib import Path

from . import ranges
from .bases import local_folder
from .errors import AdapterHubError, IncompatibleError, NotFoundError
from .eval_inputs import adapter_target
from .eval_scoring import load_target
from .eval_settings import AGAINST_PROMPTS, DEFAULT_TOLERANCE, FIDELITY_TOKENS, FUSE_PROMPTS
from .records import RECORD_FILE, AdapterVersion
from .files import read_json
from .training.data import DataError, check_split

BUILTIN_PROMPTS = (
    "The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
    "Water boils at a temperature of", "The three primary colours are", "Translate to French: good morning",
    "Q: What is 12 times 7?\nA:", "The most important rule of writing is",
)


def prompts_from(folder: Path, split: str | None = None, count: int = AGAINST_PROMPTS) -> list[str]:
    """Up to `count` prompts from a dataset split (the first that exists of test, valid, train when none is
    given): a completion's prompt, a chat's first message, or a text."""
    folder = Path(folder).expanduser()
    splits = [split] if split else ["test", "valid", "train"]
    path = next((folder / f"{s}.jsonl" for s in splits if (folder / f"{s}.jsonl").is_file()), None)
    if path is None:
        raise NotFoundError(f"{folder} has no {' or '.join(f'{s}.jsonl' for s in splits)}", hint="pass another --split",
                            kind="split", key=str(folder))
    # Every line first, so a bad one is named by file and line rather than failing json.loads below.
    if not check_split(path)[1]:
        raise DataError(f"{path} has no examples", hint="add examples, or pass another --split")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            first = row["messages"][0] if isinstance(row.get("messages"), list) and row["messages"] else None
            text = row.get("prompt") if "prompt" in row else (
                first.get("content") if isinstance(first, dict) else None) if "messages" in row else row.get("text")
            if isinstance(text, str) and text.strip() and text not in prompts:
                prompts.append(text)
            if len(prompts) >= count:
                break
    return prompts or list(BUILTIN_PROMPTS[:count])


def default_prompts(registry, version: AdapterVersion, count: int = FUSE_PROMPTS) -> list[str]:
    """Prompts for a fidelity check of `version`: from the dataset it was trained on when that is on this
    machine, else built-in text."""
    recorded = (version.record.get("dataset") or {}).get("sha256")
    known = next((d for d in registry.datasets() if d["sha256"] == recorded), None) if recorded else None
    folder = local_folder(known)
    if folder:
        try:
            return prompts_from(folder, None, count)
        except AdapterHubError:
            pass  # a dataset changed since training still leaves the built-in text
    return list(BUILTIN_PROMPTS[:count])


def _fidelity_base(registry, folder: Path, version: AdapterVersion, base: str | Path | None) -> Path:
    """The base to apply `version` to: `base`, else the base the folder says it was fused into (when
    registered here), else the version's own."""
    if base is not None:
        return registry.resolve_base(base, need_files=True).path
    claimed = read_json(folder / RECORD_FILE)
    claimed_base = (claimed.get("base") or {}).get("sha256") if isinstance(claimed, dict) else None
    known = registry.bases_by_sha().get(claimed_base) if isinstance(claimed_base, str) else None
    if known:
        return Path(known["path"])
    return adapter_target(registry, version.ref, None).base_path


def _greedy(model, tokens: list[int], count: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)
    out = []
    for _ in range(count):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def fidelity(registry, fused_dir: str | Path, ref: str, prompts: list[str] | None = None, base: str | Path | None = None,
             max_tokens: int = FIDELITY_TOKENS, allow_different_weights: bool = False) -> dict:
    """How closely the model folder `fused_dir` reproduces base + `ref`: on each prompt and `max_tokens` greedy
    tokens of base + adapter after it, the largest logit difference and how often the two argmaxes agree.

    base + adapter runs first and its logits are kept, so the two models are never in memory together.
    `fused_dir` may be a staging folder that is not registered yet; it is loaded as a plain mlx-lm model.

    Args:
        prompts: texts to continue; default: a few from the version's dataset, or built-in text.
        base: the model the adapter is applied to; default: the base `fused_dir`'s adapterhub.json names (when
            registered here), else the version's own.
        allow_different_weights: apply the adapter to a base of its structure with other weights (as fuse was told).

    Returns:
        {"fused", "against", "against_sha256", "base", "prompts", "positions", "max_logit_diff",
         "mean_logit_diff", "token_agreement", "same_continuations", "exact"}: `token_agreement` is the fraction of
        positions whose argmax agree, `same_continuations` the prompts whose greedy continuation is identical,
        `exact` both models give the same tokens everywhere with logits equal to float rounding.
    """
    import mlx.core as mx
    from mlx_lm import load

    folder = Path(fused_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise NotFoundError(f"{folder} is not a model folder (no config.json)", hint="give the folder fuse wrote",
                            kind="model", key=str(folder))
    ranges.require("--max-tokens", max_tokens, ranges.COUNT, hint="pass e.g. 8")
    version = registry.resolve(ref)
    if version.kind == "loreft":
        raise IncompatibleError(f"{version.ref} is a LoReFT adapter: it edits hidden states and is never fused, so no "
                                "fused model can stand for it", hint="compare a LoRA or DoRA version")
    base_path = _fidelity_base(registry, folder, version, base)
    reference = adapter_target(registry, version.ref, str(base_path), allow_different_weights)
    prompts = list(prompts) if prompts else default_prompts(registry, version)
    model, tokenizer = load_target(registry, reference)
    sequences, expected = [], []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt)
        if not tokens:
            continue
        sequence = tokens + _greedy(model, tokens, max_tokens)
        logits = model(mx.array([sequence]))[0].astype(mx.float32)
        mx.eval(logits)
        sequences.append((sequence, len(tokens)))
        expected.append(logits)
    if not sequences:
        raise AdapterHubError("no prompt has a token to compare on", hint="give prompts with text in them")
    del model
    mx.clear_cache()
    fused, _ = load(str(folder))
    fused.eval()
    largest, total, count, agree, same = 0.0, 0.0, 0, 0, 0
    for (sequence, prompt_length), want in zip(sequences, expected):
        got = fused(mx.array([sequence]))[0].astype(mx.float32)
        difference = mx.abs(got - want)
        matches = mx.argmax(got, axis=-1) == mx.argmax(want, axis=-1)
        largest = max(largest, difference.max().item())
        total += difference.mean().item() * len(sequence)
        count += len(sequence)
        agree += int(matches.sum().item())
        # The continuation is greedy from the prompt's last position on: identical when every argmax from there agrees.
        same += bool(matches[prompt_length - 1:].all().item())
    scale = max(float(mx.abs(want).max().item()) for want in expected)
    return {
        "fused": str(folder), "against": version.ref, "against_sha256": version.sha256, "base": str(base_path),
        "prompts": len(sequences), "positions": count, "max_logit_diff": largest, "mean_logit_diff": total / count,
        "token_agreement": agree / count, "same_continuations": same,
        # The same tokens, and logits apart by no more than float32's rounding of another summation order
        # (W x + s B A x against (W + s B A) x), about 1e-5 of the logits' size after a few layers.
        "exact": agree == count and largest <= 1e-4 * max(scale, 1.0),
    }


def check_fidelity(registry, fused_dir: str | Path, ref: str, tolerance: float = DEFAULT_TOLERANCE,
                   data: str | Path | None = None, split: str | None = None, count: int = AGAINST_PROMPTS,
                   base: str | Path | None = None) -> dict:
    """`fidelity` on `count` prompts (from `data`, else the version's dataset, else built-in text), passed when
    at most `tolerance` (a share, 0 to 1) of the positions' greedy tokens differ: the report with `tolerance`,
    `disagreement` and `passed`."""
    ranges.require("--tolerance", tolerance, ranges.Range(0, 1), floating=True, hint="pass a share, e.g. --tolerance 0.01")
    ranges.require("--prompts", count, ranges.COUNT, hint="pass e.g. --prompts 16")
    if data is not None:
        prompts = prompts_from(Path(data), split, count)
    else:
        prompts = default_prompts(registry, registry.resolve(ref), count)
        if len(prompts) < count:
            prompts += [p for p in BUILTIN_PROMPTS if p not in prompts][: count - len(prompts)]
    report = fidelity(registry, fused_dir, ref, prompts, base)
    disagreement = 1.0 - report["token_agreement"]
    return {**report, "tolerance": tolerance, "disagreement": disagreement, "passed": disagreement <= tolerance}
