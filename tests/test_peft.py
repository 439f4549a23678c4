"""PEFT interop: PEFT folders import with the right rank, scale and tensors; export -> import round-trips.

PEFT itself needs torch, which the test environment does not install: the folders
here are written with PEFT's exact key names and config fields (as PEFT 0.21
writes them). Set ADAPTERHUB_PEFT_PYTHON to a Python with torch + peft to also
run the checks against PEFT itself (logits of both sides compared).
"""

import json
import math
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from adapterhub.safetensors_io import read_header
from tests.conftest import snapshot

TOKENS = [1, 5, 9, 12, 7, 3]
PEFT_PYTHON = os.environ.get("ADAPTERHUB_PEFT_PYTHON")


def peft_config(**overrides) -> dict:
    """adapter_config.json exactly as PEFT 0.21.2's save_pretrained writes it for a LoraConfig."""
    config = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"},
        "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False, "lora_dropout": 0.05,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 4,
        "rank_pattern": {}, "revision": None, "target_modules": ["v_proj", "q_proj"], "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }
    return {**config, **overrides}


def write_peft_folder(out: Path, model_dir: Path, config: dict, layers=(0, 2), dtype=mx.float32, seed=0) -> dict:
    """A PEFT LoRA folder with random updates: PEFT's key names, shapes (r, in) / (out, r), metadata."""
    shapes = {name: tuple(t.shape) for name, t in mx.load(str(next(model_dir.glob("*.safetensors")))).items()}
    mx.random.seed(seed)
    tensors = {}
    for layer in layers:
        for target in ("self_attn.q_proj", "self_attn.v_proj"):
            out_dim, in_dim = shapes[f"model.layers.{layer}.{target}.weight"]
            prefix = f"base_model.model.model.layers.{layer}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (mx.random.normal((config["r"], in_dim)) * 0.1).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (mx.random.normal((out_dim, config["r"])) * 0.1).astype(dtype)
            if config["use_dora"]:
                tensors[f"{prefix}.lora_magnitude_vector"] = (1 + mx.random.uniform(shape=(out_dim,))).astype(dtype)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    return tensors


def bits(array) -> np.ndarray:
    return np.array(array.view(mx.uint16) if array.dtype in (mx.bfloat16, mx.float16) else array.view(mx.uint32))


@pytest.mark.parametrize("rslora, dora, dtype", [(False, False, mx.float32), (True, False, mx.bfloat16), (False, True, mx.float16)])
def test_peft_folder_imports_with_rank_scale_and_tensors(cli, registry, tiny_model, tmp_path, rslora, dora, dtype):
    config = peft_config(use_rslora=rslora, use_dora=dora, r=4, lora_alpha=16, base_model_name_or_path=str(tiny_model))
    tensors = write_peft_folder(tmp_path / "peft", tiny_model, config, dtype=dtype)
    code, out, err = cli("--json", "import", tmp_path / "peft", "--name", "from-peft")
    assert code == 0, err
    record = json.loads(out)
    assert record["rank"] == 4 and record["kind"] == ("dora" if dora else "lora")
    assert record["scale"] == pytest.approx(16 / math.sqrt(4) if rslora else 16 / 4)
    assert record["layers"] == [0, 2] and record["targets"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert record["base"]["name"] == "tiny-llama"  # found through base_model_name_or_path
    assert record["source"]["format"] == "peft" and record["training"]["tool"] == "peft"
    stored = mx.load(str(registry.objects.path(record["sha256"])), format="safetensors")
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        if key.endswith("lora_A.weight"):
            assert np.array_equal(bits(stored[f"{module}.lora_a"]), bits(value).T)
        elif key.endswith("lora_B.weight"):
            assert np.array_equal(bits(stored[f"{module}.lora_b"]), bits(value).T)
        else:
            assert np.array_equal(bits(stored[f"{module}.m"]), bits(value))
    # The imported adapter runs in mlx_lm: layers 1 and 3 are wrapped too (num_layers -1) and stay untouched.
    assert cli("export", "from-peft", tmp_path / "mlx")[0] == 0
    from mlx_lm import load

    model, _ = load(str(tiny_model), adapter_path=str(tmp_path / "mlx"))
    plain, _ = load(str(tiny_model))
    assert not mx.allclose(model(mx.array([TOKENS])), plain(mx.array([TOKENS])), atol=1e-3).item()


def test_mlx_to_peft_to_mlx_is_tensor_identical(cli, registry, lora_adapter, tiny_model, tmp_path):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    code, out, err = cli("--json", "export", "stories", tmp_path / "peft", "--format", "peft")
    assert code == 0, err
    assert sorted(Path(f).name for f in json.loads(out)["files"]) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    original = json.loads((lora_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == original["lora_parameters"]["rank"]
    assert config["lora_alpha"] / config["r"] == original["lora_parameters"]["scale"]
    assert config["base_model_name_or_path"] == str(tiny_model.resolve())
    peft_keys = set(read_header(tmp_path / "peft" / "adapter_model.safetensors").tensors)
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft_keys)
    code, out, err = cli("--json", "import", tmp_path / "peft", "--name", "round-trip")
    assert code == 0, err
    back = mx.load(str(registry.objects.path(json.loads(out)["sha256"])), format="safetensors")
    before = mx.load(str(lora_adapter / "adapters.safetensors"))
    assert back.keys() == before.keys()
    assert all(np.array_equal(bits(back[k]), bits(before[k])) for k in before)
    assert json.loads(out)["scale"] == registry.resolve("stories").record["scale"]
    # The folder's adapterhub.json names stories@1, and the tensors prove it.
    assert json.loads(out)["parents"] == [{"ref": "stories@1", "sha256": registry.resolve("stories").sha256,
                                           "relation": "imported-from"}]


def test_exported_mlx_folder_reimports_as_imported_from(cli, registry, lora_adapter, tiny_model, tmp_path):
    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    assert cli("export", "stories", tmp_path / "out")[0] == 0
    other = tmp_path / "other-registry"
    assert cli("init", other)[0] == 0
    code, out, _ = cli("--json", "import", tmp_path / "out", "--name", "copied", registry=other)
    parents = json.loads(out)["parents"]
    assert code == 0 and parents == [{"ref": "stories@1", "sha256": registry.resolve("stories").sha256, "relation": "imported-from"}]
    code, out, _ = cli("lineage", "copied", registry=other)
    assert "imported-from: source stories@1" in out


@pytest.mark.parametrize("change, message", [
    ({"modules_to_save": ["lm_head"]}, "PEFT 'modules_to_save' keeps full trained copies"),
    ({"rank_pattern": {"q_proj": 8}}, "PEFT 'rank_pattern' gives some modules another rank"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out stores transposed"),
    ({"bias": "all"}, "trained biases"),
    ({"peft_type": "IA3"}, "is a PEFT IA3 adapter"),
    ({"r": 8}, "says r=8 but its lora_A tensors have rank(s) [4]"),
])
def test_unrepresentable_peft_folders_are_refused_with_the_reason(cli, registry, tiny_model, tmp_path, change, message):
    write_peft_folder(tmp_path / "peft", tiny_model, peft_config())
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, **change}))
    before = snapshot(registry.root)
    code, _, err = cli("import", tmp_path / "peft", "--name", "refused")
    assert code == 1 and message in err and err.startswith("error: ") and "Traceback" not in err
    assert snapshot(registry.root) == before


def test_peft_pickle_and_embedding_lora_are_refused(cli, registry, tiny_model, tmp_path):
    write_peft_folder(tmp_path / "peft", tiny_model, peft_config())
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = dict(mx.load(str(weights)))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = mx.zeros((4, 256))
    mx.save_safetensors(str(weights), tensors)
    code, _, err = cli("import", tmp_path / "peft", "--name", "refused")
    assert code == 1 and "lora_embedding_A' is not a LoRA parameter of a linear layer" in err
    weights.rename(tmp_path / "peft" / "adapter_model.bin")
    code, _, err = cli("import", tmp_path / "peft", "--name", "refused")
    assert code == 1 and "adapter_model.bin" in err and "safetensors" in err


def peft_logits(model_dir: Path, adapter_dir: Path) -> np.ndarray:
    result = subprocess.run([PEFT_PYTHON, str(Path(__file__).parent / "peft_tool.py"), "logits", str(model_dir), str(adapter_dir),
                             *map(str, TOKENS)], capture_output=True, text=True, check=True)
    return np.array(json.loads(result.stdout))


@pytest.mark.skipif(not PEFT_PYTHON, reason="set ADAPTERHUB_PEFT_PYTHON to a Python with torch and peft")
def test_peft_itself_loads_our_export_and_agrees_with_mlx_lm(cli, registry, lora_adapter, tiny_model, tmp_path):
    from mlx_lm import load

    assert cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)[0] == 0
    assert cli("export", "stories", tmp_path / "peft", "--format", "peft")[0] == 0
    model, _ = load(str(tiny_model), adapter_path=str(lora_adapter))
    ours = np.array(model(mx.array([TOKENS]))[0])
    assert np.abs(peft_logits(tiny_model, tmp_path / "peft") - ours).max() < 1e-4


@pytest.mark.skipif(not PEFT_PYTHON, reason="set ADAPTERHUB_PEFT_PYTHON to a Python with torch and peft")
def test_a_dora_rslora_folder_saved_by_peft_imports_and_agrees(cli, registry, tiny_model, tmp_path):
    from mlx_lm import load

    subprocess.run([PEFT_PYTHON, str(Path(__file__).parent / "peft_tool.py"), "make", str(tiny_model), str(tmp_path / "peft"),
                    "4", "16", "1", "1"], capture_output=True, check=True)
    assert cli("import", tmp_path / "peft", "--name", "from-peft", "--base", tiny_model)[0] == 0
    assert cli("export", "from-peft", tmp_path / "mlx")[0] == 0
    model, _ = load(str(tiny_model), adapter_path=str(tmp_path / "mlx"))
    ours = np.array(model(mx.array([TOKENS]))[0])
    assert np.abs(peft_logits(tiny_model, tmp_path / "peft") - ours).max() < 1e-4


@pytest.mark.parametrize("old, new, message", [
    ('"lora_alpha": 16', '"lora_alpha": 1e999', "is damaged: number 1e999 overflows to infinity"),
    ('"lora_alpha": 16', '"lora_alpha": NaN', "adapter_config.json"),
    ('"r": 4', '"r": 0', "has r 0; a rank is a whole number of at least 1"),
    ('"lora_dropout": 0.05', '"lora_dropout": 1.0', "has lora_dropout 1.0; it must be a number from 0 up to"),
    ('"lora_dropout": 0.05', '"lora_dropout": -0.1', "has lora_dropout -0.1"),
])
def test_non_finite_or_out_of_range_numbers_are_refused(cli, registry, tiny_model, tmp_path, old, new, message):
    # scale = lora_alpha / r: an infinite alpha or a zero rank would fuse into NaN weights (or divide by zero).
    write_peft_folder(tmp_path / "peft", tiny_model, peft_config())
    path = tmp_path / "peft" / "adapter_config.json"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    before = snapshot(registry.root)
    code, _, err = cli("import", tmp_path / "peft", "--name", "refused", "--base", tiny_model)
    assert code == 1 and message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert snapshot(registry.root) == before


@pytest.mark.parametrize("dtype, message", [("float64", "is F64, which mlx cannot load"),
                                            ("int32", "is I32, and LoRA weights must be floating point")])
def test_weights_mlx_cannot_use_are_refused_before_conversion(cli, registry, tiny_model, tmp_path, dtype, message):
    from safetensors.numpy import save_file

    write_peft_folder(tmp_path / "peft", tiny_model, peft_config())
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k: np.array(v).astype(dtype) for k, v in mx.load(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    before = snapshot(registry.root)
    code, _, err = cli("import", tmp_path / "peft", "--name", "refused", "--base", tiny_model)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(registry.root) == before
