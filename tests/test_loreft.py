"""LoReFT: training lowers the loss, R stays orthonormal, edits land only where asked, and it round-trips."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from adapterhub import loreft
from adapterhub.tinymodel import write_dataset, write_tokenizer
from adapterhub.training.config import LOREFT_LEARNING_RATE, MLX_LM_LEARNING_RATE, merge
from tests.conftest import snapshot


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "colours", seed=3, style="colours")


@pytest.fixture
def trained(cli, registry, tiny_model, colours):
    code, out, err = cli("--json", "train", "--kind", "loreft", "--base", tiny_model, "--data", colours, "--name", "reft",
                         "--layers", "2;3", "--rank", "4", "--positions", "f1+l1", "--iters", "30",  # LoReFT's own learning rate
                         "--val-batches", "4", "--steps-per-eval", "10", "--save-every", "10", "--seed", "1")
    assert code == 0, err
    return json.loads(out)


def hidden_states(model, tokens, upto_layer):
    """Each decoder layer's output, as the model computes it."""
    from mlx_lm.models.base import create_attention_mask

    h = model.model.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    outputs = []
    for layer in model.model.layers[: upto_layer + 1]:
        h = layer(h, mask, None)
        outputs.append(h)
    return outputs


def test_training_lowers_validation_loss_and_registers_a_loreft_version(trained, registry):
    val = trained["training"]["losses"]["val"]
    assert val[-1][1] < val[0][1] * 0.9
    assert trained["training"]["hyperparameters"]["learning_rate"] == LOREFT_LEARNING_RATE
    assert trained["kind"] == "loreft" and trained["layers"] == [2, 3] and trained["targets"] == ["block_output"]
    assert trained["loreft"] == {"layers": [2, 3], "rank": 4, "positions": "f1+l1", "share_weights": False, "dropout": 0.0,
                                 "activation": "linear", "hidden_size": 64, "interventions": 2}
    # 2 layers x 2 interventions x (R: 4x64, W: 4x64, b: 4)
    assert trained["num_parameters"] == 2 * 2 * (4 * 64 * 2 + 4)
    assert trained["training"]["test_perplexity"] > 1 and trained["training"]["test_loss"] > 0


def test_rotation_rows_stay_orthonormal(trained, registry):
    weights = mx.load(str(registry.objects.path(trained["sha256"])), format="safetensors")
    rotations = [v for k, v in weights.items() if k.endswith(".rotate")]
    assert len(rotations) == 4
    for r in rotations:
        # In float64 on the host: the check measures the stored rows, not the device's matmul (TF32 on a GPU).
        rows = np.array(r, dtype=np.float64)
        assert np.abs(rows @ rows.T - np.eye(rows.shape[0])).max() < 1e-5


def test_intervention_changes_hidden_states_only_at_the_chosen_positions(tiny_model):
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    plain = hidden_states(model, mx.array([[1, 5, 9, 12, 7, 3, 8, 4]]), 3)
    mx.random.seed(0)
    loreft.apply(model, loreft.LoReFTConfig(layers=[1], rank=4, positions="f2+l1", hidden_size=64))
    prompt_length = 6  # positions 6 and 7 are the completion
    loreft.set_prompt_lengths(model, mx.array([prompt_length]))
    edited = hidden_states(model, mx.array([[1, 5, 9, 12, 7, 3, 8, 4]]), 3)
    assert mx.array_equal(edited[0], plain[0]).item()  # layer 0: before the intervention
    changed = [not mx.allclose(edited[1][0, p], plain[1][0, p], atol=1e-6).item() for p in range(8)]
    assert changed == [True, True, False, False, False, True, False, False]  # f2 = 0, 1; l1 = 5 (the prompt's last)
    # With no prompt set (decoding), nothing is edited: every layer equals the plain model's.
    loreft.set_prompt_lengths(model, None)
    assert all(mx.array_equal(a, b).item() for a, b in zip(hidden_states(model, mx.array([[1, 5, 9, 12, 7, 3, 8, 4]]), 3),
                                                            plain))


def test_shared_weights_use_one_intervention_per_layer(tiny_model):
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    loreft.apply(model, loreft.LoReFTConfig(layers=[0, 2], rank=2, positions="f1+l1", share_weights=True, hidden_size=64))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert sorted({k.split(".interventions.")[1].split(".")[0] for k in names}) == ["0"]
    assert len(names) == 2 * 3


def test_save_load_generate_gives_the_in_memory_tokens(cli, registry, trained, tiny_model, tmp_path):
    from mlx_lm import load

    from adapterhub.generation import load_loreft, templated

    prompt = "what colour is the grass ?"
    code, out, err = cli("--json", "generate", "reft", "--prompt", prompt, "--max-tokens", "6")
    assert code == 0, err
    from_cli = json.loads(out)["text"]
    model, tokenizer = load(str(tiny_model))
    in_memory = loreft.generate(load_loreft(registry, registry.resolve("reft"), model), tokenizer,
                                templated(tokenizer, prompt), 6)
    assert from_cli == in_memory
    # The exported folder loads in the library on its own, and generates the same.
    assert cli("export", "reft", tmp_path / "exported")[0] == 0
    model, tokenizer = load(str(tiny_model))
    loreft.load_folder(model, tmp_path / "exported")
    assert loreft.generate(model, tokenizer, templated(tokenizer, prompt), 6) == in_memory
    plain, _ = load(str(tiny_model))
    tokens = mx.array([tokenizer.encode(prompt)])
    loreft.set_prompt_lengths(model, mx.array([tokens.shape[1]]))
    assert not mx.allclose(model(tokens), plain(tokens), atol=1e-4).item()  # the adapter does something


def test_fuse_stack_and_peft_export_refuse_loreft(cli, registry, trained, tiny_model, tmp_path):
    # A second, different LoReFT version: stacking one adapter with itself is refused for another reason.
    run_id = trained["training"]["run_id"]
    assert cli("checkpoints", "promote", run_id, "10", "--name", "reft-early")[0] == 0
    before = snapshot(registry.root)
    for args, message in [
        (("fuse", "reft", "--base", tiny_model, "--out", tmp_path / "fused"), "not a weight update"),
        (("stack", "reft", "reft-early", "--name", "both"), "not a weight update"),
        (("export", "reft", tmp_path / "peft", "--format", "peft"), "PEFT's LoRA format cannot hold"),
    ]:
        code, _, err = cli(*args)
        assert code == 1 and message in err and "Traceback" not in err, args
    assert snapshot(registry.root) == before and not (tmp_path / "fused").exists()


def test_check_validates_layers_and_hidden_size(cli, registry, trained, tmp_path):
    from adapterhub.tinymodel import write_model

    shallow = write_model(tmp_path / "shallow", seed=0, num_layers=2)
    code, out, _ = cli("check", "reft", "--base", shallow)
    assert code == 1 and "adapter touches layer(s) 2, 3 but the base has 2 layers" in out
    narrow = write_model(tmp_path / "narrow", seed=0, hidden_size=32, intermediate_size=64)
    code, out, _ = cli("check", "reft", "--base", narrow)
    assert code == 1 and "LoReFT interventions have hidden size 64 but the base's is 32" in out


def test_loreft_options_are_checked_before_training(cli, registry, tiny_model, colours, tiny_data):
    common = ("train", "--kind", "loreft", "--base", tiny_model, "--name", "bad", "--iters", "2")
    for extra, message in [
        (("--data", colours), "--kind loreft needs --layers"),
        (("--data", colours, "--layers", "2", "--positions", "x3"), "is not pyreft's notation"),
        (("--data", colours, "--layers", "9"), "beyond the model's 4 layers"),
        (("--data", tiny_data, "--layers", "2"), "prompt"),  # text data has no prompt to edit
    ]:
        code, _, err = cli(*common, *extra)
        assert code == 1 and message in err, (extra, err)
    assert registry.list() == []


@pytest.mark.parametrize("cli_rate,yaml_rate,kind,expected", [
    (None, None, "loreft", LOREFT_LEARNING_RATE),
    (None, None, "lora", MLX_LM_LEARNING_RATE),
    (None, 1e-5, "loreft", 1e-5),  # a rate the user gave is theirs, even mlx-lm's default
    (2e-3, 1e-5, "loreft", 2e-3),
])
def test_loreft_default_learning_rate_only_when_none_given(tmp_path, cli_rate, yaml_rate, kind, expected):
    config = tmp_path / "config.yaml"
    config.write_text(f"fine_tune_type: {kind}\n" + (f"learning_rate: {yaml_rate}\n" if yaml_rate else ""))
    merged = merge({"base": "b", "data": "d", "name": "n", "layers": "1", "learning_rate": cli_rate}, config)
    assert merged.learning_rate == expected
    assert merge({"base": "b", "data": "d", "name": "n", "kind": kind, "layers": "1"}, None).learning_rate == \
        (LOREFT_LEARNING_RATE if kind == "loreft" else MLX_LM_LEARNING_RATE)


def _write_qwen2(folder):
    """A tiny qwen2 folder: its model answers `model.layers` with a fresh slice, as pipelining models do."""
    from mlx_lm.models import qwen2

    folder.mkdir(parents=True)
    vocab = write_tokenizer(folder)
    config = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab,
              "tie_word_embeddings": True, "max_position_embeddings": 512}
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs(**config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    return folder


def test_loreft_trains_a_model_whose_layers_are_a_slice(cli, registry, colours, tmp_path):
    from mlx_lm import load

    base = _write_qwen2(tmp_path / "tiny-qwen2")
    model, _ = load(str(base))
    assert model.layers is not model.model.layers  # the case: writing into model.layers wraps nothing
    loreft.apply(model, loreft.LoReFTConfig(layers=[0, 1], rank=2, hidden_size=64))
    assert all(isinstance(layer, loreft.LoReFTLayer) for layer in model.model.layers)
    code, out, err = cli("--json", "train", "--kind", "loreft", "--base", base, "--data", colours, "--name", "reft-qwen",
                         "--layers", "all", "--rank", "2", "--iters", "4", "--val-batches", "1", "--save-every", "2")
    assert code == 0, err
    version = json.loads(out)
    assert version["layers"] == [0, 1] and version["num_parameters"] == 2 * 2 * (2 * 64 * 2 + 2)


def test_retraction_is_qr_without_qr(monkeypatch):
    """On the default device, as array ops: the Q that QR gave (signs fixed), orthonormal within 1e-5 in float64,
    after an Adam-sized step on every element and from rows of any length far from perpendicular."""
    rng = np.random.default_rng(0)
    rows = []
    for step in (1e-3, 4e-3, 1e-2):  # rank 4, hidden 512
        q, _ = np.linalg.qr(rng.standard_normal((512, 4)))
        rows.append(q.T + step * np.sign(rng.standard_normal((4, 512))))
    rows.append(rng.standard_normal((4, 512)) * 3)  # random rows: lengths near 68, about 0.05 from perpendicular
    rows.append(rng.standard_normal((4, 512)) + 0.2 * rng.standard_normal((1, 512)))  # sharing a component: 0.04
    monkeypatch.setattr(mx.linalg, "qr", None)  # no QR, on any stream: calling it would raise
    out = np.array(loreft.orthonormal_rows(mx.array(np.stack(rows), dtype=mx.float32)), dtype=np.float64)
    for before, after in zip(rows, out):
        q, r = np.linalg.qr(before.T)
        assert np.abs(after @ after.T - np.eye(4)).max() < 1e-5
        assert np.abs(after - (q * np.sign(np.diagonal(r))).T).max() < 1e-5


def test_masks_are_made_once_per_forward_and_prompts_do_not_outlive_the_loss(tiny_model):
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    loreft.apply(model, loreft.LoReFTConfig(layers=[0, 1, 2, 3], rank=2, positions="f1+l1", hidden_size=64))
    layers = loreft.wrapped_layers(model)
    loreft.set_prompt_lengths(model, mx.array([3, 5]))
    model(mx.array([[1, 5, 9, 12, 7, 3], [2, 4, 6, 8, 10, 11]]))
    prompts = layers[0]._prompts
    assert all(layer._prompts is prompts for layer in layers) and len(prompts._masks) == 1  # one set for 4 layers
    batch, lengths = mx.array([[1, 5, 9, 12, 7, 3]]), mx.array([[3, 5]])
    value, tokens = loreft.loss(model, batch, lengths)
    assert tokens.item() == 3 and all(layer._prompts is None for layer in layers)


def test_a_stopped_loreft_run_resumes_byte_identical(cli, registry, tiny_model, colours):
    from adapterhub.training.config import merge
    from adapterhub.training.callbacks import TrainingCallback
    from adapterhub.training.trainer import Trainer

    options = {"base": str(tiny_model), "data": str(colours), "kind": "loreft", "layers": "1;3", "rank": 4,
               "positions": "f1+l1", "iters": 6, "dropout": 0.1, "seed": 5, "val_batches": 1, "steps_per_eval": 3,
               "save_every": 2}
    Trainer(registry, merge({**options, "name": "straight"}, None)).run()

    class StopAfterStepTwo(TrainingCallback):
        def on_checkpoint(self, step, removed, seconds):
            if step == 2:
                raise KeyboardInterrupt  # Ctrl-C as the checkpoint of step 2 is announced

    trainer = Trainer(registry, merge({**options, "name": "stopped"}, None), callback=StopAfterStepTwo())
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert registry.run(trainer.run_id)["step"] == 2
    code, _, err = cli("train", "--resume", trainer.run_id)
    assert code == 0, err
    assert registry.resolve("stopped").sha256 == registry.resolve("straight").sha256
