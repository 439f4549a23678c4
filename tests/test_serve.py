"""`adapterhub serve`: the real server in a subprocess on a free loopback port, spoken to with the official
`openai` client (and raw HTTP for what a client library would never send).

One server for the module: two bases of two architectures (llama, qwen2), adapters trained by mlx_lm
(LoRA, DoRA), by our trainer (LoReFT) and imported, an alias, a chained version, an adapter of a base
that is not served, `--max-adapters 2` (so three llama adapters evict), and an API key. The last test
stops it with SIGINT while a stream is in flight.
"""

from __future__ import annotations

import http.client
import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from adapterhub.registry import Registry
from adapterhub.serving.adapters import cache_key
from adapterhub.tinymodel import write_adapter, write_dataset
from tests.conftest import subprocess_env

KEY = "test-key-1234"
START_TIMEOUT = 90
CHAT_PROMPT = "what colour is the sky ?"
TEXT_PROMPT = "the cat sees"


# ---- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_registry(tmp_path_factory, tiny_model, tiny_model_other_weights, arch_model, lora_adapter, lora_adapter_b,
                   dora_adapter) -> Path:
    root = tmp_path_factory.mktemp("serve")
    registry = Registry(root / "registry")
    registry.init()
    qwen = arch_model("qwen2")
    registry.add_base(tiny_model, name="tiny-llama")
    registry.add_base(qwen, name="tiny-qwen2")
    registry.add_base(tiny_model_other_weights, name="tiny-llama-b")  # registered, not served
    registry.import_adapter(lora_adapter, "sql-lora", base=tiny_model)
    registry.import_adapter(lora_adapter_b, "sql-lora", base=tiny_model)
    registry.alias("sql-lora@1", "prod")
    registry.import_adapter(dora_adapter, "chat-dora", base=tiny_model)
    registry.import_adapter(write_adapter(tiny_model, root / "extra", seed=3), "extra-lora", base=tiny_model)
    registry.import_adapter(write_adapter(tiny_model, root / "child", seed=4), "sql-child", base=tiny_model,
                            parent="sql-lora@1")
    registry.import_adapter(write_adapter(qwen, root / "qwen", seed=5), "qwen-lora", base=qwen)
    registry.import_adapter(write_adapter(tiny_model, root / "doomed", seed=7), "doomed-lora", base=tiny_model)
    registry.import_adapter(write_adapter(tiny_model_other_weights, root / "other", seed=6), "other-lora",
                            base=tiny_model_other_weights)
    colours = write_dataset(root / "colours", seed=3, style="colours", sizes=(16, 4, 4))
    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry.root), "--quiet", "train",
                           "--kind", "loreft", "--base", "tiny-llama", "--data", str(colours), "--name", "qa-reft",
                           "--layers", "2;3", "--rank", "4", "--iters", "4", "--val-batches", "1", "--steps-per-eval", "4",
                           "--save-every", "4"], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    return registry.root


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])

    def client(self, key: str | None = KEY, **options):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60, **options)

    def health(self) -> dict:
        return self.get("/health", {"Authorization": f"Bearer {KEY}"})[1]

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        return self.request("GET", path, None, headers)

    def request(self, method: str, path: str, body: bytes | None, headers: dict | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def access_log(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def server(serve_registry, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "stderr.log"
    env = dict(subprocess_env(), SERVE_TEST_KEY=KEY)
    command = [sys.executable, "-m", "adapterhub.cli", "--registry", str(serve_registry), "--json", "serve",
               "--port", "0", "--base", "tiny-llama", "--base", "tiny-qwen2", "--max-adapters", "2",
               "--api-key-env", "SERVE_TEST_KEY"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        pytest.fail(f"the server did not start: {log.read_text()}")
    yield Server(process, json.loads(line)["url"], log)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def chat(server, model: str, prompt: str = CHAT_PROMPT, **options):
    options = {"temperature": 0, "max_tokens": 8, **options}
    return server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **options)


def complete(server, model: str, prompt: str = TEXT_PROMPT, **options):
    options = {"temperature": 0, "max_tokens": 8, **options}
    return server.client().completions.create(model=model, prompt=prompt, **options)


def error_of(call) -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body["message"]


# ---- answers -----------------------------------------------------------------------------------------------


def test_models_lists_each_base_and_every_ref_that_runs_on_it(server):
    listed = {m.id: m for m in server.client().models.list().data}
    for ref in ("sql-lora", "sql-lora@1", "sql-lora@2", "sql-lora@prod", "chat-dora", "qa-reft@1", "extra-lora"):
        assert listed[ref].parent == "tiny-llama", ref
    assert listed["qwen-lora"].parent == "tiny-qwen2"
    assert listed["tiny-llama"].parent is None and listed["tiny-qwen2"].parent is None
    assert "other-lora" not in listed and "tiny-llama-b" not in listed  # its base is not served


@pytest.mark.parametrize("ref", ["sql-lora@1", "chat-dora", "qa-reft", "qwen-lora"])
def test_greedy_answers_are_generate_s_token_for_token(server, serve_registry, ref):
    """Chat is `generate REF` (the prompt in the chat template); a completion is the prompt as given."""
    from adapterhub.generation import generate

    registry = Registry(serve_registry)
    as_chat, as_text = chat(server, ref, max_tokens=10), complete(server, ref, max_tokens=10)
    want_chat = generate(registry, ref, None, CHAT_PROMPT, max_tokens=10)["text"]
    want_text = generate(registry, ref, None, TEXT_PROMPT, max_tokens=10, use_chat_template=False)["text"]
    if ref == "qa-reft":
        # loreft.generate decodes with tokenizer.decode, which keeps the first token's leading space that mlx-lm's
        # streaming detokenizer (generate's other path, and this server's) drops; the tokens are the same.
        want_chat, want_text = want_chat.lstrip(), want_text.lstrip()
    assert as_chat.choices[0].message.content == want_chat
    assert as_text.choices[0].text == want_text
    assert as_chat.model == registry.resolve(ref).ref and as_chat.usage.completion_tokens <= 10


def test_streams_carry_the_same_text_in_pieces_then_the_usage(server):
    whole = complete(server, "sql-lora@2", max_tokens=12)
    chunks = list(server.client().completions.create(model="sql-lora@2", prompt=TEXT_PROMPT, temperature=0,
                                                     max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    said = chat(server, "chat-dora", max_tokens=12).choices[0].message.content
    pieces = list(server.client().chat.completions.create(model="chat-dora", temperature=0, max_tokens=12, stream=True,
                                                          messages=[{"role": "user", "content": CHAT_PROMPT}]))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == said


def test_stop_strings_end_the_text_before_them_in_streams_too(server):
    text = complete(server, "sql-lora@1", max_tokens=12).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    expected = text[:text.index(stop)]
    stopped = complete(server, "sql-lora@1", max_tokens=12, stop=[stop])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (expected, "stop")
    streamed = server.client().completions.create(model="sql-lora@1", prompt=TEXT_PROMPT, temperature=0, max_tokens=12,
                                                  stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_a_seed_makes_sampling_repeatable(server):
    first, again = (complete(server, "extra-lora", temperature=1.0, top_p=0.9, seed=7, max_tokens=12) for _ in range(2))
    assert first.choices[0].text == again.choices[0].text


def test_concurrent_requests_for_different_adapters_see_only_their_own(server):
    """Greedy answers of requests prefilled and decoded together (mixed batches, and some waiting for an adapter
    slot) are the answers each gets alone."""
    longer = "the teacher finds a puzzle and the robot reads the map"  # prompts of other lengths: padded prefill
    asks = [("sql-lora@1", TEXT_PROMPT), ("chat-dora", longer), ("extra-lora", TEXT_PROMPT), ("tiny-llama", longer),
            ("qa-reft", TEXT_PROMPT), ("qwen-lora", longer), ("sql-lora@1", "a dog"), ("tiny-qwen2", TEXT_PROMPT)]
    alone = [complete(server, model, prompt, max_tokens=12).choices[0].text for model, prompt in asks]
    together: list = [None] * len(asks)

    def ask(i: int) -> None:
        together[i] = complete(server, asks[i][0], asks[i][1], max_tokens=12).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_the_base_is_never_changed_by_the_adapters_it_served(server, tiny_model):
    from mlx_lm import generate, load

    model, tokenizer = load(str(tiny_model))
    assert complete(server, "tiny-llama", max_tokens=10).choices[0].text == \
        generate(model, tokenizer, prompt=TEXT_PROMPT, max_tokens=10)


@pytest.mark.parametrize("variant", ["float", "4bit-g32"])
def test_a_mixed_batch_computes_each_row_with_its_own_adapter(arch_model, tmp_path, variant):
    """The router alone: rows of one forward read the base, a LoRA, a DoRA and a LoRA of another rank; each row
    is what that adapter computes alone, and alone it is exactly what mlx_lm.load(adapter_path=...) computes."""
    import mlx.core as mx
    from mlx_lm import load

    from adapterhub.serving.adapters import load_adapter
    from adapterhub.serving.layers import AdapterRouter

    model_dir = arch_model("llama", variant)
    registry = Registry(tmp_path / "registry")
    registry.init()
    folders = [write_adapter(model_dir, tmp_path / f"a{i}", rank=rank, kind=kind, seed=i)
               for i, (rank, kind) in enumerate([(4, "lora"), (8, "dora"), (2, "lora")])]
    versions = [registry.import_adapter(f, f"ad-{i}", base=model_dir)[0] for i, f in enumerate(folders)]
    model, _ = load(str(model_dir))
    router = AdapterRouter(model, len(versions) + 1)
    for slot, version in enumerate(versions, 1):
        assert load_adapter(registry, version, router, slot).mixable
    tokens = mx.array([[1, 20, 35, 50, 77]] * 4)
    router.use_rows([0, 1, 2, 3], dora=True)
    mixed = model(tokens)
    for slot in range(4):
        router.use(slot)
        alone = model(tokens[:1])
        assert mx.allclose(mixed[slot], alone[0], atol=1e-3, rtol=1e-3), (variant, slot)
        if slot:
            reference, _ = load(str(model_dir), adapter_path=str(folders[slot - 1]))
            assert mx.array_equal(alone, reference(tokens[:1])), (variant, slot)


def test_expert_adapters_decode_in_batches_of_their_own(arch_model, tmp_path):
    """A mixtral adapter updates expert layers, which the mixed path does not gather: its rows never share a
    forward with rows reading something else, and every answer is the one it gets alone."""
    from adapterhub.serving.protocol import Sampling
    from adapterhub.serving.jobs import Done, Failed, Job, Target
    from adapterhub.serving.runner import Engine

    model_dir = arch_model("mixtral")
    registry = Registry(tmp_path / "registry")
    registry.init()
    registry.add_base(model_dir, name="tiny-mixtral")
    experts = registry.import_adapter(write_adapter(model_dir, tmp_path / "experts", scale=1000.0, seed=1), "experts",
                                      base=model_dir)[0]
    engine = Engine(registry, {"tiny-mixtral": model_dir}, max_adapters=2)
    engine.load()

    def answers(asks: list) -> list[str]:
        done: dict[int, object] = {}
        for i, (target, tokens) in enumerate(asks):
            engine.submit(Job(target, tokens, 8, Sampling(0.0), (), stream=False,
                              emit=lambda e, i=i: isinstance(e, (Done, Failed)) and done.__setitem__(i, e)))
        engine.run(lambda: len(done) < len(asks))
        assert not [e for e in done.values() if isinstance(e, Failed)], done
        return [done[i].text for i in range(len(asks))]

    asks = [(Target("tiny-mixtral", experts if i % 2 == 0 else None), [1, 20 + i // 2, 35, 50]) for i in range(4)]
    alone = [answers([ask])[0] for ask in asks]
    assert answers(asks) == alone and alone[0] != alone[1]  # the same prompt: the adapter changes the answer
    assert not engine._bases["tiny-mixtral"].adapters._resident[cache_key(experts)].mixable


def test_requests_arriving_together_are_prefilled_together_and_answer_as_alone(serve_registry, monkeypatch):
    """In the runner itself: prompts of different lengths for a LoRA, a DoRA, the base and a LoReFT adapter, all
    submitted at once, share right-padded prefill forwards and mixed decoding steps; each answer is its answer alone."""
    from adapterhub.serving.protocol import Sampling
    from adapterhub.serving.jobs import Done, Failed, Job, Target
    from adapterhub.serving.runner import Engine

    registry = Registry(serve_registry)
    engine = Engine(registry, {"tiny-llama": Path(registry.base("tiny-llama")["path"])}, max_adapters=4)
    engine.load()
    together = []
    prefill = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, base, rows: together.append(len(rows)) or prefill(self, base, rows))

    def answers(asks: list) -> list[str]:
        done: dict[int, object] = {}
        for i, (ref, tokens) in enumerate(asks):
            engine.submit(Job(Target("tiny-llama", registry.resolve(ref) if ref else None), tokens, 10, Sampling(0.0), (),
                              stream=False, emit=lambda e, i=i: isinstance(e, (Done, Failed)) and done.__setitem__(i, e)))
        engine.run(lambda: len(done) < len(asks))
        assert not [e for e in done.values() if isinstance(e, Failed)], done
        return [done[i].text for i in range(len(asks))]

    asks = [("sql-lora@1", [1, 20, 35]), ("chat-dora", [1, 50, 77, 101, 150, 20, 35]), (None, [1, 44]),
            ("qa-reft", [1, 20, 35, 50]), ("sql-lora@2", [7])]
    alone = [answers([ask])[0] for ask in asks]
    together.clear()
    assert answers(asks) == alone
    assert max(together) == 4  # the LoRA, DoRA, base and one-token rows in one prefill (LoReFT prefills alone)


# ---- the registry at request time -------------------------------------------------------------------------


def test_moving_an_alias_moves_traffic_without_a_restart(server, serve_registry):
    registry = Registry(serve_registry)
    v1, v2 = (complete(server, ref, max_tokens=12) for ref in ("sql-lora@1", "sql-lora@2"))
    assert v1.choices[0].text != v2.choices[0].text  # two trainings, two answers: the switch is visible
    registry.alias("sql-lora@1", "prod")
    before = complete(server, "sql-lora@prod", max_tokens=12)
    registry.alias("sql-lora@2", "prod")
    after = complete(server, "sql-lora@prod", max_tokens=12)
    assert (before.model, before.choices[0].text) == ("sql-lora@1", v1.choices[0].text)
    assert (after.model, after.choices[0].text) == ("sql-lora@2", v2.choices[0].text)
    registry.alias("sql-lora@1", "prod")


def test_the_least_recently_used_adapter_leaves_and_comes_back_hash_checked(server):
    first = complete(server, "sql-lora@1", max_tokens=12).choices[0].text
    for ref in ("chat-dora", "extra-lora"):
        complete(server, ref)
    llama = server.health()["bases"]["tiny-llama"]
    assert [a["ref"] for a in llama["adapters"]] == ["chat-dora@1", "extra-lora@1"] and llama["max_adapters"] == 2
    again = complete(server, "sql-lora@1", max_tokens=12).choices[0].text
    after = server.health()["bases"]["tiny-llama"]
    assert after["adapter_loads"] == llama["adapter_loads"] + 1 and after["evictions"] == llama["evictions"] + 1
    assert [a["ref"] for a in after["adapters"]] == ["extra-lora@1", "sql-lora@1"] and again == first


def test_unknown_and_incompatible_refs_say_what_the_cli_would(server, serve_registry, cli):
    code, message = error_of(lambda: complete(server, "no-such-lora"))
    _, _, cli_error = cli("generate", "no-such-lora", "--prompt", "x", registry=serve_registry)
    assert code == 404 and f"error: {message}" == cli_error.strip()
    code, message = error_of(lambda: complete(server, "other-lora"))
    assert code == 400 and message.startswith("other-lora@1 is not compatible with any served base: tiny-llama: ")
    assert "serve its base: adapterhub serve --base tiny-llama-b" in message
    code, message = error_of(lambda: complete(server, "tiny-llama-b"))
    assert code == 404 and message == ("base tiny-llama-b is registered but not served here (serving: tiny-llama, tiny-qwen2)"
                                       " — restart the server with --base tiny-llama-b")
    code, message = error_of(lambda: complete(server, "sql-lora@9"))
    assert code == 404 and "has no version 9 (latest is 2)" in message
    code, message = error_of(lambda: complete(server, "sql-child+sql-lora@1"))
    assert code == 400 and "sql-lora@1 is an ancestor of sql-child@1" in message and "apply the parent twice" in message
    code, message = error_of(lambda: complete(server, "sql-lora@2+extra-lora"))
    assert code == 400 and "adapterhub stack sql-lora@2 extra-lora@1 --name NAME" in message


def test_weights_changed_on_disk_are_refused_where_they_would_be_used(server, serve_registry):
    registry = Registry(serve_registry)
    blob = registry.objects.path(registry.resolve("doomed-lora").sha256)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    code, message = error_of(lambda: complete(server, "doomed-lora"))
    assert code == 500 and "is corrupt: its bytes no longer hash to its sha256" in message and "adapterhub verify" in message
    assert complete(server, "sql-lora@1").choices[0].text  # the server goes on


def test_the_api_key_is_required_on_the_api_only(server):
    code, message = error_of(lambda: server.client(key="wrong").models.list())
    assert code == 401 and message.startswith("missing or wrong API key")
    code, reply = server.request("POST", "/v1/completions", b'{"model": "sql-lora", "prompt": "x"}')
    assert code == 401 and reply["error"]["type"] == "authentication_error"
    assert server.get("/v1/models")[0] == 401 and server.get("/ui/api/facets")[0] == 401
    assert server.get("/ui/api/facets", {"Authorization": f"Bearer {KEY}"})[0] == 200  # the web page, on one stack
    assert server.get("/health") == (200, {"status": "ok"})  # for load balancers; what is loaded only with the key


@pytest.mark.parametrize("body,status,says", [
    (b"{not json", 400, "the request body is not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"prompt": "x"}', 400, "'model' must name a base or an adapter ref"),
    (b'{"model": "sql-lora", "prompt": "x", "max_tokens": 100000}', 400, "this server's limit of 4096"),
    (b'{"model": "sql-lora", "prompt": "x", "temperature": "hot"}', 400, "'temperature' must be a number"),
    (b'{"model": "sql-lora", "prompt": "x", "n": 3}', 400, "'n' must be 1"),
    (b'{"model": "sql-lora", "prompt": ["a", "b"]}', 400, "'prompt' must be one string"),
    (b'{"model": "sql-lora", "prompt": "x", "stop": [""]}', 400, "'stop' must be"),
    (b'{"model": "sql-lora", "prompt": "' + b"x" * (1 << 20) + b'"}', 413, "over this server's limit of 1048576 bytes"),
    (b'{"model": "sql-lora", "prompt": "' + b" sky" * 9000 + b'"}', 400, "above this server's limit of 8192"),
], ids=["json", "array", "no-model", "max-tokens", "temperature", "n", "prompts", "stop", "size", "prompt-tokens"])
def test_a_bad_body_is_a_4xx_with_the_reason_never_a_crash(server, body, status, says):
    code, reply = server.request("POST", "/v1/completions", body,
                                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert code == status and says in reply["error"]["message"], reply
    assert server.health()["status"] == "ok"


def test_a_client_leaving_mid_stream_frees_its_row(server):
    stream = server.client().chat.completions.create(model="sql-lora@1", temperature=0, max_tokens=4096, stream=True,
                                                     messages=[{"role": "user", "content": CHAT_PROMPT}])
    chunks = iter(stream)
    pieces = [next(chunks) for _ in range(3)]
    assert pieces[-1].choices[0].finish_reason is None
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["bases"]["tiny-llama"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["bases"]["tiny-llama"]["running"] == 0
    deadline = time.monotonic() + 5
    while not any(r["status"] == 499 and r["model"] == "sql-lora@1" for r in server.access_log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [r for r in server.access_log() if r["status"] == 499 and r["model"] == "sql-lora@1"]
    assert left and left[-1]["error"] == "client disconnected" and left[-1]["adapter_sha256"]


def test_every_request_gets_one_access_log_line(server, serve_registry):
    before = len(server.access_log())
    answer = complete(server, "sql-lora@prod", max_tokens=5)
    lines = server.access_log()
    assert len(lines) == before + 1
    line = lines[-1]
    assert (line["model"], line["ref"], line["base"]) == ("sql-lora@prod", answer.model, "tiny-llama")
    assert line["adapter_sha256"] == Registry(serve_registry).resolve("sql-lora@prod").sha256
    assert (line["status"], line["prompt_tokens"], line["completion_tokens"]) == \
        (200, answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert line["latency_ms"] > 0 and line["path"] == "/v1/completions"


# ---- the command ------------------------------------------------------------------------------------------


def test_importing_the_cli_imports_no_server_stack_and_no_mlx():
    code = "import sys, adapterhub.cli; print([m for m in ('starlette', 'uvicorn', 'mlx', 'mlx_lm') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert done.stdout.strip() == "[]", done.stderr


def test_without_the_extra_or_the_key_serve_says_what_to_do(cli, registry, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SERVE_KEY", raising=False)
    code, _, err = cli("serve", "--api-key-env", "NO_SUCH_SERVE_KEY")
    assert code == 1 and err.startswith("error: --api-key-env NO_SUCH_SERVE_KEY names a variable that is unset or empty")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code, _, err = cli("serve")
    assert code == 1 and err.strip().endswith("— pip install 'adapterhub[serve]'") and "Traceback" not in err


def test_sigint_lets_a_stream_in_flight_finish_then_exits_cleanly(server):
    """Last: it stops the module's server."""
    stream = server.client().completions.create(model="sql-lora@2", prompt=TEXT_PROMPT, temperature=0, max_tokens=300,
                                                stream=True)
    chunks = iter(stream)
    first = next(chunks)
    server.process.send_signal(signal.SIGINT)
    rest = list(chunks)
    assert first.choices[0].finish_reason is None and rest[-1].choices[0].finish_reason in ("length", "stop")
    assert server.process.wait(timeout=30) == 0
    out = server.process.stdout.read()
    assert json.loads(out.strip().splitlines()[-1])["stopped"] is True
    with pytest.raises(openai.APIConnectionError):
        complete(server, "sql-lora@1")
