"""Hugging Face Hub access shared by base resolution and push/pull: repo ids, the local cache, and its errors.

Below the registry on purpose: resolving a base named by repo id needs only the cache.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AdapterHubError, NotFoundError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not Path(text).expanduser().exists()


@contextmanager
def hub_errors(what: str, upload: bool = False) -> Iterator[None]:
    """huggingface_hub's exceptions, as one line that says what to do (an upload has no cache to fall back on)."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except RevisionNotFoundError as e:
        raise NotFoundError(f"{what}: no such revision ({_first_line(e)})", hint="check --revision") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise NotFoundError(f"{what}: the repo is missing, private or gated ({_first_line(e)})",
                            hint="check the repo id, and set HF_TOKEN to a token that can read it") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise NotFoundError(f"{what}: not in the local Hugging Face cache and the Hub is unreachable ({_first_line(e)})",
                            hint="connect and retry, with HF_HUB_OFFLINE unset" if upload
                            else "connect and retry, or download it first with 'hf download REPO_ID'") from None
    except HfHubHTTPError as e:
        raise AdapterHubError(f"{what}: the Hub answered {_first_line(e)}",
                              hint="check HF_TOKEN (it needs write access to push) and the repo id") from None
    except Exception as e:
        # Connection failures come from huggingface_hub's HTTP client (httpx), outside its own hierarchy.
        if isinstance(e, OSError) or type(e).__module__.startswith("httpx"):
            raise AdapterHubError(f"{what}: cannot reach the Hub ({_first_line(e)})",
                                  hint="check the network, or set HF_HUB_OFFLINE=1 to use the local cache") from None
        raise


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """A model repo's folder in the local Hugging Face cache; never downloads (a base model is gigabytes)."""
    from huggingface_hub import snapshot_download

    with hub_errors(f"base model {repo_id}"):
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
