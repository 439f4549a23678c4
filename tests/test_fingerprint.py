import hashlib
import os
import shutil

import pytest

from adapterhub.errors import UnsafeFormatError
from adapterhub.fingerprint import HashCache, fingerprint_dataset, fingerprint_model, hash_files


def test_file_hashes_are_plain_sha256(tiny_model, tmp_path):
    fp = fingerprint_model(tiny_model, HashCache(tmp_path / "c.json"))
    for f in fp["files"]:
        assert f["sha256"] == hashlib.sha256((tiny_model / f["name"]).read_bytes()).hexdigest()
    assert fp["config"]["num_hidden_layers"] == 4 and fp["config"]["quantization"] is None
    assert "model.layers.0.self_attn.q_proj.weight" in fp["tensors"]


def test_structure_hash_ignores_weights_but_content_hash_does_not(tiny_model, tiny_model_other_weights, tmp_path):
    a = fingerprint_model(tiny_model, HashCache(tmp_path / "c.json"))
    b = fingerprint_model(tiny_model_other_weights, HashCache(tmp_path / "c.json"))
    assert a["structure_sha256"] == b["structure_sha256"]
    assert a["sha256"] != b["sha256"]


def test_quantized_model_has_another_structure(tiny_model, tiny_model_4bit, tmp_path):
    a = fingerprint_model(tiny_model, HashCache(tmp_path / "c.json"))
    q = fingerprint_model(tiny_model_4bit, HashCache(tmp_path / "c.json"))
    assert q["config"]["quantization"] == {"group_size": 32, "bits": 4}
    assert a["structure_sha256"] != q["structure_sha256"]


def test_sharded_model_hashes_every_shard_in_parallel(tmp_path):
    from adapterhub.tinymodel import write_model

    model = write_model(tmp_path / "sharded", shards=3)
    fp = fingerprint_model(model, HashCache(tmp_path / "c.json"))
    assert [f["name"] for f in fp["files"]] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_warm_cache_does_not_reread_unchanged_files(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    cache = HashCache(tmp_path / "c.json")
    first = fingerprint_model(model, cache)
    # Change the bytes but keep size and mtime: only a reread could notice.
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint_model(model, HashCache(tmp_path / "c.json"))["sha256"] == first["sha256"]
    assert fingerprint_model(model, HashCache(tmp_path / "c.json"), reread=True)["sha256"] != first["sha256"]


def test_touched_file_is_rehashed(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    first = fingerprint_model(model, HashCache(tmp_path / "c.json"))
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint_model(model, HashCache(tmp_path / "c.json"))["sha256"] != first["sha256"]


def test_hugging_face_cache_blob_names_are_trusted_until_verify(tiny_model, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    real = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    shutil.copy(tiny_model / "model.safetensors", blobs / real)
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{real}")
    shutil.copy(tiny_model / "config.json", snapshot / "config.json")
    cache = HashCache(tmp_path / "c.json")
    assert hash_files([snapshot / "model.safetensors"], cache) == {snapshot / "model.safetensors": real}
    assert not (tmp_path / "c.json").exists()  # nothing was read, so nothing was cached
    # A blob whose name lies is only caught when asked to reread.
    liar = "b" * 64
    (blobs / real).rename(blobs / liar)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{liar}")
    assert fingerprint_model(snapshot, cache)["files"][0]["sha256"] == liar
    assert fingerprint_model(snapshot, cache, reread=True)["files"][0]["sha256"] == real


def test_pickle_only_model_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFormatError):
        fingerprint_model(tmp_path / "m")


def test_dataset_fingerprint_counts_examples(tiny_data, tmp_path):
    fp = fingerprint_dataset(tiny_data, HashCache(tmp_path / "c.json"))
    assert fp["examples"] == {"train": 64, "valid": 16, "test": 16}
    assert {f["name"] for f in fp["files"]} == {"train.jsonl", "valid.jsonl", "test.jsonl"}
