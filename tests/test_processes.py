"""Real processes against one registry: concurrent writers, SIGKILL at random moments, start-up imports."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from adapterhub.registry import Registry
from tests.conftest import subprocess_env

CLI = [sys.executable, "-m", "adapterhub.cli"]


def test_four_processes_importing_at_once_get_four_versions(registry_path, lora_adapter, lora_adapter_b,
                                                            dora_adapter, all_layers_adapter):
    adapters = [lora_adapter, lora_adapter_b, dora_adapter, all_layers_adapter]
    procs = [subprocess.Popen([*CLI, "--registry", str(registry_path), "--json", "import", str(a), "--name", "shared"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for a in adapters]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0, 0], [r[1] for r in results]
    versions = sorted(json.loads(r[0])["version"] for r in results)
    assert versions == [1, 2, 3, 4]
    registry = Registry(registry_path)
    assert sorted(v.sha256 for v in registry.list()) == sorted({json.loads(r[0])["sha256"] for r in results})
    report = registry.verify()
    assert report.ok and not report.notes, report.to_dict()


def test_sigkill_at_random_moments_never_breaks_verify(registry_path, lora_adapter, all_layers_adapter, tiny_model, tiny_data):
    def start(i):
        adapter = (lora_adapter, all_layers_adapter)[i % 2]
        return subprocess.Popen([*CLI, "--registry", str(registry_path), "import", str(adapter), "--name", f"victim-{i}",
                                 "--base", str(tiny_model), "--dataset", str(tiny_data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())

    began = time.monotonic()
    start(999).wait(timeout=120)
    duration = time.monotonic() - began
    rng = random.Random(1234)
    killed_mid_run = trials = 0
    while killed_mid_run < 20 and trials < 60:
        proc = start(trials)
        time.sleep(rng.uniform(0.1, 0.9) * duration)
        proc.send_signal(signal.SIGKILL)
        killed_mid_run += proc.wait() == -signal.SIGKILL
        trials += 1
        report = Registry(registry_path).verify()
        assert report.ok, (trials, report.to_dict())
    assert killed_mid_run >= 20
    # After all that, the registry still takes writes and every completed version is whole.
    done = subprocess.run([*CLI, "--registry", str(registry_path), "import", str(lora_adapter), "--name", "after"],
                          capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert Registry(registry_path).verify().ok


@pytest.mark.parametrize("args", [["--help"], ["list"], ["show", "stories"], ["list", "--base", "tiny-llama"]])
def test_fast_commands_never_import_mlx_lm_or_transformers(registry, lora_adapter, tiny_model, args):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    probe = (
        "import sys\n"
        "from adapterhub.cli import main\n"
        f"sys.argv = ['adapterhub', '--registry', {str(registry.root)!r}, *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "heavy = [m for m in ('mlx_lm', 'transformers', 'mlx.core') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'CODE', code, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env())
    assert "HEAVY [] CODE 0" in done.stderr, done.stderr
