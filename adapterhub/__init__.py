"""adapterhub: a registry and lifecycle manager for MLX fine-tuning adapters."""

from .errors import AdapterHubError
from .registry import Registry

__version__ = "0.1.0"
__all__ = ["AdapterHubError", "Registry", "__version__"]
