"""The package version, where nothing imports back (registry markers and run records name it)."""

__version__ = "0.1.0"
