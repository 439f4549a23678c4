"""The command line as people type it: global options anywhere, ranges on every number, honest replies."""

import json

import click
import pytest

from adapterhub.cli import FiniteFloat, cli as root
from tests.conftest import subprocess_env


def _commands(group: click.Group, prefix=()):
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


ALL_COMMANDS = list(_commands(root))


def test_every_command_module_is_mapped_and_the_map_is_whole():
    import importlib

    from adapterhub.cli import COMMAND_MODULES

    for module, names in COMMAND_MODULES.items():
        assert tuple(c.name for c in importlib.import_module(f"adapterhub.cli.{module}").COMMANDS) == names
    assert {p[0] for p, _ in ALL_COMMANDS} == {n for names in COMMAND_MODULES.values() for n in names}


def test_a_command_imports_its_own_module_only():
    import subprocess
    import sys

    code = ("import sys; from adapterhub.cli import main; sys.argv = ['adapterhub', 'show', '--help']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('adapterhub.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()).stdout
    loaded = out.strip().splitlines()[-1]
    assert "adapterhub.cli.catalogue" in loaded
    assert not any(f"adapterhub.cli.{m}'" in loaded for m in ("training", "algebra", "serve", "ui", "remote", "evaluate"))


@pytest.mark.parametrize("path,command", ALL_COMMANDS, ids=[" ".join(p) for p, _ in ALL_COMMANDS])
def test_every_number_option_has_a_range(path, command):
    for param in command.params:
        if isinstance(param.type, click.types.IntParamType):
            assert isinstance(param.type, click.IntRange) and param.type.min is not None, (path, param.name)
        if isinstance(param.type, click.types.FloatParamType):
            assert isinstance(param.type, FiniteFloat), (path, param.name)


@pytest.mark.parametrize("path,command", ALL_COMMANDS, ids=[" ".join(p) for p, _ in ALL_COMMANDS])
def test_every_command_takes_the_global_options_after_it(path, command):
    names = {opt for param in command.params for opt in param.opts}
    assert {"--json", "--quiet", "--registry"} <= names, path


def test_global_options_after_the_command_mean_the_same(cli, registry, lora_adapter, tmp_path):
    registry.import_adapter(lora_adapter, "stories")
    before = cli("--json", "list")
    assert before[0] == 0 and cli("list", "--json") == before
    assert json.loads(before[1])[0]["ref"] == "stories@1"
    other = tmp_path / "other"
    code, out, _ = cli("import", lora_adapter, "--name", "elsewhere", "--registry", other, "--quiet")
    assert code == 0 and out == ""
    assert [v["ref"] for v in json.loads(cli("list", "--json", "--registry", other)[1])] == ["elsewhere@1"]


@pytest.mark.parametrize("args", [["generate", "x", "--prompt", "p", "--max-tokens", "0"],
                                  ["stack", "a", "b", "--name", "c", "--method", "svd", "--rank", "-3"],
                                  ["train", "--keep-last", "-1"], ["train", "--learning-rate", "nan"],
                                  ["train", "--scale", "inf"], ["checkpoints", "prune", "run", "--keep-best", "-2"]])
def test_out_of_range_numbers_are_usage_errors(cli, registry, args):
    code, _, err = cli(*args)
    assert code == 2 and "Invalid value" in err


def test_importing_the_same_weights_says_what_was_not_applied(cli, registry, lora_adapter):
    assert cli("import", lora_adapter, "--name", "stories", "--tag", "task=a")[0] == 0
    code, out, err = cli("import", lora_adapter, "--name", "stories", "--tag", "task=b", "--description", "new words")
    assert code == 0 and out.startswith("already registered: stories@1")
    assert "note: tags, description not applied" in err and "adapterhub tag stories@1 task=b" in err
    code, out, _ = cli("--json", "import", lora_adapter, "--name", "stories", "--tag", "task=b")
    assert json.loads(out)["not_applied"] == {"tags": {"task": "b"}}
    assert registry.resolve("stories").record["tags"] == {"task": "a"}


def test_a_linux_install_without_an_mlx_backend_says_which_extra_to_install(tmp_path):
    """mlx without mlx-cpu / mlx-cuda: its real package, minus the backend library the extra would bring."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import mlx

    site = tmp_path / "site"
    shutil.copytree(Path(list(mlx.__path__)[0]), site / "mlx", ignore=shutil.ignore_patterns("libmlx*"))
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(tmp_path / "reg"), "--quiet", "demo",
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: MLX cannot load its backend here") and "adapterhub[cpu]" in done.stderr
