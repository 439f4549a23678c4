"""Fixtures: real tiny models (llama, and every architecture of the matrix), real datasets, real adapters trained by mlx_lm."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from adapterhub.registry import Registry
from adapterhub.tinymodel import ARCHITECTURES, write_dataset, write_model, write_quantized
from adapterhub.demo import train_with_mlx_lm


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # The hash cache lives in the user's cache folder; tests must never touch the real one.
    os.environ["ADAPTERHUB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("ADAPTERHUB_REGISTRY", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_model_other_weights(tmp_path_factory) -> Path:
    """Same structure as tiny_model, different random weights."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny-llama-b", seed=1)


@pytest.fixture(scope="session")
def tiny_model_4bit(tmp_path_factory, tiny_model) -> Path:
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("models") / "tiny-llama-4bit"
    convert(str(tiny_model), str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


# The quantized rows of the architecture matrix: (bits, group size), as `mlx_lm convert -q` writes them.
QUANTIZED_VARIANTS = {"4bit-g32": (4, 32), "8bit-g64": (8, 64)}
VARIANTS = ("float", *QUANTIZED_VARIANTS)


@pytest.fixture(scope="session")
def arch_model(tmp_path_factory):
    """`arch_model(arch, variant)`: a tiny model of that architecture built with mlx_lm's own classes, as a folder.

    variant is "float", "4bit-g32" or "8bit-g64" (the float model quantized as mlx_lm does). Each is
    built on first use and shared by the whole session.
    """
    root = tmp_path_factory.mktemp("arch-models")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, variant: str = "float") -> Path:
        if arch not in ARCHITECTURES or variant not in VARIANTS:
            raise ValueError(f"no {arch} {variant} model in the matrix")
        if (arch, variant) not in built:
            if variant == "float":
                built[arch, variant] = write_model(root / arch, arch=arch, seed=0)
            else:
                bits, group_size = QUANTIZED_VARIANTS[variant]
                built[arch, variant] = write_quantized(get(arch), root / f"{arch}-{variant}", bits, group_size)
        return built[arch, variant]
    return get


@pytest.fixture(scope="session")
def arch_models(arch_model) -> dict[tuple[str, str], Path]:
    """Every row of the matrix: (arch, variant) -> model folder."""
    return {(arch, variant): arch_model(arch, variant) for arch in ARCHITECTURES for variant in VARIANTS}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "stories", seed=1)


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory, tiny_model, tiny_data) -> Path:
    return train_with_mlx_lm(tiny_model, tiny_data, tmp_path_factory.mktemp("adapters") / "lora", iters=6, seed=0)


@pytest.fixture(scope="session")
def lora_adapter_b(tmp_path_factory, tiny_model, tiny_data) -> Path:
    return train_with_mlx_lm(tiny_model, tiny_data, tmp_path_factory.mktemp("adapters") / "lora-b", iters=4, seed=7)


@pytest.fixture(scope="session")
def dora_adapter(tmp_path_factory, tiny_model, tiny_data) -> Path:
    return train_with_mlx_lm(tiny_model, tiny_data, tmp_path_factory.mktemp("adapters") / "dora", iters=4,
                             extra=("--fine-tune-type", "dora"))


@pytest.fixture
def adapter_copy(tmp_path, lora_adapter):
    """A private copy of the LoRA folder that a test may damage."""
    def make(name: str = "copy") -> Path:
        dest = tmp_path / name
        shutil.copytree(lora_adapter, dest)
        return dest
    return make


@pytest.fixture
def registry_path(tmp_path) -> Path:
    path = tmp_path / "registry"
    Registry(path).init()
    return path


@pytest.fixture
def registry(registry_path) -> Registry:
    return Registry(registry_path)


@pytest.fixture
def populated(registry, lora_adapter, tiny_model):
    """A registry holding one version, `existing@1`, for refusals to leave untouched."""
    registry.import_adapter(lora_adapter, "existing", base=tiny_model)
    return registry


@pytest.fixture
def cli(registry_path, capsys, monkeypatch):
    """Run the real `adapterhub` entry point in-process; returns (exit code, stdout, stderr)."""
    from adapterhub.cli import main

    def run(*args: str, registry: Path | None = None):
        monkeypatch.setattr(sys, "argv", ["adapterhub", "--registry", str(registry or registry_path), *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to prove a refused command changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(result, message, before, registry):
    """The contract for bad input: exit 1, one `error:` line naming `message`, and not one byte changed."""
    code, out, err = result
    assert code == 1, (out, err)
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(registry.root) == before


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))


@pytest.fixture(scope="session")
def all_layers_adapter(tmp_path_factory, tiny_model) -> Path:
    """An untrained adapter on all 4 layers, built with mlx_lm's own LoRA layers and saved as mlx_lm saves it."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(tiny_model))
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 4, params)
    out = tmp_path_factory.mktemp("adapters") / "all-layers"
    out.mkdir(exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": params}))
    return out
