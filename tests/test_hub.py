"""push and pull with huggingface_hub: pulls run offline from a Hugging Face cache that huggingface_hub
itself filled (snapshot_download from a local server speaking the Hub's download API)."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from huggingface_hub import snapshot_download

from adapterhub.registry import Registry
from tests.conftest import subprocess_env
from tests.fake_hub import FakeHub
from tests.test_peft import peft_config, write_peft_folder


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def hf_cache(tmp_path):
    return tmp_path / "hf-cache"


def publish(hub, hf_cache, repo_id, folder, branch="main") -> str:
    """Put a folder on the local hub, then download it into the cache with huggingface_hub."""
    commit = hub.add(repo_id, folder, branch)
    snapshot_download(repo_id, revision=branch, endpoint=hub.url, cache_dir=hf_cache)
    return commit


def offline(registry_root, hf_cache, *args):
    """The real CLI in its own process, offline: all it can read of the Hub is the cache."""
    env = {**subprocess_env(), "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry_root), *map(str, args)],
                          capture_output=True, text=True, env=env)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def published(cli, registry, hub, hf_cache, lora_adapter, tiny_model, tiny_data, tmp_path):
    """stories@1 exported from one registry and published as me/stories."""
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model, "--dataset", tiny_data)[0] == 0
    assert cli("export", "stories", tmp_path / "export")[0] == 0
    return publish(hub, hf_cache, "me/stories", tmp_path / "export")


def test_pull_offline_records_the_commit_and_the_original_version(cli, registry, published, hf_cache, tiny_model, tmp_path):
    other = tmp_path / "other"
    Registry(other).init()
    assert offline(other, hf_cache, "base", "add", tiny_model)[0] == 0
    code, out, err = offline(other, hf_cache, "--json", "pull", "me/stories", "--name", "pulled")
    assert code == 0, err
    record = json.loads(out)
    original = registry.resolve("stories")
    assert record["commit"] == published and record["sha256"] == original.sha256
    assert record["parents"] == [
        {"ref": f"hf://me/stories@{published}", "sha256": original.sha256, "relation": "pulled-from"},
        {"ref": "stories@1", "sha256": original.sha256, "relation": "imported-from"}]
    assert record["base"]["sha256"] == original.record["base"]["sha256"]  # found by content from adapterhub.json
    pulled = Registry(other)
    got = mx.load(str(pulled.objects.path(record["sha256"])), format="safetensors")
    expected = mx.load(str(registry.objects.path(original.sha256)), format="safetensors")
    assert all(mx.array_equal(got[k], expected[k]).item() for k in expected)
    code, out, _ = offline(other, hf_cache, "lineage", "pulled")
    assert code == 0 and f"pulled-from: source hf://me/stories@{published}" in out
    assert offline(other, hf_cache, "verify")[0] == 0


def test_pull_a_branch_gets_its_commit(cli, registry, hub, hf_cache, published, tiny_model, tmp_path):
    from adapterhub.tinymodel import write_adapter

    commit = publish(hub, hf_cache, "me/stories", write_adapter(tiny_model, tmp_path / "v2", seed=4), branch="v2")
    assert commit != published
    code, out, err = offline(registry.root, hf_cache, "--json", "pull", "me/stories", "--revision", "v2", "--name", "branch",
                             "--base", tiny_model)
    assert code == 0, err
    record = json.loads(out)
    assert record["commit"] == commit and record["parents"][0]["ref"] == f"hf://me/stories@{commit}"
    assert len(record["parents"]) == 1  # no adapterhub.json in that commit: nothing more is claimed


def test_pull_a_peft_repo(registry, hub, hf_cache, tiny_model, tmp_path):
    write_peft_folder(tmp_path / "peft", tiny_model, peft_config())
    publish(hub, hf_cache, "someone/peft-lora", tmp_path / "peft")
    code, out, err = offline(registry.root, hf_cache, "--json", "pull", "someone/peft-lora", "--name", "from-hub",
                             "--base", tiny_model)
    assert code == 0, err
    record = json.loads(out)
    assert record["source"]["format"] == "peft" and record["scale"] == 4.0 and record["rank"] == 4


def test_pull_what_the_cache_lacks_fails_offline_with_a_hint(registry, hf_cache):
    code, _, err = offline(registry.root, hf_cache, "pull", "me/nothing-here", "--name", "x")
    assert code == 1 and err.startswith("error: pull me/nothing-here: not in the local Hugging Face cache")
    assert "hf download" in err and "Traceback" not in err


def test_push_offline_does_not_suggest_downloading(registry, hf_cache, lora_adapter):
    registry.import_adapter(lora_adapter, "stories")
    code, _, err = offline(registry.root, hf_cache, "push", "stories", "me/stories")
    assert code == 1 and err.startswith("error: push to me/stories:") and len(err.splitlines()) == 1
    assert "download" not in err and "with HF_HUB_OFFLINE unset" in err, err


def test_a_base_named_by_repo_id_resolves_through_the_cache(cli, registry, hub, hf_cache, tiny_model, lora_adapter, tmp_path):
    publish(hub, hf_cache, "org/tiny-llama", tiny_model)
    code, out, err = offline(registry.root, hf_cache, "--json", "base", "add", "org/tiny-llama")
    assert code == 0, err
    base = json.loads(out)
    assert base["hf_repo"] == "org/tiny-llama" and "/snapshots/" in base["path"]
    _, local, _ = offline(registry.root, hf_cache, "--json", "import", lora_adapter, "--name", "stories", "--base", tiny_model)
    assert json.loads(local)["base"]["sha256"] == base["sha256"]  # the same model, read from the cache or from the folder
    code, card, _ = offline(registry.root, hf_cache, "card", "stories")
    assert code == 0 and 'base_model: "org/tiny-llama"' in card
    code, _, err = offline(registry.root, hf_cache, "base", "add", "org/not-cached")
    assert code == 1 and "not in the local Hugging Face cache" in err


def test_push_dry_run_lists_exactly_the_files_it_would_send(cli, registry, lora_adapter, tiny_model):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    code, out, _ = cli("--json", "push", "stories", "me/stories", "--dry-run", "--private", "--revision", "dev")
    result = json.loads(out)
    assert code == 0 and result["files"] == ["README.md", "adapter_config.json", "adapterhub.json", "adapters.safetensors"]
    assert result["private"] and result["revision"] == "dev" and result["commit"] is None
    code, _, err = cli("push", "stories", "not a repo id")
    assert code == 1 and "is not a Hub repo id" in err


@pytest.mark.network
@pytest.mark.skipif(not (os.environ.get("HF_TOKEN") and os.environ.get("ADAPTERHUB_TEST_REPO")),
                    reason="needs HF_TOKEN and ADAPTERHUB_TEST_REPO (a repo id the token may write)")
def test_push_to_the_hub_sends_exactly_the_expected_files(cli, registry, lora_adapter, tiny_model):
    from huggingface_hub import HfApi

    repo = os.environ["ADAPTERHUB_TEST_REPO"]
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    code, out, err = cli("--json", "push", "stories", repo, "--private")
    assert code == 0, err
    commit = json.loads(out)["commit"]
    files = sorted(HfApi().list_repo_files(repo, revision=commit))
    assert [f for f in files if f != ".gitattributes"] == ["README.md", "adapter_config.json", "adapterhub.json", "adapters.safetensors"]
