"""fuse and unfuse against mlx_lm's own fuse, bit for bit, on real tiny models."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from adapterhub.tinymodel import write_adapter, write_model
from tests.conftest import snapshot, subprocess_env


def mlx_lm_fuse(model, adapter, out, dequantize=False):
    command = [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model), "--adapter-path", str(adapter),
               "--save-path", str(out)] + (["--dequantize"] if dequantize else [])
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    return out


def load_all(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(mx.load(str(f)))
    return tensors


def assert_bit_identical(ours, upstream):
    mine, theirs = load_all(ours), load_all(upstream)
    assert set(mine) == set(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape, key
        assert mx.array_equal(mine[key], theirs[key]).item(), key


def assert_same_files(a, b):
    for f in sorted(b.glob("*.safetensors")) + [b / "config.json"]:
        assert (a / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_is_bit_identical_to_mlx_lm_and_unfuse_is_exact(cli, tmp_path, dtype, kind):
    model = write_model(tmp_path / "model", dtype=dtype, seed=3)
    adapter = write_adapter(model, tmp_path / "adapter", kind=kind, seed=4)
    assert cli("import", adapter, "--name", "tuned", "--base", model)[0] == 0
    code, out, err = cli("fuse", "tuned", "--base", model, "--out", tmp_path / "fused")
    assert code == 0, err
    assert_bit_identical(tmp_path / "fused", mlx_lm_fuse(model, adapter, tmp_path / "upstream"))
    assert load_all(tmp_path / "fused").keys() == load_all(model).keys()
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back")
    assert code == 0, err
    assert json.loads(out)["exact"] is True
    assert_same_files(tmp_path / "back", model)


@pytest.mark.parametrize("dequantize", [False, True])
def test_quantized_base(cli, tmp_path, tiny_model_4bit, dequantize):
    adapter = write_adapter(tiny_model_4bit, tmp_path / "qlora", seed=5)
    assert cli("import", adapter, "--name", "qlora", "--base", tiny_model_4bit)[0] == 0
    flags = ["--dequantize"] if dequantize else []
    code, _, err = cli("fuse", "qlora", "--base", tiny_model_4bit, "--out", tmp_path / "fused", *flags)
    assert code == 0, err
    assert_bit_identical(tmp_path / "fused", mlx_lm_fuse(tiny_model_4bit, adapter, tmp_path / "upstream", dequantize))
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert ("quantization" in config) is not dequantize
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back")
    assert code == 0 and json.loads(out)["exact"] is True, err
    assert_same_files(tmp_path / "back", tiny_model_4bit)


def test_quantized_base_without_restore_data_is_not_claimed_exact(cli, tmp_path, tiny_model_4bit):
    adapter = write_adapter(tiny_model_4bit, tmp_path / "qlora", seed=5)
    cli("import", adapter, "--name", "qlora", "--base", tiny_model_4bit)
    code, out, _ = cli("fuse", "qlora", "--base", tiny_model_4bit, "--out", tmp_path / "fused", "--no-restore")
    assert code == 0 and "unfuse will be approximate" in out
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back", "--adapter", "qlora")
    report = json.loads(out)
    assert code == 0 and report["exact"] is False and 0 < report["inexact_fraction"] < 1


def test_fused_model_generates_like_base_plus_adapter(cli, tmp_path, tiny_model, lora_adapter):
    from mlx_lm import generate, load

    cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)
    assert cli("fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused")[0] == 0
    prompt = "the cat sees"
    model, tokenizer = load(str(tiny_model), adapter_path=str(lora_adapter))
    expected = generate(model, tokenizer, prompt=prompt, max_tokens=12)
    fused, fused_tokenizer = load(str(tmp_path / "fused"))
    assert generate(fused, fused_tokenizer, prompt=prompt, max_tokens=12) == expected


def test_several_adapters_add_their_updates(cli, registry, tmp_path, tiny_model):
    a = write_adapter(tiny_model, tmp_path / "a", seed=1)
    b = write_adapter(tiny_model, tmp_path / "b", seed=2, keys=["self_attn.q_proj"])
    cli("import", a, "--name", "first", "--base", tiny_model)
    cli("import", b, "--name", "second", "--base", tiny_model)
    assert cli("fuse", "first", "second", "--base", tiny_model, "--out", tmp_path / "fused")[0] == 0
    base, fused = load_all(tiny_model), load_all(tmp_path / "fused")
    wa, wb = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    key = "model.layers.3.self_attn.q_proj"
    w = base[key + ".weight"]
    for weights in (wa, wb):
        w = w + ((10.0 * weights[key + ".lora_b"].T) @ weights[key + ".lora_a"].T).astype(w.dtype)
    assert mx.array_equal(fused[key + ".weight"], w).item()
    code, out, _ = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back")
    assert json.loads(out)["exact"] is True
    record = json.loads((tmp_path / "fused" / "adapterhub.json").read_text())
    assert [a["ref"] for a in record["adapters"]] == ["first@1", "second@1"]
    assert registry.fused(record["sha256"])["base"]["name"] == "tiny-llama"


def test_sharded_base_keeps_its_shards_and_index(cli, tmp_path):
    model = write_model(tmp_path / "sharded", shards=3, seed=9)
    adapter = write_adapter(model, tmp_path / "adapter", seed=1)
    cli("import", adapter, "--name", "tuned", "--base", model)
    assert cli("fuse", "tuned", "--base", model, "--out", tmp_path / "fused")[0] == 0
    assert sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors")) == sorted(p.name for p in model.glob("*.safetensors"))
    assert (tmp_path / "fused" / "model.safetensors.index.json").exists()
    from adapterhub.fingerprint import fingerprint_model

    # The record's hash is the folder's fingerprint, so a fused folder is recognised however it is found.
    assert fingerprint_model(tmp_path / "fused")["sha256"] == json.loads((tmp_path / "fused" / "adapterhub.json").read_text())["sha256"]
    from mlx_lm import load

    load(str(tmp_path / "fused"))
    code, out, _ = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back")
    assert json.loads(out)["exact"] is True
    assert_same_files(tmp_path / "back", model)


def test_refusals_write_nothing(cli, registry, tmp_path, tiny_model, lora_adapter, lora_adapter_b):
    registry.import_adapter(lora_adapter, "parent-run", base=tiny_model)
    registry.import_adapter(lora_adapter_b, "child-run", base=tiny_model, parent="parent-run@1")
    registry.register_records([dict(registry.resolve("parent-run").record, name="steer-reft", kind="loreft")])
    narrow = write_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    out = tmp_path / "out"
    before = snapshot(registry.root)
    code, _, err = cli("fuse", "parent-run", "child-run", "--base", tiny_model, "--out", out)
    assert code == 1 and "parent-run@1 is an ancestor of child-run@1" in err
    code, _, err = cli("fuse", "parent-run", "--base", narrow, "--out", out)
    assert code == 1 and "is not compatible with narrow" in err
    code, _, err = cli("fuse", "steer-reft", "--base", tiny_model, "--out", out)
    assert code == 1 and "LoReFT adapter: it edits hidden states" in err
    assert not out.exists()
    assert snapshot(registry.root) == before


def test_unfuse_refuses_damaged_restore_data(cli, registry, tmp_path, tiny_model, lora_adapter):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    assert cli("fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused")[0] == 0
    weights = tmp_path / "fused" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x10
    weights.write_bytes(bytes(data))
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back")
    assert code == 1 and "does not match base tiny-llama" in err
    report = json.loads(out)  # measured after the fact: the one flipped bit is the one inexact element
    assert report["exact"] is False and 0 < report["inexact_fraction"] < 1e-3 and report["max_abs_error"] > 0


def _float16_model_with_overflowing_adapter(tmp_path):
    """A float16 model and an adapter finite everywhere on the way in: float32 factors of ~1e5 with scale 10 give
    updates near 1e9, beyond float16's 65504, so only the fused tensor itself is inf."""
    model = write_model(tmp_path / "model", dtype="float16", seed=3)
    adapter = write_adapter(model, tmp_path / "adapter", seed=4)
    weights = mx.load(str(adapter / "adapters.safetensors"))
    mx.save_safetensors(str(adapter / "adapters.safetensors"),
                        {k: (v.astype(mx.float32) * 1e5) if k.endswith("lora_b") else v.astype(mx.float32) * 1e3
                         for k, v in weights.items()})
    return model, adapter


def test_fuse_refuses_an_update_that_overflows_the_base_dtype_and_leaves_nothing(cli, registry, tmp_path):
    model, adapter = _float16_model_with_overflowing_adapter(tmp_path)
    assert cli("import", adapter, "--name", "huge", "--base", model)[0] == 0
    objects_before, before = snapshot(registry.root / "objects"), snapshot(registry.root)
    code, _, err = cli("fuse", "huge", "--base", model, "--out", tmp_path / "fused")
    assert code == 1 and "non-finite (inf or NaN) in float16" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "fused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "model", "registry"]  # no staging folder either
    assert snapshot(registry.root / "objects") == objects_before  # no restore data kept
    assert snapshot(registry.root) == before
    assert registry.fused_models() == [] and registry.staging_rows() == ([], [])


def test_unfuse_refuses_a_folder_record_fuse_did_not_write(cli, registry, tmp_path, tiny_model, lora_adapter):
    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    assert cli("fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused")[0] == 0
    record_file = tmp_path / "fused" / "adapterhub.json"
    record = json.loads(record_file.read_text())
    for damage in ({"adapters": [{"ref": 5, "sha256": record["adapters"][0]["sha256"]}]},
                   {"restore": dict(record["restore"], sha256="../../../../etc/passwd")}):
        record_file.write_text(json.dumps({**record, **damage}))
        before = snapshot(registry.root)
        code, _, err = cli("unfuse", tmp_path / "fused", "--out", tmp_path / "back")
        assert code == 1 and "does not match schema 'fused_model'" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "back").exists() and snapshot(registry.root) == before


def test_a_refused_fuse_does_not_register_its_base(cli, registry, tmp_path):
    # The adapter is imported against one model, then fused into another of the same shapes, never
    # registered: the update overflows float16, and the refusal must leave that base unregistered.
    model, adapter = _float16_model_with_overflowing_adapter(tmp_path)
    other = write_model(tmp_path / "other", dtype="float16", seed=8)
    assert cli("import", adapter, "--name", "huge", "--base", model)[0] == 0
    bases, before = [b["sha256"] for b in registry.bases()], snapshot(registry.root)
    code, _, err = cli("fuse", "huge", "--base", other, "--out", tmp_path / "fused", "--allow-different-weights")
    assert code == 1 and "non-finite" in err, err
    assert [b["sha256"] for b in registry.bases()] == bases and snapshot(registry.root) == before
    # A fuse that succeeds registers it, with the fused model.
    adapter_ok = write_adapter(model, tmp_path / "fine", seed=4)
    assert cli("import", adapter_ok, "--name", "fine", "--base", model)[0] == 0
    code, out, err = cli("--json", "fuse", "fine", "--base", other, "--out", tmp_path / "fused", "--allow-different-weights")
    assert code == 0, err
    record = json.loads(out)
    assert record["base"]["sha256"] in [b["sha256"] for b in registry.bases()] and len(registry.bases()) == len(bases) + 1


PROFILE_KEYS = {"wall", "reading", "computing", "restore", "copying", "writing", "hashing", "waiting"}


def test_fuse_reports_a_profile(cli, tmp_path, tiny_model, lora_adapter, monkeypatch):
    cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)
    monkeypatch.setenv("ADAPTERHUB_PROFILE", "1")
    code, out, err = cli("--json", "fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused")
    assert code == 0, err
    profile = json.loads(out)["profile"]
    assert set(profile) == PROFILE_KEYS
    assert all(v >= 0 for v in profile.values()) and profile["computing"] > 0 and profile["hashing"] > 0
    assert "profile  wall" in err
    # Kept out of the record stored with the model.
    assert "profile" not in json.loads((tmp_path / "fused" / "adapterhub.json").read_text())


def test_profile_flag_on_fuse_and_unfuse(cli, tmp_path, tiny_model, lora_adapter, monkeypatch):
    monkeypatch.delenv("ADAPTERHUB_PROFILE", raising=False)
    cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)
    # --quiet silences progress and notes, not what was asked for (bench/fuse.py runs fuse so).
    code, out, err = cli("--quiet", "fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused", "--profile")
    assert code == 0, err
    assert err.count("profile  wall") == 1 and "computing" in err and "profile  wall" not in out
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back", "--profile")
    assert code == 0, err
    report = json.loads(out)
    assert report["exact"] is True and set(report["profile"]) == PROFILE_KEYS and "profile  wall" in err
    assert report["profile"]["writing"] > 0


def test_without_profile_nothing_is_timed_or_printed(cli, tmp_path, tiny_model, lora_adapter, monkeypatch):
    monkeypatch.delenv("ADAPTERHUB_PROFILE", raising=False)
    cli("import", lora_adapter, "--name", "stories", "--base", tiny_model)
    code, out, err = cli("--json", "fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused")
    assert code == 0 and "profile" not in err
    record = json.loads(out)
    assert "profile" not in record and record["seconds"] > 0
    code, out, err = cli("--json", "unfuse", tmp_path / "fused", "--out", tmp_path / "back")
    assert code == 0 and "profile" not in json.loads(out) and "profile" not in err
    # ADAPTERHUB_PROFILE=0 is off, as an unset variable is.
    monkeypatch.setenv("ADAPTERHUB_PROFILE", "0")
    code, out, err = cli("--json", "fuse", "stories", "--base", tiny_model, "--out", tmp_path / "again")
    assert code == 0 and "profile" not in json.loads(out) and "profile" not in err


def test_fuse_names_the_base_it_registered(cli, tmp_path):
    # An unregistered base whose folder name another base holds: the plan can only guess its name,
    # the fuse registers it under a free one, and the message names that one.
    model = write_model(tmp_path / "model", seed=3)
    other = write_model(tmp_path / "other", seed=8)
    assert cli("base", "add", write_model(tmp_path / "third", seed=9), "--name", "other")[0] == 0
    assert cli("import", write_adapter(model, tmp_path / "adapter", seed=4), "--name", "tuned", "--base", model)[0] == 0
    code, out, err = cli("fuse", "tuned", "--base", other, "--out", tmp_path / "fused", "--allow-different-weights")
    assert code == 0, err
    assert out.startswith(f"fused tuned@1 into other-2 -> {tmp_path / 'fused'}"), out


def test_fuse_writes_the_card_it_is_handed(registry, tmp_path, tiny_model, lora_adapter):
    from adapterhub.algebra.fuse import execute_fuse, plan_fuse
    from adapterhub.card import fused_card

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    plain = execute_fuse(plan_fuse(registry, ["stories"], str(tiny_model), tmp_path / "plain"), registry)
    assert not (tmp_path / "plain" / "README.md").exists()
    seen = []
    record = execute_fuse(plan_fuse(registry, ["stories"], str(tiny_model), tmp_path / "carded"), registry,
                          card=lambda *args: seen.append(args) or fused_card(*args))
    (written_registry, written_record, folder), = seen
    assert written_registry is registry and folder == tmp_path / "carded"
    assert written_record["sha256"] == record["sha256"] == plain["sha256"]
    assert (tmp_path / "carded" / "README.md").read_text() == fused_card(registry, written_record, folder)


def test_algebra_imports_no_presentation():
    import ast

    from adapterhub import algebra

    for path in sorted(Path(algebra.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not {"card", "lineage"} & {part for n in names for part in n.split(".")}, path.name


@pytest.mark.parametrize("shape", [(3072, 3072), (1024, 3072), (96, 64), (7, 5)])
@pytest.mark.parametrize("scale", [20.0, 0.37, -3.0])
def test_the_cpu_delta_is_mlx_lm_s_expression_bit_for_bit(shape, scale):
    from adapterhub.algebra.fusion import Update

    out_dim, in_dim = shape
    key = mx.random.key(out_dim * 7 + in_dim)
    lora_a = mx.random.normal((in_dim, 16), key=key) / in_dim ** 0.5
    lora_b = mx.random.normal((16, out_dim), key=mx.random.split(key)[0]) * 0.01
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        ours = Update("a", "lora", scale, lora_a, lora_b).delta(dtype)
        upstream = ((scale * lora_b.T) @ lora_a.T).astype(dtype)  # mlx_lm's LoRALinear.fuse
        assert mx.array_equal(ours.view(mx.uint8), upstream.view(mx.uint8)).item(), (shape, scale, dtype)


def _writer_parts(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    source = tmp_path / "source.bin"
    source.write_bytes(rng.bytes(3_000_000))
    puts = [rng.bytes(n) for n in (1000, 0, 2_500_000)]
    parts = [("copy", 10, 70_000), ("put", 1000), ("copy", 80_000, 1_900_000), ("put", 0), ("put", 2_500_000),
             ("copy", 2_999_000, 1000)]
    data = source.read_bytes()
    expected = b"HEADER" + data[10:70_010] + puts[0] + data[80_000:1_980_000] + puts[2] + data[2_999_000:]
    return source, parts, puts, expected


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_shard_writer_writes_and_hashes_the_planned_file(tmp_path, monkeypatch, kernel_copy):
    import hashlib
    import os

    from adapterhub import tensor_writers

    if not kernel_copy:  # as where os.copy_file_range is missing (macOS): large reads and writes instead
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(tensor_writers, "COPY_BLOCK", 64 << 10)  # many blocks, so block edges are crossed
    source, parts, puts, expected = _writer_parts(tmp_path)
    seen = []
    writer = tensor_writers.ShardWriter(tmp_path / "out.bin", b"HEADER", parts, source,
                                        tensor_writers.ByteBudget(1 << 20), progress=seen.append)
    for data in puts:
        writer.put(data)
    assert writer.close() == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert (tmp_path / "out.bin").read_bytes() == expected and sum(seen) == len(expected)


def test_shard_writer_refuses_short_handovers_and_aborts_cleanly(tmp_path):
    from adapterhub.tensor_writers import ShardWriter

    source, parts, puts, _ = _writer_parts(tmp_path)
    writer = ShardWriter(tmp_path / "out.bin", b"HEADER", parts, source)
    writer.put(puts[0])
    with pytest.raises(Exception, match="closed before every part"):
        writer.close()
    writer = ShardWriter(tmp_path / "wrong.bin", b"HEADER", parts, source)
    writer.put(b"x" * 999)
    with pytest.raises(ValueError, match="999 bytes where 1000 were planned"):
        writer.close()
    writer = ShardWriter(tmp_path / "aborted.bin", b"HEADER", parts, source)
    writer.put(puts[0])
    writer.abort()
    assert not (tmp_path / "aborted.bin").exists()


def test_shard_writer_refuses_a_truncated_source(tmp_path):
    from adapterhub.errors import InvalidAdapterError
    from adapterhub.tensor_writers import ShardWriter

    source, parts, puts, _ = _writer_parts(tmp_path)
    source.write_bytes(source.read_bytes()[:2_000_000])
    writer = ShardWriter(tmp_path / "out.bin", b"HEADER", parts, source)
    with pytest.raises(InvalidAdapterError, match="ended early"):
        for data in puts:
            writer.put(data)
        writer.close()
    writer.abort()


def test_byte_budget_bounds_what_is_in_flight():
    import threading
    import time

    from adapterhub.tensor_writers import ByteBudget

    budget = ByteBudget(100)
    budget.acquire(500)  # larger than the budget: it passes alone, so it is never stuck...
    got = threading.Event()
    threading.Thread(target=lambda: (budget.acquire(10), got.set()), daemon=True).start()
    time.sleep(0.05)
    assert not got.is_set()  # ...and it holds the others back until it is written
    budget.release(500)
    assert got.wait(1)


def test_a_profile_nobody_asked_for_keeps_only_the_wall_time():
    from adapterhub.tensor_writers import Profile, format_profile

    quiet = Profile(activities=False)
    with quiet.timing("writing"):
        quiet.add("hashing", 1.0)
    assert set(quiet.to_dict()) == {"wall"}
    timed = Profile()
    timed.add("hashing", 1.25)
    assert timed.to_dict()["hashing"] == 1.25 and "hashing 1.25" in format_profile(timed.to_dict())


def test_extract_refuses_a_bad_name_before_reading_the_models(cli, registry, tmp_path, tiny_model, lora_adapter, monkeypatch):
    from adapterhub.algebra import extract

    registry.import_adapter(lora_adapter, "stories", base=tiny_model)
    assert cli("fuse", "stories", "--base", tiny_model, "--out", tmp_path / "fused")[0] == 0
    monkeypatch.setattr(extract, "_identical", lambda *a: pytest.fail("compared the models before checking the name"))
    code, _, err = cli("extract", "--base", tiny_model, "--fused", tmp_path / "fused", "--rank", "4", "--name", "x")
    assert code == 1 and "invalid name 'x'" in err
