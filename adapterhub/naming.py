"""Names, refs and the registry's naming policy (SPEC.md, "Naming rules" and "Refs")."""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InvalidNameError, NotFoundError

RESERVED_WORDS = ("latest", "base", "all", "none")
MIN_LENGTH, MAX_LENGTH = 3, 64
SEPARATORS = "-_."
MIN_SHA_PREFIX = 12

# Every rule below is applied with fullmatch: `$` alone would also accept a trailing newline.
_ALLOWED = re.compile(r"[a-z0-9._-]*")
_SHA_PREFIX = re.compile(r"[0-9a-f]{%d,64}" % MIN_SHA_PREFIX)
_ALIAS = re.compile(r"[a-z][a-z0-9._-]{0,63}")
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_TAG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# More digits than any registry will count to; int() of thousands of digits is refused by Python itself.
MAX_VERSION_DIGITS = 12


class Policy(NamedTuple):
    """The naming policy: the SPEC's rules plus an optional pattern and required tags."""

    pattern: str | None = None
    required_tags: tuple[str, ...] = ()
    reserved_words: tuple[str, ...] = RESERVED_WORDS

    @classmethod
    def from_dict(cls, doc: dict) -> "Policy":
        reserved = tuple(dict.fromkeys(RESERVED_WORDS + tuple(doc.get("reserved_words", ()))))
        policy = cls(doc.get("name_pattern"), tuple(doc.get("required_tags", ())), reserved)
        policy.check()
        return policy

    def check(self) -> None:
        """A pattern that does not compile would fail every import later; refuse it where it is read."""
        if not self.pattern:
            return
        try:
            re.compile(_PLACEHOLDER.sub("x", self.pattern))
        except re.error as e:
            raise InvalidNameError(f"the policy's name_pattern {self.pattern!r} is not a valid regular expression: {e}",
                                   hint="fix name_pattern in the registry's policy.json")

    def to_dict(self) -> dict:
        extra = [w for w in self.reserved_words if w not in RESERVED_WORDS]
        return {"name_pattern": self.pattern, "required_tags": list(self.required_tags), "reserved_words": extra}


def broken_rule(name: str, reserved_words: tuple[str, ...] = RESERVED_WORDS) -> str | None:
    """The first built-in rule `name` breaks, or None when it is a valid name."""
    if not MIN_LENGTH <= len(name) <= MAX_LENGTH:
        return f"a name is {MIN_LENGTH}–{MAX_LENGTH} characters long (this one has {len(name)})"
    if not _ALLOWED.fullmatch(name):
        bad = sorted({c for c in name if not _ALLOWED.fullmatch(c)})
        return f"a name uses only lowercase letters, digits and '-', '_', '.' (found {' '.join(map(repr, bad))})"
    if not name[0].isalpha():
        return "a name starts with a letter"
    if name[-1] in SEPARATORS:
        return "a name ends with a letter or digit"
    if re.search(r"[-_.]{2}", name):
        return "a name has no two separators in a row"
    if name in reserved_words:
        return f"'{name}' is a reserved word ({', '.join(reserved_words)})"
    if _SHA_PREFIX.fullmatch(name):
        return f"a name of {MIN_SHA_PREFIX} or more hex digits would read as a sha256 prefix"
    return None


def _slug(raw: str) -> str:
    """Lowercase, name-alphabet only, single separators, none at the ends."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", raw.strip().lower())
    return re.sub(r"[-_.]{2,}", lambda m: m.group(0)[0], slug).strip(SEPARATORS)


def suggest_name(raw: str, reserved_words: tuple[str, ...] = RESERVED_WORDS) -> str:
    """A valid name as close to `raw` as the rules allow."""
    name = _slug(raw)
    if not name or not name[0].isalpha():
        name = f"adapter-{name}".rstrip(SEPARATORS)
    name = name[:MAX_LENGTH].rstrip(SEPARATORS)
    if len(name) < MIN_LENGTH or name in reserved_words:
        name = f"{name}-adapter"
    if _SHA_PREFIX.fullmatch(name):
        name = f"{name[:MAX_LENGTH - 8]}-adapter"
    return name


def check_name(name: str, policy: Policy = Policy(), tags: dict | None = None, base: str | None = None) -> None:
    """Raise InvalidNameError naming the broken rule and a valid suggestion.

    Args:
        name: the proposed adapter name.
        policy: the registry's policy.
        tags: the tags the new version will carry (for required tags and `{key}` placeholders).
        base: the registered name of the base model (for the `{base}` placeholder).
    """
    tags = tags or {}
    rule = broken_rule(name, policy.reserved_words)
    if rule:
        raise InvalidNameError(
            f"invalid name '{name}': {rule}",
            hint=f"try '{suggest_name(name, policy.reserved_words)}'",
        )
    # An empty value satisfies no requirement: `--tag task=` says nothing about the task.
    missing = [t for t in policy.required_tags if not str(tags.get(t) or "").strip()]
    if missing:
        raise InvalidNameError(
            f"the registry policy requires tag(s) {', '.join(missing)} for '{name}'",
            hint="add " + " ".join(f"--tag {t}=VALUE" for t in missing),
        )
    if policy.pattern:
        pattern, example = _expand_pattern(policy.pattern, name, tags, base)
        if not re.search(pattern, name):
            raise InvalidNameError(
                f"invalid name '{name}': the registry policy requires names to match {policy.pattern!r}",
                hint=f"try '{example}'" if example else "edit policy.json in the registry or choose a matching name",
            )


def _expand_pattern(pattern: str, name: str, tags: dict, base: str | None) -> tuple[str, str | None]:
    values = dict(tags, base=base) if base else dict(tags)
    missing = [k for k in _PLACEHOLDER.findall(pattern) if not values.get(k)]
    if missing:
        raise InvalidNameError(
            f"the registry policy pattern {pattern!r} needs a value for {', '.join(missing)}",
            hint=" ".join("--base NAME" if k == "base" else f"--tag {k}=VALUE" for k in missing),
        )
    expanded = _PLACEHOLDER.sub(lambda m: re.escape(_slug(str(values[m.group(1)]))), pattern)
    # A suggestion is only offered for the common prefix form, e.g. '^{base}-{task}-'.
    literal = _PLACEHOLDER.sub(lambda m: _slug(str(values[m.group(1)])), pattern)
    example = None
    if literal.startswith("^") and re.fullmatch(r"\^[a-z0-9._-]+", literal):
        example = suggest_name(literal[1:] + name)
    return expanded, example


def check_tags(tags: dict) -> None:
    """Tag keys are short identifiers; values are any string."""
    for key, value in tags.items():
        if not _TAG_KEY.fullmatch(key):
            raise InvalidNameError(f"invalid tag key '{key}': 1–64 letters, digits, '_', '.', '-'",
                                   hint=f"try '{_slug(key) or 'key'}'")
        if not isinstance(value, str):
            raise InvalidNameError(f"tag '{key}' has a {type(value).__name__} value", hint="tag values are strings")


def check_alias(alias: str) -> None:
    """Aliases share the name alphabet, and cannot look like a version number."""
    if not _ALIAS.fullmatch(alias) or alias[-1] in SEPARATORS or alias in ("latest",):
        raise InvalidNameError(
            f"invalid alias '{alias}': an alias starts with a letter, uses lowercase letters, "
            "digits and '-', '_', '.', ends with a letter or digit and is not 'latest'",
            hint=f"try '{suggest_name(alias)}'",
        )


class Ref(NamedTuple):
    """A parsed ref: `name`, `name@3`, `name@alias`, or a sha256 prefix."""

    text: str
    name: str | None = None
    version: int | None = None
    alias: str | None = None
    sha_prefix: str | None = None


def is_sha256(text: object) -> bool:
    """Whether `text` is a full sha256 in lowercase hex: what a blob address or a record's hash must be."""
    return isinstance(text, str) and len(text) == 64 and _SHA_PREFIX.fullmatch(text) is not None


def parse_ref(text: str) -> Ref:
    """Parse a ref string; a bare 12+ hex string may be a name or a sha prefix (names win).

    Taken exactly as given: `name@1 ` or `name@1\n` is no ref, not `name@1` (rm must never guess).
    """
    if "@" in text:
        name, _, selector = text.partition("@")
        if not name or not selector:
            raise InvalidNameError(f"invalid ref '{text}'", hint="use NAME, NAME@VERSION, NAME@ALIAS or a sha256 prefix")
        if selector.isdigit() or selector.isnumeric():
            # Versions are ASCII digits counted from 1; int() would read '²' or '١' as another version.
            if not (selector.isascii() and len(selector) <= MAX_VERSION_DIGITS):
                raise NotFoundError(f"adapter '{name}' has no version '{selector}'",
                                    hint="versions are numbered 1, 2, 3… in ASCII digits")
            return Ref(text, name=name, version=int(selector))
        if selector == "latest":
            return Ref(text, name=name)
        return Ref(text, name=name, alias=selector)
    sha = text.lower() if _SHA_PREFIX.fullmatch(text.lower()) else None
    return Ref(text, name=text, sha_prefix=sha)


# A remote's name in REMOTE:REF (adapterhub remote add NAME ...).
_REMOTE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def is_remote_name(text: str) -> bool:
    """Whether `text` reads as a remote's name (a Hub repo id always has a '/')."""
    return _REMOTE_NAME.fullmatch(text) is not None


def split_remote_ref(text: str) -> tuple[str, str] | None:
    """`team:sql-lora@3` -> ("team", "sql-lora@3"); None when `text` names nothing remote.

    A local ref never holds ':' (names, aliases and sha prefixes have no colon), so the colon decides.
    """
    remote, sep, ref = text.partition(":")
    if not sep or not is_remote_name(remote):
        return None
    if not ref:
        raise InvalidNameError(f"'{text}' names a remote but no adapter", hint=f"write it as {remote}:NAME[@VERSION|@ALIAS]")
    return remote, ref
