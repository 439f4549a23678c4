"""eval, compare, list --sort and fidelity: scores equal to upstream `mlx_lm lora --test`, recorded once, side by side."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub.fidelity import fidelity
from adapterhub.tinymodel import write_adapter, write_dataset
from tests.conftest import assert_refused, snapshot, subprocess_env

# Upstream's own `mlx_lm lora --test`, once per argument list, in one process (its import is the slow part). It
# prints the loss to 3 decimals; the value its evaluate() returned is printed in full beside it.
UPSTREAM = """
import json, sys
import mlx_lm.lora as lora
evaluate = lora.evaluate
def full(*args, **kwargs):
    value = evaluate(*args, **kwargs)
    print("FULL_TEST_LOSS", repr(value), flush=True)
    return value
lora.evaluate = full
for argv in json.loads(sys.argv[1]):
    sys.argv = ["mlx_lm.lora", "--test", *argv]
    lora.main()
"""


def mlx_lm_lora_test(*runs: list) -> list[float]:
    done = subprocess.run([sys.executable, "-c", UPSTREAM, json.dumps([[str(a) for a in run] for run in runs])],
                          capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    printed = re.findall(r"Test loss (\S+), Test ppl", done.stdout)
    values = [float(v) for v in re.findall(r"FULL_TEST_LOSS (\S+)", done.stdout)]
    assert len(values) == len(runs) and all(abs(float(p.rstrip(",")) - v) < 1e-3 for p, v in zip(printed, values))
    return values


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Prompt/completion data: scored on the completion alone, as mlx-lm's --mask-prompt does."""
    return write_dataset(tmp_path_factory.mktemp("data") / "colours", seed=2, style="colours")


def eval_json(cli, *args):
    code, out, err = cli("--json", "eval", *args)
    assert code == 0, err
    return json.loads(out)


def test_loss_is_mlx_lm_lora_test_for_a_base_an_adapter_and_a_fused_model(cli, populated, tiny_model, tiny_data,
                                                                           lora_adapter, colours, tmp_path):
    fused = tmp_path / "fused"
    assert cli("fuse", "existing", "--base", tiny_model, "--out", fused)[0] == 0
    ours = [eval_json(cli, "--base", tiny_model, "--data", colours),
            eval_json(cli, "existing", "--data", tiny_data),
            eval_json(cli, fused, "--data", tiny_data)]
    upstream = mlx_lm_lora_test(
        ["--model", tiny_model, "--data", colours, "--adapter-path", "", "--mask-prompt"],
        ["--model", tiny_model, "--data", tiny_data, "--adapter-path", lora_adapter],
        ["--model", fused, "--data", tiny_data, "--adapter-path", ""])
    for row, expected in zip(ours, upstream):
        assert abs(row["value"] - expected) < 1e-4, (row["subject"], row["value"], expected)
        assert row["scores"]["perplexity"] == pytest.approx(2.718281828 ** row["value"], rel=1e-6)
    assert [r["subject"]["kind"] for r in ours] == ["base", "adapter", "fused"]
    assert ours[0]["settings"]["completion_only"] is True and ours[1]["settings"]["completion_only"] is False
    assert ours[1]["examples"] == 16 and ours[1]["tokens"] > 0 and ours[1]["versions"]["mlx_lm"]
    assert populated.verify().ok


def test_loreft_loss_is_the_one_its_trainer_reports(registry, cli, tiny_model, colours):
    from adapterhub.training.config import TrainConfig
    from adapterhub.training.trainer import train

    version = train(registry, TrainConfig(base=str(tiny_model), data=str(colours), name="reft", kind="loreft", layers="2;3",
                                          rank=2, iters=2, mask_prompt=True, steps_per_eval=100, save_every=100))
    row = eval_json(cli, "reft", "--data", colours)  # its own base and a completion-only loss, as it trained
    assert abs(row["value"] - version.record["training"]["test_loss"]) < 1e-4
    assert eval_json(cli, "reft")["reused"] is True  # --data defaults to the dataset it was trained on


def test_a_recorded_eval_is_reused_until_forced_and_kept_append_only(cli, populated, tiny_data):
    first = eval_json(cli, "existing", "--data", tiny_data)
    again = eval_json(cli, "existing", "--data", tiny_data)
    assert (first["reused"], again["reused"]) == (False, True) and again["created_at"] == first["created_at"]
    code, out, _ = cli("eval", "existing", "--data", tiny_data)
    assert code == 0 and "--force measures again" in out
    forced = eval_json(cli, "existing", "--data", tiny_data, "--force")
    assert forced["reused"] is False and forced["value"] == pytest.approx(first["value"], abs=1e-6)
    other_batching = eval_json(cli, "existing", "--data", tiny_data, "--batch-size", "8")
    assert other_batching["reused"] is False  # another measurement: mlx-lm pads per batch
    rows = populated.evaluations(populated.resolve("existing"))
    assert len(rows) == 3 and rows[0]["created_at"] == first["created_at"]
    code, out, _ = cli("--json", "show", "existing")
    assert len(json.loads(out)["evaluations"]) == 3
    code, out, _ = cli("show", "existing")
    assert out.count("  eval       test loss") == 2  # the newest of each measurement
    assert populated.verify().ok


def test_eval_runs_with_a_registry_named_relative_to_the_working_folder(cli, populated, tiny_data, monkeypatch):
    """`make demo` names its registry `registry`: the adapter folder eval hands mlx-lm links to the blobs, and a
    relative link would point inside that temporary folder."""
    monkeypatch.chdir(populated.root.parent)
    code, out, err = cli("--json", "eval", "existing", "--data", tiny_data, registry=Path(populated.root.name))
    assert code == 0, err
    assert json.loads(out)["value"] > 0


def test_exact_match_scores_completions_and_refuses_text(cli, populated, tiny_model, colours, tiny_data):
    row = eval_json(cli, "--base", tiny_model, "--data", colours, "--metric", "exact-match")
    assert row["metric"] == "exact-match" and set(row["scores"]) == {"exact_match", "token_accuracy"}
    assert row["value"] == row["scores"]["exact_match"] == row["correct"] / row["examples"]
    assert 0 <= row["scores"]["token_accuracy"] <= 1 and row["examples"] == 16
    before = snapshot(populated.root)
    assert_refused(cli("eval", "existing", "--data", tiny_data, "--metric", "exact-match"),
                   "is text data: exact-match scores a completion", before, populated)


def test_bad_input_is_one_line_and_writes_nothing(cli, populated, tiny_model, tiny_data, tmp_path):
    import shutil

    data = tmp_path / "no-valid"
    data.mkdir()
    shutil.copy(tiny_data / "train.jsonl", data / "train.jsonl")
    shutil.copy(tiny_data / "test.jsonl", data / "test.jsonl")
    before = snapshot(populated.root)
    assert_refused(cli("eval", "existing", "--data", data, "--split", "valid"), "has no valid.jsonl (it has train, test)",
                   before, populated)
    assert_refused(cli("eval", tiny_model), "is not a fused model: it has no adapterhub.json", before, populated)
    assert_refused(cli("eval", "existing"), "existing@1 records no dataset", before, populated)
    assert_refused(cli("eval", "existing", "--data", tiny_data, "--batch-size", "32"),
                   "has 16 examples, fewer than --batch-size 32", before, populated)
    assert_refused(cli("eval", "--data", tiny_data), "nothing to evaluate", before, populated)
    assert cli("eval", "existing", "--data", tiny_data, "--tolerance", "0.1")[0] == 2  # --tolerance goes with --against


def test_compare_puts_versions_side_by_side_and_marks_the_best(cli, populated, lora_adapter, tiny_model, tiny_data):
    checkpoint = sorted(lora_adapter.glob("0*_adapters.safetensors"))[0].name
    assert cli("import", lora_adapter, "--name", "early", "--base", tiny_model, "--checkpoint", checkpoint)[0] == 0
    code, out, err = cli("--json", "compare", "existing", "early", "--base", tiny_model, "--data", tiny_data)
    assert code == 0, err
    table = json.loads(out)
    assert [c["label"] for c in table["columns"]] == ["existing@1", "early@1", "base:tiny-llama"]
    rows = {r["field"]: r for r in table["rows"]}
    assert rows["kind"]["values"] == ["lora", "lora", "base"] and rows["rank"]["values"][:2] == [8, 8]
    losses = rows["test_loss"]["values"]
    assert rows["test_loss"]["best"] == [losses.index(min(losses))] and rows["test_loss"]["better"] == "lower"
    assert "test_exact_match" not in rows  # text data: the loss alone
    code, out, _ = cli("compare", "existing", "early", "--base", tiny_model)  # now recorded: nothing computed
    line = next(l for l in out.splitlines() if l.startswith("test_loss"))
    assert line.count("*") == 1 and f"{min(losses):.4f} *" in line
    before = snapshot(populated.root)
    assert_refused(cli("compare", "existing"), "compare needs two or more columns", before, populated)


def test_list_sorts_by_a_recorded_score_best_first(cli, populated, lora_adapter, tiny_model, tiny_data, colours):
    checkpoint = sorted(lora_adapter.glob("0*_adapters.safetensors"))[0].name
    assert cli("import", lora_adapter, "--name", "early", "--base", tiny_model, "--checkpoint", checkpoint)[0] == 0
    assert cli("import", lora_adapter, "--name", "never-scored", "--base", tiny_model, "--checkpoint",
               sorted(lora_adapter.glob("0*_adapters.safetensors"))[-1].name)[0] == 0
    scores = {ref: eval_json(cli, ref, "--data", tiny_data)["value"] for ref in ("existing", "early")}
    code, out, _ = cli("--json", "list", "--sort", "eval:test_loss")
    listed = json.loads(out)
    assert [v["ref"] for v in listed] == [*(f"{r}@1" for r in sorted(scores, key=scores.get)), "never-scored@1"]
    assert listed[0]["sorted_by"]["value"] == min(scores.values()) and listed[-1]["sorted_by"]["value"] is None
    code, out, _ = cli("--json", "list", "--sort", "-name")
    assert [v["name"] for v in json.loads(out)] == ["never-scored", "existing", "early"]
    code, _, err = cli("list", "--sort", "eval:test_nonsense")
    assert code == 2 and "eval:test_loss" in err
    # Scores on different data do not rank: said so, on stderr.
    eval_json(cli, "existing", "--data", colours)
    code, out, err = cli("list", "--sort", "eval:test_loss")
    assert code == 0 and "from 2 datasets" in err


def test_fidelity_of_a_float_fuse_is_exact_and_a_4bit_fuse_is_not(cli, registry, tiny_model_4bit, tmp_path):
    adapter = write_adapter(tiny_model_4bit, tmp_path / "qlora", seed=5)
    assert cli("import", adapter, "--name", "qlora", "--base", tiny_model_4bit)[0] == 0
    measured = {}
    for out, flags in (("fused-4bit", ()), ("fused-float", ("--dequantize",))):
        code, text, err = cli("fuse", "qlora", "--base", tiny_model_4bit, "--out", tmp_path / out, *flags)
        assert code == 0, err
        record = json.loads((tmp_path / out / "adapterhub.json").read_text())
        measured[out] = record["fidelity"]
        assert registry.fused(record["sha256"])["fidelity"] == measured[out]  # on the fused model's record
        assert "fidelity greedy tokens agree at" in text
        # The warning naming --dequantize: exactly when re-quantizing moved more than 1 % of greedy tokens.
        assert ("--dequantize" in text) == (not flags and 1 - measured[out]["token_agreement"] > 0.01)
    assert measured["fused-float"]["exact"] is True and measured["fused-float"]["token_agreement"] == 1.0
    assert measured["fused-4bit"]["exact"] is False and measured["fused-4bit"]["max_logit_diff"] > 1e-2
    code, out, err = cli("--json", "fuse", "qlora", "--base", tiny_model_4bit, "--out", tmp_path / "unchecked",
                         "--no-fidelity")
    assert code == 0 and json.loads(out)["fidelity"] is None, err
    prompts = ["the cat sees", "what colour is the sky ?"]
    exact = fidelity(registry, tmp_path / "fused-float", "qlora", prompts)
    assert exact["exact"] is True and exact["token_agreement"] == 1.0 and exact["prompts"] == 2
    lossy = fidelity(registry, tmp_path / "fused-4bit", "qlora", prompts)
    assert lossy["max_logit_diff"] > 1e-2 and lossy["exact"] is False
    before = snapshot(registry.root)
    code, out, err = cli("--json", "eval", tmp_path / "fused-4bit", "--against", "qlora")  # built-in prompts
    report = json.loads(out)
    assert code == 1 and report["passed"] is False and report["disagreement"] > report["tolerance"] == 0.01
    assert err.startswith("error: ") and "past --tolerance 0.01" in err and "--dequantize" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli("eval", tmp_path / "fused-float", "--against", "qlora", "--tolerance", "0")
    assert code == 0 and "exact" in out
    code, out, err = cli("eval", tmp_path / "fused-4bit", "--against", "qlora", "--tolerance", "1")
    assert code == 0 and "within --tolerance 1" in out
    assert snapshot(registry.root) == before  # a check, not a record


def test_the_card_carries_recorded_evaluations_as_model_index(cli, populated, tiny_data):
    from huggingface_hub import ModelCard

    row = eval_json(cli, "existing", "--data", tiny_data)
    code, out, _ = cli("card", "existing")
    results = ModelCard(out).data.eval_results
    assert {(r.metric_type, r.dataset_split, r.dataset_revision) for r in results} == \
        {("loss", "test", row["dataset"]["sha256"]), ("perplexity", "test", row["dataset"]["sha256"])}
    assert "## Evaluation" in out
