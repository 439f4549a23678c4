"""The architecture matrix: every command on every architecture people fine-tune, float and quantized.

A row is a tiny model built with mlx_lm's own classes (llama; qwen2 with tied embeddings, qkv bias and
pipelined layers; qwen3 with q/k norms; gemma2 with norm offsets and soft-capping; phi3 with fused qkv and
gate_up projections; mixtral with experts in switch_mlp), as float32 and quantized to 4 bits in groups of
32 and 8 bits in groups of 64. SUPPORT says, for each architecture and command, whether it works or the
reason it is refused; every test reads its cell from there, so a cell that stops being true fails, and
the README's table is rendered from it:

    python -m tests.test_architectures          # prints the table README.md holds
"""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from math import prod
from pathlib import Path

import pytest

from adapterhub.tinymodel import ARCHITECTURES, write_dataset
from tests.conftest import VARIANTS, snapshot
from tests.precision import tolerance

OK = "ok"
# Each command as the table names it, and what the test behind the column proves.
COMMANDS = {
    "import": "an adapter trained by `mlx_lm lora` imports with its targets, rank and layers",
    "check": "compatible with its base (exact) and with the quantized variants of it; another architecture is refused",
    "fuse": "bit-identical to `mlx_lm fuse`, also with `--dequantize` on quantized rows",
    "unfuse": "the base back, byte for byte",
    "stack": "`cat` stacking is the exact weighted sum of the updates, and mlx_lm loads the result",
    "extract": "the fused update comes back as a LoRA that mlx_lm loads and that computes the fused model",
    "train lora": "our trainer, targets as mlx_lm picks them",
    "train dora": "our trainer, DoRA",
    "train loreft": "`--layers all`; trainable parameters as the config implies; validation loss falls",
    "train --resume": "a run stopped at a checkpoint and resumed is byte-identical to one never stopped",
    "generate": "the same text as mlx_lm's generate with the adapter",
    "peft": "export to PEFT and import back, bit for bit",
}
# What works everywhere unless listed here: (architecture, command) -> the reason it is refused, as the
# refusal's own message says it (the tests check that the error line contains it).
REFUSED = {
    ("mixtral", "train dora"): "mlx-lm has no DoRA for the expert layers of a mixture of experts "
                               "(SwitchLinear doesn't support DoRA yet)",
    ("mixtral", "peft"): "PEFT's LoRA wraps linear layers, and transformers keeps experts as one 3-D parameter per projection",
}
# Commands tested on only some variants, to keep the suite inside its time budget.
TESTED_ON = {"train --resume": ("float",)}
SUPPORT = {(arch, command): REFUSED.get((arch, command), OK) for arch in ARCHITECTURES for command in COMMANDS}
ROWS = [(arch, variant) for arch in ARCHITECTURES for variant in VARIANTS]
ROW_IDS = [f"{arch}-{variant}" for arch, variant in ROWS]
# The modules mlx_lm lora adapts by default (every linear and expert layer of the trained decoder layers).
TARGETS = {
    "llama": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"],
    "phi3": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "mixtral": ["block_sparse_moe.gate", "block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.switch_mlp.gate_proj",
                "block_sparse_moe.switch_mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                "self_attn.v_proj"],
}
TARGETS.update({arch: TARGETS["llama"] for arch in ("qwen2", "qwen3", "gemma2")})
TOKENS = [1, 20, 35, 50, 77, 101, 150]
HIDDEN, LAYERS = 64, 4  # the tiny models' shape (tinymodel.model_config's defaults)


def rows(command: str) -> list:
    variants = TESTED_ON.get(command, VARIANTS)
    return [pytest.param(arch, variant, id=f"{arch}-{variant}") for arch, variant in ROWS if variant in variants]


def run_cell(cli, arch: str, command: str, *args, registry: Path):
    """Run the command; it must do what its cell says: succeed, or refuse in one line with the cell's reason.

    Returns stdout when it succeeded, None when it was (rightly) refused.
    """
    code, out, err = cli(*args, registry=registry)
    expected = SUPPORT[arch, command]
    if expected == OK:
        assert code == 0, err
        return out
    assert code == 1 and err.startswith("error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return None


# ---- shared, built once: data, adapters trained by mlx_lm, one registry per row -------------------------


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("arch-data") / "stories", seed=1, sizes=(16, 8, 8))


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("arch-data") / "colours", seed=3, style="colours", sizes=(8, 4, 4))


@pytest.fixture(scope="module")
def upstream_adapters(tmp_path_factory, arch_model, stories) -> dict[str, Path]:
    """One real `mlx_lm lora` adapter per architecture, trained on the float model (two runs at a time:
    each is its own process, as a user runs it). It fits the quantized rows of its architecture too."""
    from adapterhub.demo import train_with_mlx_lm

    root = tmp_path_factory.mktemp("arch-adapters")
    models = {arch: arch_model(arch) for arch in ARCHITECTURES}  # built here, not from two threads at once

    def train(arch: str) -> Path:
        return train_with_mlx_lm(models[arch], stories, root / arch, iters=4, seed=0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ARCHITECTURES, pool.map(train, ARCHITECTURES)))


@pytest.fixture(scope="module")
def row_registry(tmp_path_factory, arch_model, upstream_adapters):
    """`row_registry(arch, variant)`: a registry holding the row's base and its architecture's mlx_lm adapter
    twice, `tuned` (the final weights) and `tuned-early` (the step-2 checkpoint), both on the row's base."""
    from adapterhub.registry import Registry

    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, variant: str) -> Path:
        if (arch, variant) not in made:
            path = tmp_path_factory.mktemp(f"registry-{arch}-{variant}")
            registry = Registry(path)
            registry.init()
            model, adapter = arch_model(arch, variant), upstream_adapters[arch]
            registry.add_base(model, name=f"tiny-{arch}-{variant}")
            registry.import_adapter(adapter, "tuned", base=model)
            registry.import_adapter(adapter, "tuned-early", base=model, checkpoint="0000002_adapters.safetensors")
            made[arch, variant] = path
        return made[arch, variant]
    return get


# ---- helpers ---------------------------------------------------------------------------------------------


def load_all(folder: Path) -> dict:
    import mlx.core as mx

    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(mx.load(str(f)))
    return tensors


def mlx_lm_fuse(monkeypatch, model: Path, adapter: Path, out: Path, dequantize: bool) -> Path:
    """mlx_lm's own `fuse` command (its main, in this process: a subprocess per row costs seconds)."""
    from mlx_lm import fuse

    monkeypatch.setattr(sys, "argv", ["mlx_lm.fuse", "--model", str(model), "--adapter-path", str(adapter),
                                      "--save-path", str(out), *(["--dequantize"] if dequantize else [])])
    fuse.main()
    return out


def logits(model_dir: Path, adapter: Path | None = None):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    return model(mx.array([TOKENS])).astype(mx.float32)


def adapter_updates(folder: Path) -> dict:
    """Module -> scale · B·A of an mlx-lm adapter folder, in float64: (out, in), or (experts, out, in)."""
    import mlx.core as mx
    import numpy as np

    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_parameters"]["scale"]
    tensors = {k: np.array(v.astype(mx.float32), dtype=np.float64) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}
    updates = {}
    for key in (k for k in tensors if k.endswith(".lora_a")):
        module = key[: -len(".lora_a")]
        a, b = tensors[key], tensors[module + ".lora_b"]
        # mlx-lm's layouts: LoRALinear a (in, r), b (r, out); LoRASwitchLinear a (E, r, in), b (E, out, r).
        updates[module] = scale * (b @ a if a.ndim == 3 else b.T @ a.T)
    return updates


def with_updates(model_dir: Path, updates: list[tuple[dict, float]]):
    """Logits of the base, dequantized, with each update added to its weight by hand."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, _ = load(str(model_dir))
    model = dequantize_model(model)
    params = dict(tree_flatten(model.parameters()))
    for update, weight in updates:
        for module, delta in update.items():
            name = module + ".weight"
            params[name] = params[name] + mx.array((weight * delta).astype(np.float32))
    model.load_weights(list(params.items()))
    return model(mx.array([TOKENS])).astype(mx.float32)


def export(cli, registry: Path, ref: str, out: Path, *flags: str) -> Path:
    code, _, err = cli("export", ref, out, *flags, registry=registry)
    assert code == 0, err
    return out


# ---- the matrix ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, variant", rows("import"))
def test_import_and_check(cli, tmp_path, arch, variant, arch_model, upstream_adapters):
    model, registry = arch_model(arch, variant), tmp_path / "registry"
    assert cli("init", registry)[0] == 0
    out = run_cell(cli, arch, "import", "--json", "import", upstream_adapters[arch], "--name", "tuned", "--base", model,
                   registry=registry)
    if out is None:
        return
    record = json.loads(out)
    assert record["kind"] == "lora" and record["rank"] == 8 and record["layers"] == [2, 3]
    assert record["targets"] == TARGETS[arch]
    assert record["base"]["model_type"] == arch
    out = run_cell(cli, arch, "check", "--json", "check", "tuned", "--base", model, registry=registry)
    if out is None:
        return
    assert json.loads(out)["verdict"] == "exact"
    if variant != "float":
        # Registered on the float model, it fits the quantized one as a variant of the same model.
        cli("import", upstream_adapters[arch], "--name", "tuned-float", "--base", arch_model(arch), registry=registry)
        report = json.loads(cli("--json", "check", "tuned-float", "--base", model, registry=registry)[1])
        assert report["compatible"] and report["verdict"] == "quantized-variant", report
    # Shapes alone may fit another architecture (llama and qwen2 share every shape): the config tells them apart.
    other = list(ARCHITECTURES)[(list(ARCHITECTURES).index(arch) + 1) % len(ARCHITECTURES)]
    code, out, _ = cli("--json", "check", "tuned", "--base", arch_model(other, variant), registry=registry)
    assert code == 1 and not json.loads(out)["compatible"], out


@pytest.mark.parametrize("arch, variant", rows("fuse"))
def test_fuse_is_bit_identical_to_mlx_lm_and_unfuse_is_exact(cli, tmp_path, monkeypatch, arch, variant, arch_model,
                                                              row_registry, upstream_adapters):
    import mlx.core as mx

    model, registry = arch_model(arch, variant), row_registry(arch, variant)
    base = load_all(model)
    for dequantize in ([False] if variant == "float" else [False, True]):
        fused = tmp_path / f"fused-{dequantize}"
        flags = ["--dequantize"] if dequantize else []
        if run_cell(cli, arch, "fuse", "fuse", "tuned", "--base", model, "--out", fused, *flags, registry=registry) is None:
            return
        upstream = load_all(mlx_lm_fuse(monkeypatch, model, upstream_adapters[arch], tmp_path / f"upstream-{dequantize}", dequantize))
        ours = load_all(fused)
        assert ours.keys() == upstream.keys()
        for key in upstream:
            assert ours[key].dtype == upstream[key].dtype and ours[key].shape == upstream[key].shape, key
            assert mx.array_equal(ours[key], upstream[key]).item(), key
        config = json.loads((fused / "config.json").read_text())
        assert ("quantization" in config) is (variant != "float" and not dequantize)
        # Every adapted module changed, expert layers included: the comparison is not between two copies of the base.
        for module in TARGETS[arch]:
            name = f"model.layers.3.{module}.weight"
            assert not (ours[name].shape == base[name].shape and mx.array_equal(ours[name], base[name]).item()), name
        out = run_cell(cli, arch, "unfuse", "--json", "unfuse", fused, "--out", tmp_path / f"back-{dequantize}",
                       registry=registry)
        if out is None:
            return
        assert json.loads(out)["exact"] is True
        for f in sorted(model.glob("*.safetensors")) + [model / "config.json"]:
            assert (tmp_path / f"back-{dequantize}" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("arch, variant", rows("stack"))
def test_stack_cat_is_the_exact_weighted_sum(cli, tmp_path, arch, variant, arch_model, row_registry):
    import mlx.core as mx
    import numpy as np

    model, registry = arch_model(arch, variant), row_registry(arch, variant)
    out = run_cell(cli, arch, "stack", "--json", "stack", "tuned", "tuned-early", "--name", "both", "--weights", "0.5,2",
                   registry=registry)
    if out is None:
        return
    assert json.loads(out)["rank"] == 16 and json.loads(out)["targets"] == TARGETS[arch]
    stacked = export(cli, registry, "both", tmp_path / "both")
    sources = [adapter_updates(export(cli, registry, ref, tmp_path / ref)) for ref in ("tuned", "tuned-early")]
    got = adapter_updates(stacked)
    assert got.keys() == sources[0].keys()
    for module, update in got.items():
        expected = 0.5 * sources[0][module] + 2 * sources[1][module]
        assert np.allclose(update, expected, rtol=1e-5, atol=1e-7), module
    by_hand = with_updates(model, [(sources[0], 0.5), (sources[1], 2.0)])
    assert mx.allclose(logits(model, stacked), by_hand, atol=tolerance(2e-3)).item()
    assert not mx.allclose(logits(model), by_hand, atol=tolerance(2e-3)).item()  # the updates do something


@pytest.mark.parametrize("arch, variant", rows("extract"))
def test_extract_recovers_the_fused_update(cli, tmp_path, arch, variant, arch_model, row_registry):
    import mlx.core as mx

    model, registry = arch_model(arch, variant), row_registry(arch, variant)
    fused = tmp_path / "fused"
    # From a quantized base, a dequantized fuse holds the update itself; a re-quantized one adds rounding of its size.
    flags = [] if variant == "float" else ["--dequantize"]
    assert cli("fuse", "tuned", "--base", model, "--out", fused, *flags, registry=registry)[0] == 0
    out = run_cell(cli, arch, "extract", "--json", "extract", "--base", model, "--fused", fused, "--rank", "8",
                   "--name", "extracted", registry=registry)
    if out is None:
        return
    version = json.loads(out)
    assert version["targets"] == TARGETS[arch] and version["layers"] == [2, 3] and version["rank"] == 8
    assert max(version["report"]["relative_error"].values()) < tolerance(1e-3) and version["report"]["not_representable"] == []
    extracted = export(cli, registry, "extracted", tmp_path / "extracted")
    assert mx.allclose(logits(model, extracted), logits(fused), atol=tolerance(1e-3)).item()


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("arch, variant", rows("train lora"))
def test_train_lora_and_dora(cli, tmp_path, arch, variant, kind, arch_model, stories):
    model, registry = arch_model(arch, variant), tmp_path / "registry"
    assert cli("init", registry)[0] == 0
    before = snapshot(registry)
    out = run_cell(cli, arch, f"train {kind}", "--json", "train", "--kind", kind, "--base", model, "--data", stories,
                   "--name", f"trained-{kind}", "--iters", "4", "--num-layers", "2", "--rank", "4", "--learning-rate", "1e-3",
                   "--val-batches", "1", "--steps-per-eval", "4", "--save-every", "2", registry=registry)
    if out is None:
        assert snapshot(registry) == before  # refused before the run was recorded
        if (arch, kind) == ("mixtral", "dora"):
            # The reason is mlx-lm's own: its DoRA layers would refuse the experts mid-build.
            from mlx_lm import load
            from mlx_lm.tuner.utils import linear_to_lora_layers

            loaded, _ = load(str(model))
            loaded.freeze()
            with pytest.raises(ValueError, match="SwitchLinear doesn't support DoRA yet"):
                linear_to_lora_layers(loaded, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0}, use_dora=True)
        return
    version = json.loads(out)
    assert version["kind"] == kind and version["rank"] == 4 and version["layers"] == [2, 3]
    assert version["targets"] == TARGETS[arch]  # what mlx_lm lora adapts on this architecture
    val = version["training"]["losses"]["val"]
    assert val[0][0] == 1 and val[-1][0] == 4 and all(math.isfinite(loss) for _, loss in val)
    # Plain mlx_lm loads what our trainer wrote, on the base it was trained on.
    logits(model, export(cli, registry, f"trained-{kind}", tmp_path / "exported"))


@pytest.mark.parametrize("arch, variant", rows("train loreft"))
def test_loreft_trains_with_the_parameters_its_config_implies(cli, tmp_path, arch, variant, arch_model, colours):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from adapterhub import loreft
    from adapterhub.generation import load_loreft, templated
    from adapterhub.registry import Registry

    model, registry = arch_model(arch, variant), tmp_path / "registry"
    rank, per_layer = 4, 2  # f1+l1 without shared weights: one intervention for the first token, one for the last
    implied = LAYERS * per_layer * (rank * HIDDEN * 2 + rank)  # per intervention: R (r, d), W (r, d), b (r,)
    # On the loaded model: the wrapped layers are the ones that run (pipelined models answer `layers` with a copy).
    loaded, _ = load(str(model))
    loreft.apply(loaded, loreft.LoReFTConfig(layers=list(range(LAYERS)), rank=rank, positions="f1+l1", hidden_size=HIDDEN))
    assert sum(prod(v.shape) for _, v in tree_flatten(loaded.trainable_parameters())) == implied
    assert len(loreft.wrapped_layers(loaded)) == LAYERS
    out = run_cell(cli, arch, "train loreft", "--json", "train", "--kind", "loreft", "--base", model, "--data", colours,
                   "--name", "steered", "--layers", "all", "--rank", str(rank), "--iters", "8", "--val-batches", "1",
                   "--steps-per-eval", "2", "--save-every", "4", "--seed", "1", registry=registry)
    if out is None:
        return
    version = json.loads(out)
    assert version["kind"] == "loreft" and version["layers"] == list(range(LAYERS))
    assert version["num_parameters"] == implied
    assert version["loreft"]["hidden_size"] == HIDDEN and version["loreft"]["interventions"] == per_layer
    val = version["training"]["losses"]["val"]
    assert val[-1][1] < val[0][1], val
    code, out, err = cli("--json", "generate", "steered", "--prompt", "what colour is the sky ?", "--max-tokens", "4",
                         registry=registry)
    assert code == 0, err
    loaded, tokenizer = load(str(model))
    reg = Registry(registry)
    assert json.loads(out)["text"] == loreft.generate(load_loreft(reg, reg.resolve("steered"), loaded), tokenizer,
                                                      templated(tokenizer, "what colour is the sky ?"), 4)


@pytest.mark.parametrize("arch, variant", rows("train --resume"))
def test_resume_is_byte_identical(cli, tmp_path, arch, variant, arch_model, stories):
    from adapterhub.registry import Registry
    from adapterhub.training.config import merge
    from adapterhub.training.callbacks import TrainingCallback
    from adapterhub.training.trainer import Trainer

    model, registry = arch_model(arch, variant), tmp_path / "registry"
    assert cli("init", registry)[0] == 0
    common = ["--base", model, "--data", stories, "--iters", "6", "--num-layers", "2", "--rank", "4", "--learning-rate",
              "1e-3", "--dropout", "0.1", "--seed", "5", "--val-batches", "1", "--steps-per-eval", "3", "--save-every", "2"]
    out = run_cell(cli, arch, "train --resume", "train", *common, "--name", "straight", registry=registry)
    if out is None:
        return

    class StopAfterStepTwo(TrainingCallback):
        def on_checkpoint(self, step, removed, seconds):
            # Ctrl-C as the checkpoint of step 2 is announced: the run is recorded as interrupted there.
            if step == 2:
                raise KeyboardInterrupt

    reg = Registry(registry)
    config = merge({"base": str(model), "data": str(stories), "name": "stopped", "iters": 6, "num_layers": 2, "rank": 4,
                    "learning_rate": 1e-3, "dropout": 0.1, "seed": 5, "val_batches": 1, "steps_per_eval": 3,
                    "save_every": 2}, None)
    trainer = Trainer(reg, config, callback=StopAfterStepTwo())
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert reg.run(trainer.run_id)["status"] == "interrupted" and reg.run(trainer.run_id)["step"] == 2
    run_cell(cli, arch, "train --resume", "train", "--resume", trainer.run_id, registry=registry)
    straight = next(r for r in reg.runs() if r["name"] == "straight")
    assert (Path(straight["dir"]) / "adapter" / "adapters.safetensors").read_bytes() == \
        (Path(reg.run(trainer.run_id)["dir"]) / "adapter" / "adapters.safetensors").read_bytes()
    assert reg.resolve("stopped").sha256 == reg.resolve("straight").sha256


@pytest.mark.parametrize("arch, variant", rows("generate"))
def test_generate_is_mlx_lms_generation_with_the_adapter(cli, arch, variant, arch_model, row_registry, upstream_adapters):
    from mlx_lm import generate, load

    from adapterhub.generation import templated

    model, registry = arch_model(arch, variant), row_registry(arch, variant)
    out = run_cell(cli, arch, "generate", "--json", "generate", "tuned", "--base", model, "--prompt", "the cat",
                   "--max-tokens", "6", registry=registry)
    if out is None:
        return
    loaded, tokenizer = load(str(model), adapter_path=str(upstream_adapters[arch]))
    # As the mlx_lm.generate command line does: the prompt as a user turn in the tokenizer's chat template.
    assert json.loads(out)["text"] == generate(loaded, tokenizer, prompt=templated(tokenizer, "the cat"), max_tokens=6)


@pytest.mark.parametrize("arch, variant", rows("peft"))
def test_peft_round_trip(cli, tmp_path, arch, variant, arch_model, row_registry):
    import mlx.core as mx

    from adapterhub.registry import Registry

    model, registry = arch_model(arch, variant), row_registry(arch, variant)
    before = snapshot(registry)
    peft = tmp_path / "peft"
    if run_cell(cli, arch, "peft", "export", "tuned", peft, "--format", "peft", registry=registry) is None:
        assert not peft.exists() and snapshot(registry) == before
        return
    config = json.loads((peft / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == TARGETS[arch] and config["r"] == 8
    # PEFT names modules as transformers does; for these architectures that is the checkpoint's own naming.
    base_tensors = load_all(model)
    peft_tensors = mx.load(str(peft / "adapter_model.safetensors"))
    for key in peft_tensors:
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        assert module + ".weight" in base_tensors, key
    out = run_cell(cli, arch, "peft", "--json", "import", peft, "--name", "from-peft", "--base", model, registry=registry)
    record = json.loads(out)
    assert record["source"]["format"] == "peft" and record["targets"] == TARGETS[arch]
    reg = Registry(registry)
    original = mx.load(str(reg.objects.path(reg.resolve("tuned").sha256)), format="safetensors")
    back = mx.load(str(reg.objects.path(record["sha256"])), format="safetensors")
    assert original.keys() == back.keys()
    assert all(mx.array_equal(original[k], back[k]).item() and original[k].dtype == back[k].dtype for k in original)


def test_experts_quantized_at_mixed_precision(cli, tmp_path, monkeypatch, arch_model, upstream_adapters):
    """Routers at 8 bits in a 4-bit model, as qwen3_moe's own quantization recipe keeps them: every module is
    read at its own width (at the global one, the router's packed weight looks twice as wide)."""
    import mlx.core as mx

    from adapterhub.tinymodel import write_quantized

    model = write_quantized(arch_model("mixtral"), tmp_path / "mixed", 4, 32, quant_predicate=lambda path, _: (
        {"group_size": 64, "bits": 8} if path.endswith("block_sparse_moe.gate") else True))
    registry = tmp_path / "registry"
    cli("init", registry)
    code, _, err = cli("import", upstream_adapters["mixtral"], "--name", "tuned", "--base", model, registry=registry)
    assert code == 0, err
    assert cli("fuse", "tuned", "--base", model, "--out", tmp_path / "fused", registry=registry)[0] == 0
    ours, upstream = load_all(tmp_path / "fused"), load_all(mlx_lm_fuse(monkeypatch, model, upstream_adapters["mixtral"],
                                                                      tmp_path / "upstream", False))
    assert ours.keys() == upstream.keys() and all(mx.array_equal(ours[k], upstream[k]).item() for k in ours)
    assert ours["model.layers.3.block_sparse_moe.gate.scales"].shape == (4, 1)  # 64 inputs in one group of 64
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back", registry=registry)
    assert code == 0 and json.loads(out)["exact"] is True, err


# ---- the README's table ----------------------------------------------------------------------------------

START, END = "<!-- architecture-matrix:start -->", "<!-- architecture-matrix:end -->"
README = Path(__file__).parent.parent / "README.md"
VARIANT_NAMES = {"float": "float32", "4bit-g32": "4-bit, group 32", "8bit-g64": "8-bit, group 64"}


def render_table() -> str:
    """The support table, as Markdown, from SUPPORT and TESTED_ON."""
    notes: list[str] = []
    lines = ["| architecture | weights | " + " | ".join(f"`{c}`" for c in COMMANDS) + " |",
             "|---|---|" + "---|" * len(COMMANDS)]
    for arch, variant in ROWS:
        cells = []
        for command in COMMANDS:
            if variant not in TESTED_ON.get(command, VARIANTS):
                cells.append("not tested")
            elif SUPPORT[arch, command] == OK:
                cells.append("✓")
            else:
                reason = f"{arch}, `{command}`: refused, as {SUPPORT[arch, command]}."
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"✗ ({notes.index(reason) + 1})")
        lines.append(f"| {arch} | {VARIANT_NAMES[variant]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    lines.append("")
    lines += [f"- `{command}`: {what}" for command, what in COMMANDS.items()]
    return "\n".join(lines)


def test_readme_table_is_the_one_the_tests_enforce():
    text = README.read_text()
    assert START in text and END in text, "README.md lacks the architecture-matrix markers"
    inside = text.split(START, 1)[1].split(END, 1)[0]
    assert inside.strip() == render_table().strip(), "regenerate it: python -m tests.test_architectures"


def test_every_refusal_is_a_cell_of_the_matrix():
    assert set(REFUSED) <= set(SUPPORT) and set(TESTED_ON) <= set(COMMANDS)


if __name__ == "__main__":
    print(render_table())
