"""Training data checked before any model is loaded: a bad line is named by file and line number."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdapterHubError

SPLITS = ("train", "valid", "test")


class DataError(AdapterHubError, ValueError):
    """Training data that mlx-lm's datasets would reject, or worse, silently misread."""


def _format_of(row: dict) -> str | None:
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


def _check_messages(messages, where: str) -> None:
    """Chat rows as mlx-lm's ChatDataset and a chat template read them: a list of {role, content} objects."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list", hint="fix or remove that line")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', not {type(message).__name__}",
                            hint="fix or remove that line")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise DataError(f"{where}: messages[{i}] has no string 'role'", hint="fix or remove that line")
        content = message.get("content")
        # OpenAI's format lets an assistant turn that calls tools carry no content.
        if content is None and message["role"] == "assistant" and message.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}] has no string 'content'", hint="fix or remove that line")


def check_split(path: Path, expected: str | None = None) -> tuple[str | None, int]:
    """Every line of one split file as mlx-lm's datasets read it: its format (None when it has no lines) and its
    examples. Training and evaluation both read data through here, so what one accepts the other does too.

    Args:
        expected: the format earlier files of the dataset had; mlx-lm reads one format per dataset.

    Raises:
        DataError: the first problem, with its file and line number.
    """
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 ({e.reason})", hint="re-save the file as UTF-8") from None
    first_format, count = expected, 0
    for number, line in lines:
        where = f"{path}:{number}"
        if not line.strip():
            # mlx-lm's load_local_dataset json.loads every line, blank ones too, and fails on them:
            # refused here, so the data that trains here is data mlx_lm.lora reads as well.
            raise DataError(f"{where}: blank line", hint="remove blank lines (mlx-lm reads one JSON object per line)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})", hint="fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a line must be a JSON object, not {type(row).__name__}", hint="fix or remove that line")
        kind = _format_of(row)
        if kind is None:
            raise DataError(f"{where}: has none of 'text', 'prompt'+'completion' or 'messages'",
                            hint="use one of mlx-lm's data formats (see mlx-lm's LORA.md)")
        first_format = first_format or kind
        if kind != first_format:
            raise DataError(f"{where}: is {kind} data but earlier lines are {first_format}", hint="use one format per dataset")
        values = [row["text"]] if kind == "text" else [row["prompt"], row["completion"]] if kind == "completions" else []
        if any(not isinstance(v, str) or not v for v in values):
            raise DataError(f"{where}: empty or non-string text", hint="fix or remove that line")
        if kind == "chat":
            _check_messages(row["messages"], where)
        count += 1
    return first_format, count


def validate(folder: Path, mask_prompt: bool = False) -> dict[str, int]:
    """Check every line of train/valid/test.jsonl; returns examples per split.

    Raises:
        DataError: the first problem, with its file and line number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist", hint="give a folder with train.jsonl (and valid.jsonl)")
    if not (folder / "train.jsonl").is_file():
        raise DataError(f"{folder} has no train.jsonl", hint="mlx-lm reads train.jsonl, valid.jsonl and test.jsonl")
    counts, first_format = {}, None
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if path.is_file():
            first_format, counts[split] = check_split(path, first_format)
    for split, count in counts.items():
        if split != "train" and not count:
            # mlx-lm's create_dataset reads the format from the first row: an empty file fails there.
            raise DataError(f"{folder / f'{split}.jsonl'} has no examples", hint="add examples or remove the file")
    if not counts.get("train"):
        raise DataError(f"{folder / 'train.jsonl'} has no examples", hint="add training examples")
    if mask_prompt and first_format == "text":
        raise DataError("--mask-prompt needs completions or chat data, not text", hint="drop --mask-prompt")
    return counts
