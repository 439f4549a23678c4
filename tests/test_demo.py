import json
import subprocess
import sys

from adapterhub.registry import Registry
from tests.conftest import subprocess_env


def test_demo_runs_the_lifecycle_into_a_fresh_registry(tmp_path):
    registry = tmp_path / "registry"
    # Paths relative to the working folder, as `make demo` names them: every step must work so too.
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", "registry", "demo", "--workdir", "work"],
                          cwd=tmp_path, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error: invalid name 'Tiny Stories!'" in done.stdout  # the naming step shows a refusal
    reg = Registry(registry)
    assert [v.ref for v in reg.list()] == ["tiny-colours-reft@1", "tiny-stories-extracted@1", "tiny-stories-lora@1", "tiny-stories-lora-ckpt@2",
                                          "tiny-trained@1", "tiny-trained@2", "tiny-trained-from-peft@1"]
    assert reg.resolve("tiny-trained@2").record["parents"][0]["ref"] == "tiny-trained@1"
    # Step 12 removed tiny-stories-lora-ckpt@1 and imported the same bytes again: a new number, not the old one.
    assert "tiny-stories-lora-ckpt@1 was removed at" in done.stdout and "no version 0" in done.stdout
    assert "is inside the registry at" in done.stdout
    assert [r["status"] for r in reg.runs()] == ["finished", "finished", "finished"]
    assert "same tokens" in done.stdout and "exact: the base is back, bit for bit" in done.stdout
    assert len(reg.fused_models()) == 1
    # The evaluation step: the adapter answers the colour questions the base cannot, side by side, best marked.
    scores = {label: [r["value"] for r in reg.evaluations(subject) if r["metric"] == "exact-match"]
              for label, subject in (("base", reg.base("tiny-llama")["sha256"]), ("v2", reg.resolve("tiny-trained@2")))}
    assert scores["base"][-1] <= 0.2 and scores["v2"][-1] >= 0.5, scores
    assert "exact-match on the colour questions: tiny-llama 0 %" in done.stdout and "* best in its row" in done.stdout
    assert "greedy tokens agree at 100.0 %" in done.stdout  # the fused model against base + adapter
    assert reg.resolve("tiny-stories-lora@prod").version == 1
    assert reg.verify().ok
    shown = json.loads(subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry), "--json", "show",
                                       "tiny-stories-lora"], capture_output=True, text=True, env=subprocess_env()).stdout)
    assert shown["dataset"]["examples"]["train"] == 64 and shown["base"]["name"] == "tiny-llama"
