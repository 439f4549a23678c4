// `adapterhub audit` on a node: every file along its lineage re-hashed, each node ok / changed / missing.
"use strict";

(async () => {
  const { el, api, table, setTitle } = AH;
  const target = new URLSearchParams(location.search).get("target") || "";
  setTitle(`Audit ${target}`);
  const app = document.getElementById("app");
  app.replaceChildren(el("h1", {}, "Audit ", el("span", { class: "mono" }, target)),
    el("p", { class: "loading", id: "auditing" }, "Re-hashing every file along the lineage…"));
  try {
    const report = await api(`api/audit?target=${encodeURIComponent(target)}`);
    const graph = el("div", { class: "graph", id: "lineage" });
    const hrefs = Object.fromEntries(report.lineage.nodes.map((n) => [n.id, n.href]));
    const counts = Object.entries(report.counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`);
    app.replaceChildren(
      el("h1", {}, "Audit ", el("span", { class: "mono" }, target)),
      el("p", { class: "summary", id: "verdict" },
        el("span", { class: `status status-${report.ok ? "ok" : "changed"}` }, report.ok ? "ok" : "FAILED"),
        el("span", {}, report.ok ? "Every byte along the lineage is what was recorded." : "A file differs from its record."),
        el("span", { class: "muted" }, counts.join(", "))),
      el("h2", {}, "Lineage, by status"), graph,
      el("h2", {}, "Nodes"),
      table([
        { label: "node", cell: (n) => (hrefs[n.id] ? el("a", { href: hrefs[n.id] }, n.label) : n.label) },
        { label: "kind", cell: (n) => el("span", { class: `chip kind-${n.kind}` }, n.kind) },
        { label: "status", cell: (n) => el("span", { class: `status status-${n.status}` }, n.status) },
        { label: "details", cell: (n) => el("div", {}, n.details.map((d) => el("div", {}, d))) },
        { label: "sha256", class: "sha", cell: (n) => n.sha256 || "unknown" }], report.nodes, { id: "audit" }));
    await AH.lineageGraph(graph, report.lineage);
    document.body.dataset.ready = "1";
  } catch (error) {
    AH.showError(error);
    document.body.dataset.ready = "error";
  }
})();
