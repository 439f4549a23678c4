"""Generation with a registered adapter: checked against the base first, then mlx-lm does the rest."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import AdapterHubError, IncompatibleError
from . import ranges


def load_loreft(registry, version, model):
    """Wrap `model`'s layers with the version's LoReFT interventions and load their weights."""
    import mlx.core as mx

    from . import loreft

    weights = mx.load(str(registry.weights(version)), format="safetensors")
    loreft.load(model, weights, loreft.config_from(version.record["loreft"]))
    return model


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """Chat messages as the model was tuned to read them: in the tokenizer's chat template with the assistant's
    turn opened, encoded without added special tokens (the template writes its own). This is how the
    mlx_lm.generate command line and mlx-lm's server encode a chat, and how mlx-lm's datasets tokenize training
    data; `generate` and `serve` both go through here."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def templated(tokenizer, prompt: str, use_chat_template: bool = True) -> str | list[int]:
    """The prompt in the form mlx-lm's generate takes: with a chat template (unless told not to), one user turn
    as chat_tokens gives it; else the text as given (mlx-lm adds the BOS)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return chat_tokens(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


def generate(registry, ref: str, base: str | None, prompt: str, max_tokens: int = 100,
             allow_different_weights: bool = False, use_chat_template: bool = True) -> dict:
    """Load base + adapter with mlx-lm and generate greedily; returns {ref, base, prompt, text, chat_template}."""
    # Before the model loads: mlx-lm fails on zero or negative lengths with an error about its internals.
    ranges.require("--max-tokens", max_tokens, ranges.COUNT, hint="pass e.g. --max-tokens 100")
    version = registry.resolve(ref)
    if base is None:
        recorded = version.record.get("base")
        if not recorded:
            raise AdapterHubError(f"{version.ref} records no base model", hint="pass --base PATH|NAME")
        base = registry.base(recorded["sha256"])["name"]
    report = registry.check(version.ref, base, allow_different_weights)
    if not report.compatible:
        raise IncompatibleError(f"{version.ref} is not compatible with {base}: {report.problems[0]}",
                                hint=f"run 'adapterhub check {version.ref} --base {base}'")
    # A folder is loaded as it is: resolving it would fingerprint (hash) the whole model first.
    base_path = Path(base).expanduser() if Path(base).expanduser().is_dir() else registry.resolve_base(base, need_files=True).path
    from mlx_lm import generate as mlx_generate, load

    from .export import copy_stored_files

    if version.kind == "loreft":
        from . import loreft

        model, tokenizer = load(str(base_path))
        text = loreft.generate(load_loreft(registry, version, model), tokenizer,
                               templated(tokenizer, prompt, use_chat_template), max_tokens)
        return _result(version, base_path, prompt, text, tokenizer, use_chat_template)

    with tempfile.TemporaryDirectory(prefix="adapterhub-generate-") as tmp:
        copy_stored_files(registry, version, Path(tmp) / "adapter")
        model, tokenizer = load(str(base_path), adapter_path=str(Path(tmp) / "adapter"))
    text = mlx_generate(model, tokenizer, prompt=templated(tokenizer, prompt, use_chat_template), max_tokens=max_tokens)
    return _result(version, base_path, prompt, text, tokenizer, use_chat_template)


def _result(version, base_path: Path, prompt: str, text: str, tokenizer, use_chat_template: bool) -> dict:
    return {"ref": version.ref, "base": str(base_path), "prompt": prompt, "text": text,
            "chat_template": bool(use_chat_template and getattr(tokenizer, "chat_template", None))}
