"""Files that mlx, mlx_lm or the safetensors library would refuse are refused up front: exit 1, one line, nothing written.

Each of these used to be registered (or to crash with an unexpected error), so the
damage surfaced only later, as a fuse that failed or wrote a model mlx_lm cannot load.
"""

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import assert_refused, snapshot


# ---- damaging an adapter folder ----------------------------------------------

def _header_and_data(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + length].decode(), raw[8 + length:]


def _write(path, header: str, data: bytes):
    path.write_bytes(struct.pack("<Q", len(header.encode())) + header.encode() + data)


def _edit_header(edit):
    """A damage that rewrites the JSON header of adapters.safetensors and keeps its data bytes."""
    def damage(folder):
        path = folder / "adapters.safetensors"
        header, data = _header_and_data(path)
        _write(path, edit(header), data)
    return damage


def _set_metadata(value):
    def edit(header):
        doc = json.loads(header)
        doc["__metadata__"] = value
        return json.dumps(doc)
    return edit


def _name_twice(header):
    # The first tensor again, same offsets: json.loads keeps one, so the file looked whole.
    doc = json.loads(header)
    name = sorted(k for k in doc if k != "__metadata__")[0]
    return header[:-1] + "," + json.dumps(name) + ":" + json.dumps(doc[name]) + "}"


def _deeply_nested(header):
    return '{"deep":' + '{"a":' * 100_000 + '"x"' + "}" * 100_000 + "," + header[1:]


def _as_float64(folder):
    from safetensors.numpy import save_file

    tensors = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}
    save_file(tensors, str(folder / "adapters.safetensors"))


def _as_int32(folder):
    tensors = {k: (v * 1000).astype(mx.int32) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}
    mx.save_safetensors(str(folder / "adapters.safetensors"), tensors)


def _config_text(old, new):
    """Edit adapter_config.json as text: 1e999 is JSON that Python reads as an infinity."""
    def damage(folder):
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config["lora_parameters"]["scale"] = "SCALE"
        config["lora_parameters"]["dropout"] = "DROPOUT"
        text = json.dumps(config).replace('"SCALE"', "20.0").replace('"DROPOUT"', "0.0")
        assert old in text
        path.write_text(text.replace(old, new))
    return damage


# (case, damage, what the one line says)
ADAPTER_CASES = [
    ("metadata not an object", _edit_header(_set_metadata(["format", "mlx"])), "__metadata__ is not a map of strings to strings"),
    ("metadata value not a string", _edit_header(_set_metadata({"format": 1})), "__metadata__ is not a map of strings to strings"),
    ("tensor named twice", _edit_header(_name_twice), "header names 'model.layers."),
    ("header nested 100,000 deep", _edit_header(_deeply_nested), "is not JSON a safetensors reader accepts (nesting too deep)"),
    ("float64 weights", _as_float64, "is F64, which mlx cannot load"),
    ("integer weights", _as_int32, "is I32; adapter weights must be floating point"),
    ("scale is infinite", _config_text('"scale": 20.0', '"scale": 1e999'), "is damaged: number 1e999 overflows to infinity"),
    ("scale is NaN", _config_text('"scale": 20.0', '"scale": NaN'), "adapter_config.json is damaged: non-standard number NaN"),
    ("dropout is 1", _config_text('"dropout": 0.0', '"dropout": 1.0'), "1.0 is greater than or equal to the maximum of 1 at lora_parameters/dropout"),
]


# ---- damaging a base model folder --------------------------------------------

def _sharded(tmp_path, name="sharded"):
    from adapterhub.tinymodel import write_model

    return write_model(tmp_path / name, shards=2)


def _index(model):
    return json.loads((model / "model.safetensors.index.json").read_text())


def _point_shard(model, shard_to):
    """Make the index name `shard_to(first shard, model)` instead of the first shard."""
    index = _index(model)
    first = sorted(set(index["weight_map"].values()))[0]
    target = shard_to(first, model)
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _missing_shard(model, outside):
    index = _index(model)
    (model / sorted(set(index["weight_map"].values()))[1]).unlink()


def _parent_shard(model, outside):
    def to(first, model):
        shutil.copy(model / first, model.parent / first)
        return f"../{first}"
    _point_shard(model, to)


def _absolute_shard(model, outside):
    def to(first, model):
        shutil.copy(model / first, outside / first)
        return str(outside / first)
    _point_shard(model, to)


def _escaping_link(model, outside):
    first = sorted(set(_index(model)["weight_map"].values()))[0]
    (model / first).rename(outside / first)
    (model / first).symlink_to(outside / first)


def _float64_base(model, outside):
    from safetensors.numpy import save_file

    for path in model.glob("*.safetensors"):
        tensors = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in mx.load(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "mlx"})


# (case, damage, what the one line says)
BASE_CASES = [
    ("index names a missing shard", _missing_shard, "names shard 'model-00002-of-00002.safetensors', which is missing from"),
    ("index names ../shard", _parent_shard, "names shard '../model-00001-of-00002.safetensors', which is not a file in"),
    ("index names an absolute path", _absolute_shard, "model-00001-of-00002.safetensors', which is not a file in"),
    ("shard is a link out of the folder", _escaping_link,
     "names shard 'model-00001-of-00002.safetensors', which is a link to"),
    ("float64 weights", _float64_base, "is F64, which mlx cannot load"),
]


@pytest.mark.parametrize("case,damage,message", BASE_CASES, ids=[c[0] for c in BASE_CASES])
@pytest.mark.parametrize("command", ["base add", "import --base"])
def test_bases_mlx_lm_cannot_load_are_refused(cli, populated, lora_adapter, tmp_path, case, damage, message, command):
    model = _sharded(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    damage(model, outside)
    before = snapshot(populated.root)
    args = ["base", "add", model] if command == "base add" else ["import", lora_adapter, "--name", "other", "--base", model]
    assert_refused(cli(*args), message, before, populated)


def test_a_healthy_sharded_base_is_accepted(cli, populated, tmp_path):
    assert cli("base", "add", _sharded(tmp_path), "--name", "sharded")[0] == 0


# ---- a base whose config.json was edited ---------------------------------------

def _edited_copy(tiny_model, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(tiny_model, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


CONFIG_CASES = [
    ("hidden_size", {"hidden_size": 128}, "config.json differs from the adapter's base tiny-llama: hidden_size 64 → 128"),
    ("model_type", {"model_type": "mistral"}, 'model_type "llama" → "mistral"'),
    ("rope_theta", {"rope_theta": 500000.0}, "rope_theta null → 500000.0"),
]


@pytest.mark.parametrize("case,changes,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
@pytest.mark.parametrize("command", ["check", "fuse"])
def test_a_base_with_another_config_is_not_the_same_base(cli, populated, tiny_model, tmp_path, case, changes, message, command):
    edited = _edited_copy(tiny_model, tmp_path, **changes)
    before = snapshot(populated.root)
    args = ["check", "existing", "--base", edited] if command == "check" else \
        ["fuse", "existing", "--base", edited, "--out", tmp_path / "fused"]
    assert_refused(cli(*args), message, before, populated)
    assert not (tmp_path / "fused").exists()


def test_the_check_report_names_the_differing_config_fields(cli, populated, tiny_model, tmp_path):
    edited = _edited_copy(tiny_model, tmp_path, hidden_size=128, num_attention_heads=8)
    code, out, _ = cli("--json", "check", "existing", "--base", edited)
    report = json.loads(out)
    assert code == 1 and report["verdict"] == "different-config"
    assert "hidden_size 64 → 128" in report["problems"][0] and "num_attention_heads 4 → 8" in report["problems"][0]
    # Bookkeeping fields are not the model: the same base, exactly.
    cosmetic = _edited_copy(tiny_model, tmp_path / "cosmetic", _name_or_path="somewhere/else", torch_dtype="bfloat16",
                            transformers_version="9.9.9")
    code, out, _ = cli("--json", "check", "existing", "--base", cosmetic)
    assert code == 0 and json.loads(out)["verdict"] == "exact"


# ---- a dataset folder without data ---------------------------------------------

def _readme_only(folder):
    (folder / "README.md").write_text("# my data\n")


def _empty_splits(folder):
    (folder / "train.jsonl").write_text("")
    (folder / "valid.jsonl").write_text("\n\n")


def _nested_only(folder):
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text('{"text": "hello"}\n')


DATASET_CASES = [
    ("no jsonl at all", _readme_only, "has no train.jsonl, valid.jsonl or test.jsonl"),
    ("only a nested train.jsonl", _nested_only, "has no train.jsonl, valid.jsonl or test.jsonl"),
    ("empty splits", _empty_splits, "holds no examples"),
]


@pytest.mark.parametrize("case,fill,message", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_dataset_folders_without_examples_are_refused(cli, populated, lora_adapter, tmp_path, case, fill, message):
    folder = tmp_path / "data"
    folder.mkdir()
    fill(folder)
    before = snapshot(populated.root)
    code, out, err = result = cli("import", lora_adapter, "--name", "other", "--dataset", folder)
    assert_refused(result, message, before, populated)
    assert "train.jsonl / valid.jsonl / test.jsonl" in err
