"""adapterhub: a registry and lifecycle manager for MLX fine-tuning adapters."""

from .errors import AdapterHubError
from .registry import Registry
from .version import __version__

__all__ = ["AdapterHubError", "Registry", "__version__"]
