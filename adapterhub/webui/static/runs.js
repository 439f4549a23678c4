// Training runs with their progress; the list refreshes itself while a run is still running.
"use strict";

(() => {
  const { el, api, fmt, table, empty, versionLink, setTitle } = AH;
  const POLL_MS = 3000;
  const params = new URLSearchParams(location.search);
  setTitle("Runs");

  function render(data) {
    const status = params.get("status") || "";
    const filter = el("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
      el("label", {}, "status", el("select", { id: "f-status", onchange: (e) => {
        const value = e.target.value;
        location.href = value ? `runs?status=${value}` : "runs";
      } }, ["", "running", "interrupted", "finished", "failed"].map((s) =>
        el("option", { value: s, selected: s === status }, s || "any status")))));
    const rows = table([
      { label: "run", class: "mono", cell: (r) => el("a", { href: `run/${encodeURIComponent(r.id)}` }, r.id) },
      { label: "name", cell: (r) => r.name },
      { label: "status", cell: (r) => el("span", { class: `status status-${r.status}` }, r.status) },
      { label: "progress", cell: (r) => el("span", {}, el("progress", { max: r.iters, value: r.step }), ` ${r.step} / ${r.iters}`) },
      { label: "base", cell: (r) => (r.base ? r.base.name : "–") }, { label: "dataset", cell: (r) => (r.dataset ? r.dataset.name : "–") },
      { label: "started", cell: (r) => r.started_at }, { label: "finished", cell: (r) => r.finished_at || "–" },
      { label: "result", cell: (r) => (r.result ? versionLink(r.result) : "–") }], data.runs, { id: "runs" });
    document.getElementById("app").replaceChildren(el("h1", {}, "Training runs"), filter,
      data.runs.length ? rows : empty("No training runs."));
  }

  async function load() {
    try {
      const status = params.get("status");
      const data = await api(status ? `api/runs?status=${encodeURIComponent(status)}` : "api/runs");
      render(data);
      document.body.dataset.ready = "1";
      if (data.runs.some((r) => r.status === "running")) setTimeout(load, POLL_MS);
    } catch (error) {
      AH.showError(error);
      document.body.dataset.ready = "error";
    }
  }
  load();
})();
