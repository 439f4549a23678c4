"""The web page (`adapterhub ui`, adapterhub/webui): the real server over a registry the fixtures build.

Plain HTTP tests always run; the page tests drive Debian's Chromium through Selenium and are skipped,
with the reason, where no browser is installed (`make test-ui` installs one). The page tests write a
screenshot of each page under docs/.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette

from adapterhub.algebra.stack import stack
from adapterhub.audit import audit
from adapterhub.evaluation import evaluate
from adapterhub.lineage import Edge, Lineage, Node, ancestors, descendants
from adapterhub.records import now
from adapterhub.registry import Registry
from adapterhub.training.config import TrainConfig
from adapterhub.training.trainer import train
from adapterhub.webui.app import STATIC, create_app, mount
from adapterhub.webui.catalogue import CatalogueView, Query
from adapterhub.webui.graph import NODE_HEIGHT, layout
from tests.conftest import snapshot, subprocess_env

DOCS = Path(__file__).parent.parent / "docs"
SCRIPT_TAG = "<script>alert(1)</script>"
LIVE_RUN = "live-lora-000001"



def _train(registry, model, data, name, **extra):
    return train(registry, TrainConfig(base=str(model), data=str(data), name=name, iters=8, save_every=4,
                                       steps_per_report=2, steps_per_eval=4, num_layers=2, val_batches=2,
                                       keep_last=1, keep_best=1, tags={"task": "stories"}, **extra))


@pytest.fixture(scope="module")
def ui_registry(tmp_path_factory, tiny_model, tiny_data, lora_adapter) -> Registry:
    """chat-lora@1 (imported, a <script> tag and description), story-lora@1 (trained from it: a chain with a
    loss curve), plot-lora@1 (trained alone, another learning rate), duo-lora@1 (stacked from chat and plot),
    evaluations on three of them, an alias, and a run that is still running (this process is its pid)."""
    registry = Registry(tmp_path_factory.mktemp("ui") / "registry")
    registry.init()
    registry.import_adapter(lora_adapter, "chat-lora", base=tiny_model, dataset=tiny_data,
                            tags={"task": "chat", "note": SCRIPT_TAG}, description="<b>chat</b> & <script>alert(2)</script>")
    _train(registry, tiny_model, tiny_data, "story-lora", learning_rate=1e-3, from_ref="chat-lora@1")
    _train(registry, tiny_model, tiny_data, "plot-lora", learning_rate=3e-4)
    stack(registry, ["chat-lora@1", "plot-lora@1"], "duo-lora", tags={"task": "chat"})
    for ref in ("chat-lora@1", "story-lora@1", "plot-lora@1"):
        evaluate(registry, ref)
    registry.alias("story-lora@1", "prod")
    registry.start_run({"id": LIVE_RUN, "name": "live-lora", "status": "running", "step": 2, "iters": 10,
                        "pid": os.getpid(), "host": socket.gethostname(), "config": {"iters": 10}, "started_at": now(),
                        "losses": {"train": [[1, 3.0], [2, 2.8]], "val": [[1, 3.1]]}})
    return registry


class _Server:
    """uvicorn serving `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def server(ui_registry):
    with _Server(create_app(ui_registry.root)) as running:
        yield running.url


def fetch(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get_json(url: str, status: int = 200):
    code, headers, body = fetch(url)
    assert code == status, body
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


def run_points(registry, name: str) -> int:
    run = registry.run(registry.resolve(name).record["training"]["run_id"])
    return len(run["losses"]["train"]) + len(run["losses"]["val"])



def test_catalogue_lists_names_and_filters(server, ui_registry):
    page = get_json(f"{server}/api/catalogue")
    assert [r["ref"] for r in page["rows"]] == ["chat-lora@1", "duo-lora@1", "plot-lora@1", "story-lora@1"]
    chat = page["rows"][0]
    assert chat["tags"]["note"] == SCRIPT_TAG and chat["scores"]["test_loss"]["dataset"] == "stories"
    assert page["rows"][3]["aliases"] == {"prod": 1} and page["versions_total"] == 4
    names = lambda query: [r["name"] for r in get_json(f"{server}/api/catalogue?{query}")["rows"]]  # noqa: E731
    assert names("tag=task=chat") == ["chat-lora", "duo-lora"]
    assert names("name=story") == ["story-lora"] and names("name=*-lora") == names("")
    assert names("kind=dora") == [] and names("kind=lora&sort=-rank")[0] == "duo-lora"
    base = ui_registry.resolve("chat-lora").record["base"]
    assert len(names(f"base={base['sha256']}")) == 4 == len(names(f"base={base['name']}"))
    assert names("sort=eval:test_loss") == ["story-lora", "chat-lora", "plot-lora", "duo-lora"]  # no score: last
    second = get_json(f"{server}/api/catalogue?limit=1&offset=1")
    assert second["total"] == 4 and [r["name"] for r in second["rows"]] == ["duo-lora"]
    for bad in ("sort=colour", "kind=qlora", "limit=0", "offset=x", "tag=novalue"):
        assert get_json(f"{server}/api/catalogue?{bad}", 400)["error"]
    assert get_json(f"{server}/api/catalogue?base=nope", 404)["hint"]
    facets = get_json(f"{server}/api/facets")
    assert facets["kinds"] == {"lora": 4} and f"note={SCRIPT_TAG}" in facets["tags"]
    assert "test_loss" in facets["scores"]


def test_catalogue_filters_mean_what_adapterhub_list_means(ui_registry):
    view = CatalogueView(ui_registry)
    base = ui_registry.resolve("chat-lora").record["base"]["name"]
    for base_, kind, tags, glob in [(None, None, {}, None), (base, None, {}, None), (None, "lora", {"task": "chat"}, None),
                                    (None, None, {}, "*o-lora"), (base, "dora", {}, None)]:
        shown = view.query(Query(base=base_, kind=kind, tags=tuple(tags.items()), name=glob, all_versions=True, limit=500))
        assert [r["ref"] for r in shown["rows"]] == [v.ref for v in ui_registry.list(base_, kind, tags, glob)]


def test_version_shows_everything_show_knows(server, ui_registry):
    data = get_json(f"{server}/api/version/story-lora@1")
    shown = ui_registry.resolve("story-lora@1").to_dict()
    assert data["version"] == shown and data["evaluations"] == ui_registry.evaluations(ui_registry.resolve("story-lora@1"))
    assert [f["sha256"] for f in data["version"]["files"]] == [f["sha256"] for f in shown["files"]]
    assert len(data["losses"]) == run_points(ui_registry, "story-lora@1") > 4
    assert {p["split"] for p in data["losses"]} == {"train", "val"}
    assert data["hyperparameters"]["learning_rate"] == 1e-3 and data["run"]["status"] == "finished"
    assert data["checkpoints"] and all(c["kept_because"] for c in data["checkpoints"])
    graph = ancestors(ui_registry, "story-lora@1")
    assert len(data["lineage"]["nodes"]) == len(graph.nodes) == 4 and len(data["lineage"]["edges"]) == len(graph.edges) == 5
    assert {e["relation"] for e in data["lineage"]["edges"]} == {"resumed-from", "base", "dataset"}
    assert get_json(f"{server}/api/version/chat-lora@1")["children"] == ["duo-lora@1", "story-lora@1"]
    assert get_json(f"{server}/api/version/story-lora@prod")["version"]["ref"] == "story-lora@1"


def test_compare_puts_versions_side_by_side(server):
    data = get_json(f"{server}/api/compare?refs=story-lora@1,plot-lora@1")
    assert [c["ref"] for c in data["columns"]] == ["story-lora@1", "plot-lora@1"]
    rows = {r["field"]: r for r in data["rows"]}
    assert rows["learning_rate"]["differs"] and not rows["rank"]["differs"]
    assert rows["test_loss"]["section"] == "evaluations" and len(rows["test_loss"]["best"]) == 1
    assert {p["ref"] for p in data["losses"]} == {"story-lora@1", "plot-lora@1"}
    assert get_json(f"{server}/api/compare?refs=story-lora@1", 400)["error"].startswith("compare needs 2")
    assert get_json(f"{server}/api/compare?refs=story-lora@1,nope@3", 404)["error"]


def test_runs_and_a_running_run(server, ui_registry):
    runs = {r["id"]: r for r in get_json(f"{server}/api/runs")["runs"]}
    assert runs[LIVE_RUN]["status"] == "running" and runs[LIVE_RUN]["progress"] == 0.2
    assert sorted(r["status"] for r in runs.values()) == ["finished", "finished", "running"]
    assert [r["id"] for r in get_json(f"{server}/api/runs?status=running")["runs"]] == [LIVE_RUN]
    assert get_json(f"{server}/api/runs?status=paused", 400)["error"]
    live = get_json(f"{server}/api/run/{LIVE_RUN}")
    assert len(live["losses"]) == 3 and live["checkpoints"] == []
    assert get_json(f"{server}/api/run/no-such-run", 404)["error"] == "no training run 'no-such-run'"


def test_audit_reports_each_node(server, ui_registry):
    data = get_json(f"{server}/api/audit?target=adapter:duo-lora@1")
    expected = audit(ui_registry, "duo-lora@1")
    assert data["ok"] and data["counts"] == expected.counts() and data["counts"]["ok"] == len(expected.findings) == 5
    assert {n["status"] for n in data["lineage"]["nodes"]} == {"ok"}
    assert get_json(f"{server}/api/audit?target=/etc", 400)["hint"]  # never a path from the request
    assert get_json(f"{server}/api/audit?target=fused:{'0' * 64}", 404)["error"]


def test_registry_text_is_never_markup(server):
    code, _, raw = fetch(f"{server}/api/catalogue")
    assert b"<script>" not in raw and b"\\u003cscript\\u003ealert(1)" in raw
    for page in ("", "version/chat-lora@1", "compare?refs=chat-lora@1,duo-lora@1", "runs", f"run/{LIVE_RUN}",
                 "audit?target=adapter:chat-lora@1"):
        code, headers, body = fetch(f"{server}/{page}")
        assert code == 200 and headers["content-type"].startswith("text/html")
        assert b"alert(" not in body and b"chat</b>" not in body  # shells carry no registry text at all
    code, _, body = fetch(f"{server}/version/%3Cscript%3Ealert(1)")  # a ref that is markup: named in the 404, as text
    assert code in (400, 404) and b"<script>alert" not in body and b"&lt;script&gt;alert(1)" in body


def test_what_is_not_there_is_404(server):
    for path in ("api/version/nope@1", "api/base/nope", "api/dataset/nope", f"api/fused/{'a' * 64}", "api/run/nope"):
        assert get_json(f"{server}/{path}", 404)["error"]
    for path in ("version/nope@1", "base/nope", "dataset/nope", f"fused/{'a' * 64}", "run/nope", "nope", "static/nope.js",
                 "api/nope"):
        assert fetch(f"{server}/{path}")[0] == 404, path


def test_nothing_but_get_and_head(server, ui_registry):
    before = snapshot(ui_registry.root)
    for path in ("", "api/catalogue", "api/version/chat-lora@1", "version/chat-lora@1", "static/common.js", "nope"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            code, headers, _ = fetch(f"{server}/{path}", method)
            assert code == 405 and headers["allow"] == "GET, HEAD", (method, path)
    assert fetch(f"{server}/", "HEAD")[0] == 200
    assert snapshot(ui_registry.root) == before


def test_pages_need_nothing_from_outside(server):
    code, headers, body = fetch(f"{server}/version/chat-lora@1")
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    assert headers["x-content-type-options"] == "nosniff"
    scripts = [part.split('"')[0] for part in body.decode().split('src="')[1:]]
    assert scripts and all(fetch(f"{server}/{s}")[0] == 200 for s in scripts)
    for asset in [*STATIC.glob("*.js"), *STATIC.glob("*.css")]:  # ours; Vega's only names the SVG namespace
        assert "http://" not in asset.read_text() and "https://" not in asset.read_text(), asset.name
    assert (STATIC / "vendor" / "LICENSE-vega.txt").is_file()


def test_the_page_mounts_under_ui(ui_registry):
    with _Server(Starlette(routes=[mount(ui_registry.root)])) as running:
        code, _, body = fetch(f"{running.url}/ui/")
        assert code == 200 and b'<base href="/ui/">' in body
        assert get_json(f"{running.url}/ui/api/catalogue")["total"] == 4
        assert fetch(f"{running.url}/ui/static/common.js")[0] == 200
        assert fetch(f"{running.url}/ui/api/catalogue", "POST")[0] == 405


def test_the_layout_points_every_edge_up_and_overlaps_nothing(ui_registry):
    drawn = layout(ancestors(ui_registry, "duo-lora@1"))
    nodes = {n["id"]: n for n in drawn["nodes"]}
    for edge in drawn["edges"]:
        assert nodes[edge["parent"]]["y"] + NODE_HEIGHT < nodes[edge["child"]]["y"]
    boxes = sorted((n["y"], n["x"], n["x"] + n["width"]) for n in drawn["nodes"])
    for (y1, a1, b1), (y2, a2, b2) in zip(boxes, boxes[1:]):
        assert y1 != y2 or b1 <= a2
    assert {n["href"] for n in drawn["nodes"] if n["kind"] == "adapter"} == {"version/duo-lora@1", "version/chat-lora@1",
                                                                             "version/plot-lora@1"}
    # A damaged registry can hold a cycle (verify reports it): it is still drawn, and the layout ends.
    nodes = {f"adapter:n@{i}": Node(f"adapter:n@{i}", "adapter", f"n@{i}", "ab" * 32) for i in range(3)}
    cycle = [Edge(f"adapter:n@{i}", f"adapter:n@{(i + 1) % 3}", "resumed-from") for i in range(3)]
    assert len(layout(Lineage("adapter:n@0", "ancestors", nodes, cycle))["edges"]) == 3


def test_the_catalogue_rereads_only_the_names_that_changed(registry, lora_adapter, tiny_model, monkeypatch):
    registry.import_adapter(lora_adapter, "alpha-lora", base=tiny_model)
    registry.import_adapter(lora_adapter, "beta-lora", base=tiny_model)
    view = CatalogueView(registry)
    assert view.query(Query())["total"] == 2
    reads = []
    real_list = Registry.list
    monkeypatch.setattr(Registry, "list", lambda self, *a, **k: reads.append(k.get("name_glob")) or real_list(self, *a, **k))
    view.query(Query(sort="-name"))
    assert reads == []  # nothing changed: no catalogue file read again
    registry.tag("beta-lora@1", "task", "code")
    assert view.query(Query(tags=(("task", "code"),)))["rows"][0]["ref"] == "beta-lora@1" and reads == ["beta-lora"]


def _cli(registry: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "--registry", str(registry), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def test_the_ui_command_serves_the_registry(ui_registry, tmp_path):
    process = _cli(ui_registry.root, "--json", "ui", "--port", "0")
    try:
        started = json.loads(process.stdout.readline())
        assert started["read_only"] and started["url"].startswith("http://127.0.0.1:")
        assert get_json(f"{started['url']}api/catalogue")["total"] == 4
    finally:
        process.terminate()
        process.wait(10)
    missing = _cli(tmp_path / "nowhere", "ui", "--port", "0")
    out, err = missing.communicate(timeout=30)
    assert missing.returncode == 1 and err.startswith("error: no registry at") and "adapterhub init" in err
    quiet = subprocess.run([sys.executable, "-c", "import sys, adapterhub.cli, adapterhub.cli.ui; "
                            "print(sorted(m for m in ('starlette', 'uvicorn', 'mlx') if m in sys.modules))"],
                           capture_output=True, text=True, env=subprocess_env())
    assert quiet.stdout.strip() == "[]", quiet.stderr



@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: run 'make test-ui'")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("no Chromium and chromedriver on this machine: run 'make test-ui' (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def load(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready"), f"{url} never finished loading", 20)
    assert driver.execute_script("return document.body.dataset.ready") == "1", driver.find_element("id", "app").text


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def count(driver, selector: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", selector)


def screenshot(driver, name: str) -> None:
    """The whole page (up to 2,400 px tall), as docs/ui-NAME.png."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 2400), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"ui-{name}.png").write_bytes(base64.b64decode(shot["data"]))


def wait_for(condition, what: str, seconds: float = 10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_catalogue_page(browser, server):
    load(browser, f"{server}/")
    # Read in one script: the table is rebuilt on every filter change, so element handles go stale.
    rows = lambda: browser.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#catalogue tbody tr')].map(r => r.dataset.ref)")
    assert rows() == ["chat-lora@1", "duo-lora@1", "plot-lora@1", "story-lora@1"]
    tag = next(c for c in browser.find_elements("css selector", "#catalogue .chip.tag") if "alert" in c.text)
    assert tag.text == f"note={SCRIPT_TAG}" and count(browser, "main script") == 0
    screenshot(browser, "catalogue")
    browser.find_element("id", "f-name").send_keys("story")
    wait_for(lambda: rows() == ["story-lora@1"], "the name filter did not narrow the rows")
    load(browser, f"{server}/?tag=task%3Dchat")
    assert rows() == ["chat-lora@1", "duo-lora@1"]
    load(browser, f"{server}/")
    browser.find_element("css selector", '#catalogue th[data-column="rank"]').click()
    wait_for(lambda: "sort=rank" in browser.current_url, "sorting by rank")
    browser.find_element("css selector", '#catalogue th[data-column="rank"]').click()
    wait_for(lambda: rows()[:1] == ["duo-lora@1"], "sorting by rank, descending")
    assert console_errors(browser) == []


def test_version_page_draws_lineage_and_loss_curve(browser, server, ui_registry):
    load(browser, f"{server}/version/story-lora@1")
    graph = ancestors(ui_registry, "story-lora@1")
    assert count(browser, ".lineage-node path") == len(graph.nodes) == 4
    assert count(browser, ".lineage-edge path") == len(graph.edges) == 5
    labels = browser.execute_script("return [...document.querySelectorAll('.lineage-edge-label text')].map(t => t.textContent)")
    assert sorted(labels) == sorted(e.relation for e in graph.edges)
    assert count(browser, ".loss-point path") == run_points(ui_registry, "story-lora@1")
    screenshot(browser, "version")
    assert console_errors(browser) == []
    load(browser, f"{server}/version/duo-lora@1")
    assert count(browser, ".lineage-node path") == len(ancestors(ui_registry, "duo-lora@1").nodes) == 5
    # Each node links to its page: the stacked-from parent opens its own version page.
    from selenium.webdriver.common.action_chains import ActionChains

    node = next(t for t in browser.find_elements("css selector", ".lineage-node-text text") if "chat-lora@1" in t.text)
    ActionChains(browser).move_to_element(node).click().perform()
    wait_for(lambda: browser.current_url.endswith("/version/chat-lora@1"), "a lineage node did not open its page")
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1", "the parent's page")
    assert browser.find_element("css selector", "p.description").text == "<b>chat</b> & <script>alert(2)</script>"
    browser.find_element("id", "find-descendants").click()  # chained into story-lora, stacked into duo-lora
    wait_for(lambda: browser.execute_script("return document.body.dataset.descendants") == "3", "descendants")
    assert count(browser, "#descendants .lineage-edge path") == 2
    assert console_errors(browser) == []


def test_compare_page_shows_two_versions(browser, server, ui_registry):
    load(browser, f"{server}/?sort=-name")  # ticked in the catalogue, in its order: story-lora, then plot-lora
    for ref in ("story-lora@1", "plot-lora@1"):
        browser.find_element("css selector", f'#catalogue tr[data-ref="{ref}"] input[type=checkbox]').click()
    browser.find_element("id", "compare-selected").click()
    wait_for(lambda: "/compare?" in browser.current_url and browser.execute_script("return document.body.dataset.ready"), "compare")
    headers = [h.text for h in browser.find_elements("css selector", "#comparison thead th[data-ref]")]
    assert headers == ["story-lora@1", "plot-lora@1"]
    assert count(browser, "#comparison td.differs") > 0 and count(browser, "#comparison td.best") >= 1
    assert count(browser, ".loss-point path") == run_points(ui_registry, "story-lora@1") + run_points(ui_registry, "plot-lora@1")
    screenshot(browser, "compare")
    assert console_errors(browser) == []


def test_audit_page_shows_each_node(browser, server):
    load(browser, f"{server}/audit?target=adapter%3Aduo-lora%401")
    assert browser.find_element("css selector", "#verdict .status").text == "ok"
    statuses = [s.text for s in browser.find_elements("css selector", "#audit .status")]
    assert statuses == ["ok"] * 5 and count(browser, ".lineage-node path") == 5
    screenshot(browser, "audit")
    assert console_errors(browser) == []


def test_base_and_dataset_pages(browser, server, ui_registry):
    record = ui_registry.resolve("story-lora@1").record
    load(browser, f"{server}/base/{record['base']['sha256']}")
    assert count(browser, "#on-base a") == 4 and count(browser, "#files tbody tr") >= 1
    load(browser, f"{server}/dataset/{record['dataset']['sha256']}")
    made = descendants(ui_registry, dataset=record["dataset"]["sha256"])
    assert count(browser, ".lineage-node path") == len(made.nodes) == 5
    assert count(browser, ".lineage-edge path") == len(made.edges)
    assert console_errors(browser) == []


def test_runs_page_and_a_running_curve_that_grows(browser, server, ui_registry):
    load(browser, f"{server}/runs")
    assert count(browser, "#runs tbody tr") == 3 and count(browser, "#runs .status-running") == 1
    screenshot(browser, "runs")
    load(browser, f"{server}/run/{LIVE_RUN}")
    assert count(browser, ".loss-point path") == 3
    ui_registry.update_run(LIVE_RUN, step=4, losses={"train": [[1, 3.0], [2, 2.8], [3, 2.6], [4, 2.5]], "val": [[1, 3.1], [4, 2.7]]})
    wait_for(lambda: count(browser, ".loss-point path") == 6, "the running run's curve did not grow", seconds=15)
    assert "step 4 of 10" in browser.find_element("id", "run-progress").text
    screenshot(browser, "run")
    assert console_errors(browser) == []
