"""The one exception hierarchy. The CLI turns each into `error: message — hint`."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with control characters escaped, so an error line never carries a raw newline or escape code."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class AdapterHubError(Exception):
    """Base of every error adapterhub raises for a mistake a user can fix.

    Args:
        message: what went wrong, with the values involved.
        hint: what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class NotFoundError(AdapterHubError, KeyError):
    """A ref, base, dataset or file that does not exist.

    Args:
        kind: what was looked for ("adapter", "version", "base", "run", "registry", ...), so callers
            tell misses apart without parsing messages.
        key: the name, ref or path that was looked for.
    """

    __str__ = AdapterHubError.__str__

    def __init__(self, message: str, hint: str | None = None, kind: str | None = None, key: object = None):
        super().__init__(message, hint)
        self.kind = kind
        self.key = key


class InvalidNameError(AdapterHubError, ValueError):
    """A name that breaks the registry's naming policy."""


class InvalidAdapterError(AdapterHubError, ValueError):
    """An adapter folder or weight file that cannot be trusted as it is."""


class UnsafeFormatError(InvalidAdapterError):
    """A pickle-based file (.bin, .pt, .pth, .ckpt) that we refuse to open."""


class IncompatibleError(AdapterHubError):
    """An adapter that does not fit a base model; `report` is the compatibility report, when there is one."""

    def __init__(self, message: str, hint: str | None = None, report: object = None):
        super().__init__(message, hint)
        self.report = report


class CorruptRegistryError(AdapterHubError):
    """A catalogue file, blob or record that fails its own checks."""


class SchemaError(AdapterHubError, ValueError):
    """A document that does not match its JSON Schema."""


class ConflictError(AdapterHubError):
    """An operation refused because of what already exists (a dependant, a taken alias)."""
