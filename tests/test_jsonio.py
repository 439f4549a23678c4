"""Strict JSON: the nesting limit read from the text agrees with the parsed document, at and around the limit."""

import json
import random

import pytest

from adapterhub import jsonio


def _depth(doc, level=1):
    children = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else ()
    return max([level] + [_depth(c, level + 1) for c in children if isinstance(c, (dict, list))])


def _document(rng, depth):
    # One deep spine with shallow siblings, and strings full of brackets and escapes that must not count.
    if depth == 0:
        return rng.choice([1, "s[{", '"]}', 2.5, None, True, "x\\y", "\\\"[[["])
    inner = [_document(rng, depth - 1)] + [rng.choice([1, "a]", {}, [], {"k": "{"}]) for _ in range(rng.randint(0, 2))]
    rng.shuffle(inner)
    return {f"k{i}": v for i, v in enumerate(inner)} if rng.random() < 0.5 else inner


def test_nesting_read_from_the_text_is_the_documents_depth():
    rng = random.Random(7)
    for _ in range(500):
        doc = {"root": _document(rng, rng.randint(1, 80))}
        text = json.dumps(doc)
        depth = _depth(doc)
        assert jsonio.nesting(text) == depth if depth <= jsonio.MAX_DEPTH else jsonio.nesting(text) > jsonio.MAX_DEPTH
        if depth <= jsonio.MAX_DEPTH:
            assert jsonio.loads(text) == doc
        else:
            with pytest.raises(jsonio.JSONError, match="nested more than 64"):
                jsonio.loads(text)


@pytest.mark.parametrize("depth", [63, 64, 65])
def test_the_limit_is_64_levels_for_text_and_for_bytes_in_any_json_encoding(depth):
    text = "[" * depth + "]" * depth
    for raw in (text, text.encode(), text.encode("utf-16")):
        if depth <= 64:
            assert jsonio.nesting(text) == depth and jsonio.loads(raw) is not None
        else:
            with pytest.raises(jsonio.JSONError):
                jsonio.loads(raw)
