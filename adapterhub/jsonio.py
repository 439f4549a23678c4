"""Strict JSON for every file adapterhub reads: what other JSON readers would accept, and nothing deeper.

Python's json module reads NaN, Infinity and 1e999 (as inf), none of which is JSON or
any number a config, record or header can mean; and it recurses without bound.
"""

from __future__ import annotations

import json
import re

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


def loads(text: str | bytes, own_output: bool = False, **hooks) -> object:
    """json.loads, refusing non-finite numbers and nesting deeper than MAX_DEPTH.

    own_output: text this program wrote itself (the catalogue, which `list` reads by the
        thousand files): parsed in C with NaN and Infinity refused and recursion bounded, but
        without the two screens on the text (overflow, depth), which only an edit by hand can trip
        there. What it reads then is still harmless: an infinity is refused when written back,
        and nesting under the recursion limit breaks no reader. `verify` screens every file.

    Raises:
        JSONError: for every way the text fails (json.JSONDecodeError is turned into one too).
    """
    try:
        text = text.decode(json.detect_encoding(text)) if isinstance(text, (bytes, bytearray)) else text
        doc = json.loads(text, parse_constant=_refuse_constant, **hooks)
        if own_output:
            return doc
        outside = _outside_strings(text)
        # Only a number with a 3-digit exponent or 309 digits can overflow to infinity. Screened on the text
        # outside strings, so every float is parsed in C, and parsed again through the checking hook only
        # when one might have overflowed.
        if _might_overflow(outside):
            json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, **hooks)
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
    # Fewer brackets than the limit cannot nest past it: most configs and headers end here.
    if outside.count("[") + outside.count("{") > MAX_DEPTH and _depth(outside) > MAX_DEPTH:
        raise JSONError(f"nested more than {MAX_DEPTH} levels deep")
    return doc


_ESCAPE = re.compile(r"\\.")
_INNERMOST = re.compile(r"\[\]|\{\}")
_BIG_EXPONENT = re.compile(r"[eE]\+?0*[1-9]\d\d")
# str.translate runs in C over every character; a regex with a repeat tries a match at each one, which
# made these screens cost more than the parse itself on a catalogue file.
_OTHER_THAN_BRACKETS = str.maketrans("", "", "".join(chr(c) for c in range(128) if chr(c) not in "[]{}"))
_DIGITS_AS_ZERO = str.maketrans("123456789", "000000000")
_LONGEST_FINITE_RUN = "0" * 309


def _might_overflow(outside: str) -> bool:
    return bool(_BIG_EXPONENT.search(outside)) or (
        len(outside) >= len(_LONGEST_FINITE_RUN) and _LONGEST_FINITE_RUN in outside.translate(_DIGITS_AS_ZERO))


def _outside_strings(text: str) -> str:
    """The text of valid JSON with its strings taken out: escapes first (\\" ends no string), then between the
    quotes every other piece is outside a string."""
    if "\\" in text:
        text = _ESCAPE.sub("", text)
    return "".join(text.split('"')[0::2])


def nesting(text: str) -> int:
    """How deeply JSON the json module accepted nests its arrays and objects.

    Read from the text in C-speed passes, not by walking the parsed document (a catalogue file holds
    tens of thousands of nodes, and `list` reads many files): strings are taken out, then all but the
    brackets, and each pass removes the pairs that hold nothing, one level per pass.
    """
    return _depth(_outside_strings(text))


def _depth(outside: str) -> int:
    # Outside strings only ASCII is left (non-ASCII is only valid JSON inside a string), so the table covers it.
    brackets = outside.translate(_OTHER_THAN_BRACKETS)
    depth = 0
    while brackets and depth <= MAX_DEPTH:  # past the limit, how far past does not matter
        brackets = _INNERMOST.sub("", brackets)
        depth += 1
    return depth
