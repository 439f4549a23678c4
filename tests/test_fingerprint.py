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


def _with_config(tiny_model, folder, **changes):
    import json

    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes", [{"hidden_size": 128}, {"model_type": "mistral"}, {"rope_theta": 500000.0},
                                     {"rms_norm_eps": 1e-6}, {"tie_word_embeddings": False}, {"head_dim": 32},
                                     {"quantization": {"group_size": 64, "bits": 4, "mode": "mxfp4"}}], ids=lambda c: next(iter(c)))
def test_config_fields_that_shape_the_model_are_part_of_both_hashes(tiny_model, tmp_path, changes):
    # The same weights read with another architecture are another model (or one mlx_lm cannot load).
    cache = HashCache(tmp_path / "c.json")
    original = fingerprint_model(tiny_model, cache)
    edited = fingerprint_model(_with_config(tiny_model, tmp_path / "m", **changes), cache)
    assert edited["files"] == original["files"]
    assert edited["sha256"] != original["sha256"]
    assert edited["structure_sha256"] != original["structure_sha256"]


def test_bookkeeping_config_fields_are_not_identity(tiny_model, tmp_path):
    cache = HashCache(tmp_path / "c.json")
    original = fingerprint_model(tiny_model, cache)
    edited = fingerprint_model(_with_config(tiny_model, tmp_path / "m", _name_or_path="org/other", torch_dtype="bfloat16",
                                            transformers_version="9.9.9", bos_token_id=7), cache)
    assert (edited["sha256"], edited["structure_sha256"]) == (original["sha256"], original["structure_sha256"])


def test_sharded_hugging_face_snapshot_with_blob_links_is_read(tmp_path):
    # Shards in the Hugging Face cache are links out of the snapshot folder, into the repo's blobs: allowed.
    from adapterhub.tinymodel import write_model

    model = write_model(tmp_path / "src", shards=2)
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in model.iterdir():
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, blobs / sha)
        (snapshot / path.name).symlink_to(f"../../blobs/{sha}")
    fp = fingerprint_model(snapshot, HashCache(tmp_path / "c.json"))
    assert fp["sha256"] == fingerprint_model(model, HashCache(tmp_path / "c.json"))["sha256"]


@pytest.mark.parametrize("shard", ["../model-00001-of-00002.safetensors", "/tmp/model-00001-of-00002.safetensors",
                                   "sub/model-00001-of-00002.safetensors", "model-00003-of-00002.safetensors",
                                   "pytorch_model.bin"])
def test_index_naming_a_shard_that_is_not_a_file_of_the_folder_is_refused(tmp_path, shard):
    import json

    from adapterhub.errors import InvalidAdapterError
    from adapterhub.tinymodel import write_model

    model = write_model(tmp_path / "m", shards=2)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidAdapterError) as info:
        fingerprint_model(model, HashCache(tmp_path / "c.json"))
    assert f"names shard '{shard}'" in info.value.message


@pytest.mark.parametrize("fill, message", [
    ({"README.md": "# data\n"}, "has no train.jsonl, valid.jsonl or test.jsonl"),
    ({"train.jsonl": "", "test.jsonl": "\n"}, "holds no examples"),
])
def test_dataset_without_examples_is_refused(tmp_path, fill, message):
    from adapterhub.errors import InvalidAdapterError

    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in fill.items():
        (folder / name).write_text(text)
    with pytest.raises(InvalidAdapterError, match=message) as info:
        fingerprint_dataset(folder, HashCache(tmp_path / "c.json"))
    assert "train.jsonl / valid.jsonl / test.jsonl" in info.value.hint


def test_a_base_fingerprinted_before_config_counted_is_still_exact(tiny_model, tmp_path):
    # Registries hold bases whose sha256 covered the weight files only, and whose config had 7 fields:
    # the same folder, fingerprinted now, is still the adapter's exact base; an edited config is not.
    from adapterhub import compat
    from adapterhub.fingerprint import CONFIG_ESSENTIALS, canonical_sha256

    fp = fingerprint_model(tiny_model, HashCache(tmp_path / "c.json"))
    legacy_config = {k: fp["config"][k] for k in (*CONFIG_ESSENTIALS[:7], "quantization")}
    legacy = {"name": "tiny-llama", "model_type": "llama", "config": legacy_config,
              "sha256": canonical_sha256([[f["name"], f["sha256"]] for f in fp["files"]]),
              "structure_sha256": canonical_sha256({"tensors": fp["tensors"], "config": legacy_config})}
    modules = {"model.layers.3.self_attn.q_proj": (64, 64)}

    def report(base):
        return compat.check(compat.AdapterShape("a@1", modules, [3], legacy, fp["files"]), "candidate", base)

    same = report(fp)
    assert same.verdict == "exact" and "more config.json fields (attention_bias" in same.notes[1]
    edited = fingerprint_model(_with_config(tiny_model, tmp_path / "m", hidden_size=128), HashCache(tmp_path / "c.json"))
    assert report(edited).verdict == "different-config" and "hidden_size 64 → 128" in report(edited).problems[0]
