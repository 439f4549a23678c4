"""Every bad input gets exit 1, one clear line, and a registry exactly as it was."""

import json

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import assert_refused, snapshot
from tests.test_bad_files import ADAPTER_CASES


def _truncate(folder):
    path = folder / "adapters.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _bad_header(folder):
    (folder / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header at all")


def _rewrite(folder, change):
    weights = dict(mx.load(str(folder / "adapters.safetensors")))
    change(weights)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)


def _nan(folder):
    def poison(w):
        key = sorted(k for k in w if k.endswith("lora_b"))[0]
        values = np.array(w[key])
        values[0, 0] = np.nan
        w[key] = mx.array(values)
    _rewrite(folder, poison)


def _rank_mismatch(folder):
    def shrink(w):
        key = sorted(k for k in w if k.endswith("lora_b"))[0]
        w[key] = w[key][:4]
    _rewrite(folder, shrink)


def _pickle(folder):
    (folder / "adapters.safetensors").unlink()
    (folder / "adapters.bin").write_bytes(b"\x80\x04\x95 pickled")


def _no_config(folder):
    (folder / "adapter_config.json").unlink()


def _config_lies_about_rank(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 16
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _config_says_dora(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    config["fine_tune_type"] = "dora"
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _config_not_json(folder):
    (folder / "adapter_config.json").write_text("{rank: 8")


IMPORT_CASES = [
    ("truncated safetensors", _truncate, "not a valid safetensors file"),
    ("wrong header", _bad_header, "not a valid safetensors file"),
    ("NaN weights", _nan, "NaN or infinite values in model.layers."),
    ("lora_a/lora_b rank mismatch", _rank_mismatch, "has rank 8 but lora_b [4, "),
    ("pickle file", _pickle, "is a pickle file; adapterhub never unpickles weights"),
    ("missing config", _no_config, "no adapter_config.json"),
    ("config disagrees with tensors", _config_lies_about_rank, "says rank 16 but the tensors have rank 8"),
    ("config says dora", _config_says_dora, "says fine_tune_type 'dora' but the tensors are LORA"),
    ("config not JSON", _config_not_json, "adapter_config.json is damaged"),
]


# One table of damaged adapter folders: these, and test_bad_files' cases of bytes mlx cannot load.
ALL_IMPORT_CASES = IMPORT_CASES + ADAPTER_CASES


@pytest.mark.parametrize("case,damage,message", ALL_IMPORT_CASES, ids=[c[0] for c in ALL_IMPORT_CASES])
def test_bad_adapter_folders_are_refused(cli, populated, adapter_copy, tiny_model, case, damage, message):
    folder = adapter_copy()
    damage(folder)
    before = snapshot(populated.root)
    assert_refused(cli("import", folder, "--name", "broken", "--base", tiny_model), message, before, populated)


BAD_COMMANDS = [
    ("bad name", ["import", "{adapter}", "--name", "Bad Name"], "invalid name 'Bad Name'"),
    ("reserved name", ["import", "{adapter}", "--name", "latest"], "'latest' is a reserved word"),
    ("missing folder", ["import", "{tmp}/nowhere", "--name", "nowhere"], "does not exist"),
    ("missing base", ["import", "{adapter}", "--name", "fine", "--base", "{tmp}/no-model"], "model folder"),
    ("unknown base name", ["import", "{adapter}", "--name", "fine", "--base", "nobody"], "no base model 'nobody'"),
    ("unknown parent", ["import", "{adapter}", "--name", "fine", "--parent", "ghost@1"], "no adapter 'ghost@1'"),
    ("missing dataset", ["import", "{adapter}", "--name", "fine", "--dataset", "{tmp}/no-data"], "dataset folder"),
    ("incompatible base", ["import", "{adapter}", "--name", "fine", "--base", "{narrow}"], "does not fit base"),
    ("bad tag key", ["import", "{adapter}", "--name", "fine", "--tag", "bad key=x"], "invalid tag key 'bad key'"),
    ("bad tag key on tag", ["tag", "existing", "bad key=x"], "invalid tag key 'bad key'"),
    ("show unknown ref", ["show", "ghost"], "no adapter 'ghost'"),
    ("show missing version", ["show", "existing@9"], "has no version 9 (latest is 1)"),
    ("unknown sha prefix", ["show", "0123456789abcdef"], "no adapter '0123456789abcdef'"),
    ("alias unknown ref", ["alias", "ghost", "prod"], "no adapter 'ghost'"),
    ("bad alias", ["alias", "existing", "7"], "invalid alias '7'"),
    ("tag unknown ref", ["tag", "ghost", "a=b"], "no adapter 'ghost'"),
    ("rm unknown ref", ["rm", "ghost@2"], "no adapter 'ghost@2'"),
    ("export unknown ref", ["export", "ghost", "{tmp}/out"], "no adapter 'ghost'"),
    ("check unknown ref", ["check", "ghost", "--base", "{model}"], "no adapter 'ghost'"),
    ("check missing base", ["check", "existing", "--base", "{tmp}/no-model"], "does not exist"),
    ("pickle base model", ["base", "add", "{pickle_model}"], "is a pickle file"),
    # Versions count from 1, in ASCII digits; nothing else names a version.
    ("rm at zero", ["rm", "existing@0"], "has no version 0"),
    ("show at zero", ["show", "existing@0"], "has no version 0"),
    ("superscript version", ["show", "existing@\u00b2"], "has no version '\u00b2'"),
    ("arabic-indic version", ["rm", "existing@\u0661"], "has no version '\u0661'"),
    ("version of 5000 digits", ["show", "existing@" + "9" * 5000], "has no version"),
    # Full-match names: a trailing newline is a character like any other.
    ("name with a trailing newline", ["import", "{adapter}", "--name", "abcd\n"], "invalid name 'abcd\\n'"),
    ("name that reads as a sha prefix", ["import", "{adapter}", "--name", "deadbeefcafe"], "would read as a sha256 prefix"),
    ("alias with a trailing newline", ["alias", "existing", "prod\n"], "invalid alias 'prod\\n'"),
    ("tag key with a trailing newline", ["tag", "existing", "owner\n=ana"], "invalid tag key 'owner\\n'"),
    ("control characters are escaped", ["show", "ghost\x1b[31m"], "no adapter 'ghost\\x1b[31m'"),
    ("registry path that is a file", ["list", "--registry", "{adapter}/adapter_config.json"], "no registry at"),
]


@pytest.mark.parametrize("case,args,message", BAD_COMMANDS, ids=[c[0] for c in BAD_COMMANDS])
def test_bad_commands_are_refused(cli, populated, lora_adapter, tiny_model, tmp_path, case, args, message):
    from adapterhub.tinymodel import write_model

    narrow = write_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64) if "{narrow}" in args else None
    pickle_model = tmp_path / "pickle-model"
    pickle_model.mkdir()
    (pickle_model / "config.json").write_text("{}")
    (pickle_model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    values = dict(adapter=lora_adapter, tmp=tmp_path, model=tiny_model, narrow=narrow, pickle_model=pickle_model)
    before = snapshot(populated.root)
    assert_refused(cli(*[a.format(**values) for a in args]), message, before, populated)


@pytest.mark.parametrize("target", ["catalog/adapters/existing.json", "catalog/bases.json", "policy.json", "registry.json"])
def test_corrupt_catalogue_file(cli, populated, lora_adapter, target):
    path = populated.root / target
    path.write_text(path.read_text()[:25])
    before = snapshot(populated.root)
    command = ["show", "existing"] if "adapters" in target else ["import", str(lora_adapter), "--name", "another"]
    if target == "catalog/bases.json":
        command = ["base", "list"]
    assert_refused(cli(*command), "is damaged", before, populated)
    code, out, err = cli("verify")
    assert code == 1 and "is damaged" in out + err


def test_usage_errors_exit_2(cli):
    code, _, err = cli("import")
    assert code == 2 and "Missing argument" in err
    code, _, err = cli("tag", "x", "novalue")
    assert code == 2 and "is not KEY=VALUE" in err



def test_bad_lock_timeout_is_one_line(cli, populated, lora_adapter, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_LOCK_TIMEOUT", "abc")
    before = snapshot(populated.root)
    assert_refused(cli("import", lora_adapter, "--name", "another"), "ADAPTERHUB_LOCK_TIMEOUT='abc' is not a number", before, populated)


def test_empty_registry_path_is_a_usage_error(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["--registry", "", "list"], ["list", "--registry", ""]):
        code, _, err = cli(*args)
        assert code == 2 and "an empty path would mean the current folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["registry"]  # the fixture's own, nothing more


def test_policy_regex_that_does_not_compile(cli, populated, lora_adapter):
    (populated.root / "policy.json").write_text(json.dumps({"name_pattern": "^(oops", "required_tags": []}))
    before = snapshot(populated.root)
    assert_refused(cli("import", lora_adapter, "--name", "another"), "is not a valid regular expression", before, populated)


def test_required_tag_with_an_empty_value(cli, populated, lora_adapter):
    from adapterhub.naming import Policy

    populated.set_policy(Policy(required_tags=("task",)))
    before = snapshot(populated.root)
    assert_refused(cli("import", lora_adapter, "--name", "another", "--tag", "task="), "requires tag(s) task", before, populated)


@pytest.mark.parametrize("ref,message", [("existing@1 ", "has no alias '1 '"), ("existing@1\n", "has no alias '1\\n'"),
                                         (" existing", "no adapter ' existing'")])
def test_refs_are_taken_exactly_as_given(cli, populated, ref, message):
    before = snapshot(populated.root)
    assert_refused(cli("rm", ref), message, before, populated)


def test_a_blank_registry_variable_is_refused(cli, populated, monkeypatch, tmp_path):
    from adapterhub.cli import main
    import sys

    monkeypatch.setenv("ADAPTERHUB_REGISTRY", " ")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["adapterhub", "list"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1


@pytest.mark.parametrize("command", [["base", "list"], ["runs"], ["verify"], ["verify", "--repair"], ["list"]])
def test_reading_a_missing_registry_is_an_error_and_creates_nothing(cli, tmp_path, command):
    code, _, err = cli(*command, registry=tmp_path / "typo")
    assert code == 1 and err.startswith("error: no registry at") and not (tmp_path / "typo").exists()


def test_a_registered_base_whose_folder_moved_is_named_and_can_be_added_again(cli, registry, lora_adapter, tiny_model,
                                                                             tiny_data, tmp_path):
    """Commands that read a base's weights say its folder is gone (not a Hub lookup or a TypeError); `check` needs
    only the fingerprint and still runs; `base add` at the new place is the way back, as the message says."""
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "tiny")
    assert cli("import", lora_adapter, "--name", "stories", "--base", model)[0] == 0
    moved = model.rename(tmp_path / "moved")
    base = registry.resolve("stories").record["base"]["name"]
    before = snapshot(registry.root)
    gone = f"base {base} is registered, but its files are not on this machine (its folder {model} is gone)"
    for command in (("generate", "stories", "--prompt", "hi", "--max-tokens", "2"),
                    ("eval", "stories", "--data", tiny_data),
                    ("eval", "--base", base, "--data", tiny_data),
                    ("fuse", "stories", "--base", base, "--out", tmp_path / "fused"),
                    ("train", "--name", "again", "--base", base, "--data", tiny_data, "--iters", "1")):
        assert_refused(cli(*command), gone, before, registry)
    code, out, _ = cli("check", "stories", "--base", base)
    assert code == 0 and "compatible" in out
    assert cli("base", "add", moved, "--name", base)[0] == 0
    code, out, err = cli("generate", "stories", "--prompt", "hi", "--max-tokens", "2")
    assert code == 0, err
