"""Strict JSON for every file adapterhub reads: what other JSON readers would accept, and nothing deeper.

Python's json module reads NaN, Infinity and 1e999 (as inf), none of which is JSON or
any number a config, record or header can mean; and it recurses without bound.
"""

from __future__ import annotations

import json

# Deeper than any record, config or header we write or read; deeper input is an attack, not data.
MAX_DEPTH = 64


class JSONError(ValueError):
    """Text that is not strict JSON; the message says why, without the text."""


def _refuse_constant(name: str) -> float:
    raise JSONError(f"non-standard number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONError(f"number {text[:20]} overflows to infinity")
    return value


def loads(text: str | bytes, **hooks) -> object:
    """json.loads, refusing non-finite numbers and nesting deeper than MAX_DEPTH.

    Raises:
        JSONError: for every way the text fails (json.JSONDecodeError is turned into one too).
    """
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, **hooks)
    except RecursionError:
        raise JSONError("nesting too deep") from None
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError:
        raise JSONError("not UTF-8 text") from None
    except ValueError as e:
        if type(e) is not ValueError:
            raise  # ours, or a caller's hook saying something of its own
        raise JSONError(str(e)) from None  # int() of thousands of digits
    _check_depth(doc)
    return doc


def _check_depth(doc: object) -> None:
    # Iterative, so the check itself cannot overflow the stack it protects.
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JSONError(f"nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
