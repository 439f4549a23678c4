"""The Hugging Face Hub: push a version with its card and record, pull one with the commit it came from.

Everything goes through huggingface_hub, so `HF_TOKEN`, `HF_ENDPOINT`,
`HF_HOME` and `HF_HUB_OFFLINE` work as they do for every other Hub tool; a pull
under `HF_HUB_OFFLINE=1` is served from the local cache. A pulled version
records `pulled-from hf://REPO@COMMIT` with the sha256 of its weights, so the
lineage names the exact commit, not a branch that moves.
"""

from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AdapterHubError, NotFoundError
from .registry import AdapterVersion, Registry

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not Path(text).expanduser().exists()


@contextmanager
def _hub_errors(what: str, upload: bool = False) -> Iterator[None]:
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

    with _hub_errors(f"base model {repo_id}"):
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))


def push(registry: Registry, ref: str, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> dict:
    """Upload the exported folder (weights, adapter_config.json, README.md card, adapterhub.json)."""
    from .export import export

    if not REPO_ID.match(repo_id):
        raise AdapterHubError(f"'{repo_id}' is not a Hub repo id", hint="write it as OWNER/NAME")
    version = registry.resolve(ref)
    with tempfile.TemporaryDirectory(prefix="adapterhub-push-") as scratch:
        folder = Path(scratch) / "upload"
        files = sorted(p.name for p in export(registry, version.ref, folder))
        result = {"ref": version.ref, "sha256": version.sha256, "repo_id": repo_id, "revision": revision or "main",
                  "private": private, "files": files}
        if dry_run:
            return {**result, "commit": None, "url": None}
        from huggingface_hub import HfApi

        api = HfApi()
        with _hub_errors(f"push to {repo_id}", upload=True):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=f"{version.ref} (sha256 {version.sha256[:12]}) from adapterhub")
    return {**result, "commit": commit.oid, "url": commit.commit_url}


def pull(registry: Registry, repo_id: str, name: str, revision: str | None = None, base: str | None = None,
         tags: dict[str, str] | None = None) -> tuple[AdapterVersion, bool, str]:
    """Download a repo (or take it from the cache) and import it; returns (version, created, commit)."""
    from huggingface_hub import snapshot_download

    from .fingerprint import hf_cache_sha256
    from .formats import mlx as mlx_format
    from .formats import peft as peft_format
    from .safetensors_io import sha256_file

    if not REPO_ID.match(repo_id):
        raise AdapterHubError(f"'{repo_id}' is not a Hub repo id", hint="write it as OWNER/NAME")
    with _hub_errors(f"pull {repo_id}"):
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=["*.json", "*.safetensors", "README.md"]))
    commit = folder.name if _COMMIT.match(folder.name) else (revision or "unknown")
    weights = next((folder / f for f in (mlx_format.WEIGHTS_FILE, peft_format.WEIGHTS_FILE) if (folder / f).is_file()), None)
    if weights is None:
        raise NotFoundError(f"{repo_id}@{commit[:12]} holds no adapters.safetensors or adapter_model.safetensors",
                            hint="pull a repo that holds an mlx-lm or PEFT adapter")
    sha256 = hf_cache_sha256(weights) or sha256_file(weights)
    # import adds imported-from when the repo's adapterhub.json is proven by the weights, and takes the base
    # that record names when it is registered here.
    parents = [{"ref": f"hf://{repo_id}@{commit}", "sha256": sha256, "relation": "pulled-from"}]
    version, created = registry.import_adapter(folder, name, base=base, tags=tags, parents=parents,
                                               description=f"pulled from {repo_id}@{commit[:12]}")
    return version, created, commit
