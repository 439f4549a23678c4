"""stack and extract on real tiny models and adapters, checked against hand-applied updates."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from adapterhub.tinymodel import write_adapter
from tests.precision import tolerance
from tests.conftest import assert_refused, snapshot

TOKENS = mx.array([[1, 5, 9, 12, 7, 3, 8]])


def logits_with_updates(model_dir, adapters):
    """The base model with each adapter's update added to its weights by hand, in float32."""
    from mlx_lm import load

    model, _ = load(str(model_dir))
    params = dict(tree_flatten(model.parameters()))
    for folder, weight in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config["lora_parameters"]["scale"]
        tensors = mx.load(str(folder / "adapters.safetensors"))
        for key in (k for k in tensors if k.endswith(".lora_a")):
            module = key[: -len(".lora_a")]
            params[module + ".weight"] = params[module + ".weight"] + weight * scale * (tensors[module + ".lora_b"].T @ tensors[key].T)
    model.load_weights(list(params.items()))
    return model(TOKENS)


def logits_with_adapter(model_dir, adapter_dir):
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter_dir))
    return model(TOKENS)


@pytest.fixture
def two_adapters(registry, tmp_path, tiny_model):
    a = write_adapter(tiny_model, tmp_path / "a", rank=4, seed=1)
    b = write_adapter(tiny_model, tmp_path / "b", rank=8, scale=5.0, seed=2, keys=["self_attn.q_proj", "self_attn.v_proj"],
                      num_layers=3)
    registry.import_adapter(a, "alpha", base=tiny_model)
    registry.import_adapter(b, "beta", base=tiny_model)
    return a, b


def test_cat_is_exact_weighted_sum(cli, registry, tmp_path, tiny_model, two_adapters):
    a, b = two_adapters
    code, out, err = cli("--json", "stack", "alpha", "beta", "--name", "both", "--weights", "0.5,2")
    assert code == 0, err
    stacked = json.loads(out)
    assert stacked["rank"] == 12 and stacked["scale"] == 1.0
    assert [(p["ref"], p["relation"], p["weight"]) for p in stacked["parents"]] == [("alpha@1", "stacked-from", 0.5), ("beta@1", "stacked-from", 2.0)]
    assert cli("export", "both", tmp_path / "both")[0] == 0
    expected = logits_with_updates(tiny_model, [(a, 0.5), (b, 2.0)])
    assert mx.allclose(logits_with_adapter(tiny_model, tmp_path / "both"), expected, atol=tolerance(1e-4)).item()
    assert not mx.allclose(logits_with_adapter(tiny_model, a), expected, atol=tolerance(1e-4)).item()


def test_svd_to_full_rank_is_exact_and_lower_rank_reports_energy(cli, registry, tmp_path, tiny_model, two_adapters):
    a, b = two_adapters
    code, out, _ = cli("--json", "stack", "alpha", "beta", "--name", "full-svd", "--method", "svd", "--rank", "12")
    report = json.loads(out)["report"]
    assert code == 0 and min(report["per_module"].values()) > 1 - 1e-9
    cli("export", "full-svd", tmp_path / "full")
    expected = logits_with_updates(tiny_model, [(a, 1.0), (b, 1.0)])
    assert mx.allclose(logits_with_adapter(tiny_model, tmp_path / "full"), expected, atol=tolerance(1e-4)).item()
    code, out, _ = cli("--json", "stack", "alpha", "beta", "--name", "small-svd", "--method", "svd", "--rank", "2")
    small = json.loads(out)
    kept = small["report"]["per_module"]
    assert small["rank"] == 2 and all(0 < v < 1 for v in kept.values())


def test_linear_needs_equal_ranks_and_says_it_approximates(cli, registry, tmp_path, tiny_model, two_adapters):
    code, _, err = cli("stack", "alpha", "beta", "--name", "mixed", "--method", "linear")
    assert code == 1 and "linear stacking needs equal ranks, got [4, 8]" in err
    c = write_adapter(tiny_model, tmp_path / "c", rank=4, seed=3)
    registry.import_adapter(c, "gamma", base=tiny_model)
    code, out, err = cli("stack", "alpha", "gamma", "--name", "mixed", "--method", "linear")
    assert code == 0 and "an approximation" in out and "relative error per module" in out


def test_stack_refusals_write_nothing(cli, registry, tmp_path, tiny_model, tiny_model_4bit, lora_adapter, lora_adapter_b,
                                      dora_adapter):
    registry.import_adapter(lora_adapter, "root-run", base=tiny_model)
    registry.import_adapter(lora_adapter_b, "next-run", base=tiny_model, parent="root-run@1")
    registry.import_adapter(dora_adapter, "dora-run", base=tiny_model)
    q = write_adapter(tiny_model_4bit, tmp_path / "q", seed=1)
    registry.import_adapter(q, "quant-run", base=tiny_model_4bit)
    before = snapshot(registry.root)
    cases = [
        (["root-run", "next-run"], "root-run@1 is an ancestor of next-run@1"),
        (["root-run", "quant-run"], "must share one recorded base"),
        (["root-run", "dora-run"], "dora-run@1 is a DoRA adapter"),
        (["root-run"], "at least two adapters"),
        (["root-run", "quant-run", "--weights", "1"], "1 weights for 2 adapters"),
    ]
    for args, message in cases:
        code, _, err = cli("stack", *args, "--name", "never")
        assert code == 1 and message in err, (args, err)
    code, _, err = cli("stack", "root-run", "dora-run", "--name", "never", "--weights", "1,x")
    assert code == 2
    assert snapshot(registry.root) == before


def test_extract_recovers_the_fused_adapter(cli, registry, tmp_path, tiny_model):
    adapter = write_adapter(tiny_model, tmp_path / "a", rank=4, seed=11)
    registry.import_adapter(adapter, "original", base=tiny_model)
    assert cli("fuse", "original", "--base", tiny_model, "--out", tmp_path / "fused")[0] == 0
    code, out, err = cli("--json", "extract", "--base", tiny_model, "--fused", tmp_path / "fused", "--rank", "4", "--name", "recovered")
    assert code == 0, err
    extracted = json.loads(out)
    assert extracted["rank"] == 4 and max(extracted["report"]["relative_error"].values()) < tolerance(1e-5)
    assert extracted["parents"][0]["relation"] == "extracted-from"
    cli("export", "recovered", tmp_path / "recovered")
    assert mx.allclose(logits_with_adapter(tiny_model, tmp_path / "recovered"),
                       logits_with_adapter(tiny_model, adapter), atol=tolerance(1e-4)).item()
    code, out, _ = cli("--json", "extract", "--base", tiny_model, "--fused", tmp_path / "fused", "--rank", "1", "--name", "lossy")
    errors = json.loads(out)["report"]["relative_error"].values()
    assert code == 0 and all(e > 1e-3 for e in errors)
    assert registry.verify().ok


def test_extract_refuses_an_identical_model(cli, tiny_model):
    code, _, err = cli("extract", "--base", tiny_model, "--fused", tiny_model, "--rank", "4", "--name", "nothing")
    assert code == 1 and "identical to the base" in err


def test_stack_refuses_an_adapter_given_twice_as_fuse_does(cli, registry, tmp_path, tiny_model, two_adapters):
    registry.import_adapter(two_adapters[0], "alpha-again", base=tiny_model)  # the same weights under a second name
    beta_sha = registry.resolve("beta").sha256
    before = snapshot(registry.root)
    for refs in (["alpha", "alpha"], ["alpha", "alpha@1"], ["beta", beta_sha[:16]], ["alpha", "beta", "alpha-again"]):
        for command in (["stack", *refs, "--name", "never"], ["fuse", *refs, "--base", tiny_model, "--out", tmp_path / "no"]):
            assert_refused(cli(*command), "the same adapter is listed twice", before, registry)
    assert not (tmp_path / "no").exists()
    from adapterhub.algebra.stack import stack
    from adapterhub.errors import ConflictError

    with pytest.raises(ConflictError) as refused:
        stack(registry, ["beta", "beta"], "never")
    assert refused.value.hint == "list each adapter once"


def assert_cli_refuses(result, before, registry):
    """Refused by the option's declared range before the command runs: a usage error, nothing written."""
    code, out, err = result
    assert code == 2 and "Invalid value for" in err and "Traceback" not in err, (code, out, err)
    assert snapshot(registry.root) == before


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "svd", "rank": -3}, "--rank must be at least 1 (got -3)"),
    ({"method": "svd", "rank": 0}, "--rank must be at least 1 (got 0)"),
    ({"method": "cat", "rank": -1}, "--rank must be at least 1 (got -1)"),
    ({"method": "svd", "rank": 2.5}, "--rank must be a whole number, got 2.5"),
    ({"weights": [float("nan"), 1.0]}, "--weights must be a finite number, got nan"),
    ({"weights": [1.0, float("-inf")]}, "--weights must be a finite number, got -inf"),
])
def test_stack_refuses_out_of_range_numbers(cli, registry, two_adapters, kwargs, message):
    from adapterhub.algebra.stack import stack
    from adapterhub.errors import AdapterHubError

    before = snapshot(registry.root)
    with pytest.raises(AdapterHubError) as refused:
        stack(registry, ["alpha", "beta"], "never", **kwargs)
    assert refused.value.message == message and refused.value.hint
    flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in kwargs.items()]
    assert_cli_refuses(cli("stack", "alpha", "beta", "--name", "never", *flags), before, registry)
    assert snapshot(registry.root) == before


def test_extract_and_generate_refuse_out_of_range_numbers(cli, registry, tmp_path, tiny_model, two_adapters):
    from adapterhub.algebra.extract import extract
    from adapterhub.errors import AdapterHubError
    from adapterhub.generation import generate

    before = snapshot(registry.root)
    for value in (0, -2, 2.5):
        with pytest.raises(AdapterHubError, match=rf"--rank must be (at least 1 \(got {value}\)|a whole number, got {value})") as refused:
            extract(registry, str(tiny_model), tmp_path, value, "never")
        assert refused.value.hint
        with pytest.raises(AdapterHubError, match=rf"--max-tokens must be (at least 1 \(got {value}\)|a whole number, got {value})") as refused:
            generate(registry, "alpha", None, "the cat", max_tokens=value)
        assert refused.value.hint
    for value in ("0", "-2"):
        assert_cli_refuses(cli("extract", "--base", tiny_model, "--fused", tiny_model, "--rank", value, "--name", "never"),
                           before, registry)
        assert_cli_refuses(cli("generate", "alpha", "--prompt", "the cat", "--max-tokens", value), before, registry)
