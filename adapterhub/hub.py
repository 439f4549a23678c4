"""The Hugging Face Hub: push a version with its card and record, pull one with the commit it came from.

Everything goes through huggingface_hub, so `HF_TOKEN`, `HF_ENDPOINT`,
`HF_HOME` and `HF_HUB_OFFLINE` work as they do for every other Hub tool; a pull
under `HF_HUB_OFFLINE=1` is served from the local cache. A pulled version
records `pulled-from hf://REPO@COMMIT` with the sha256 of its weights, so the
lineage names the exact commit, not a branch that moves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import AdapterHubError, ConflictError, NotFoundError
from .hf import COMMIT, REPO_ID, hub_errors
from .records import AdapterVersion
from .registry import Registry

def push(registry: Registry, ref: str, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> dict:
    """Upload the exported folder (weights, adapter_config.json, README.md card, adapterhub.json).

    The commit names the branch head it was made on (`parent_commit`), so two pushes to one repo
    at once cannot overwrite each other: the Hub refuses the later one, which becomes a conflict.
    """
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
            return {**result, "commit": None, "url": None, "parent_commit": None}
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        branch = revision or "main"
        with hub_errors(f"push to {repo_id}", upload=True):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            parent = _head(api, repo_id, branch)
            try:
                commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, parent_commit=parent,
                                           commit_message=f"{version.ref} (sha256 {version.sha256[:12]}) from adapterhub")
            except HfHubHTTPError as e:
                if getattr(e.response, "status_code", None) != 412:
                    raise
                raise ConflictError(f"push to {repo_id}@{branch}: someone else pushed to it since {str(parent)[:12]}, "
                                    "so this push was refused rather than overwrite theirs",
                                    hint=f"look at the new commit on {repo_id}, then push again") from None
    return {**result, "commit": commit.oid, "url": commit.commit_url, "parent_commit": parent}


def _head(api, repo_id: str, branch: str) -> str | None:
    """The commit a branch points at now; None for a repo with no commit yet (nothing to overwrite)."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.model_info(repo_id, revision=branch).sha
    except RevisionNotFoundError:
        return None


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
    with hub_errors(f"pull {repo_id}"):
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=["*.json", "*.safetensors", "README.md"]))
    commit = folder.name if COMMIT.match(folder.name) else (revision or "unknown")
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
