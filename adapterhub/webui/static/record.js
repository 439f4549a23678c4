// A base model, a dataset or a fused model: its record, files, and where it sits in the lineage.
"use strict";

(async () => {
  const { el, api, fmt, bytes, kv, table, section, empty, versionLink, shortSha, setTitle } = AH;
  const page = document.body.dataset.page;
  const key = AH.pathKey();
  const files = (list) => table([
    { label: "file", class: "mono", cell: (f) => f.name }, { label: "size", class: "num", cell: (f) => bytes(f.size) },
    { label: "sha256", class: "sha", cell: (f) => f.sha256 }], list || [], { id: "files" });

  async function base() {
    const data = await api(`api/base/${encodeURIComponent(key)}`);
    const b = data.base;
    setTitle(`Base ${b.name}`);
    return [el("h1", {}, b.name, " ", el("span", { class: "chip kind-base" }, "base model")),
      section("About", kv([["sha256", el("span", { class: "sha" }, b.sha256)],
        ["structure sha256", el("span", { class: "sha" }, b.structure_sha256)], ["model type", b.model_type],
        ["path", el("span", { class: "mono" }, b.path || "–")], ["Hub repo", b.hf_repo], ["tensors", b.num_tensors],
        ["registered", b.created_at]])),
      section("Configuration", kv(Object.entries(b.config || {}).map(([k, v]) => [k, fmt(v)]))),
      section(`Versions on this base (${data.versions.length})`, data.versions.length
        ? el("div", { id: "on-base" }, data.versions.map((r) => el("span", {}, versionLink(r), " "))) : empty("None.")),
      section("Files", files(b.files))];
  }

  async function dataset() {
    const data = await api(`api/dataset/${encodeURIComponent(key)}`);
    const d = data.dataset;
    setTitle(`Dataset ${d.name}`);
    const graph = el("div", { class: "graph", id: "lineage" });
    return [el("h1", {}, d.name, " ", el("span", { class: "chip kind-dataset" }, "dataset")),
      section("About", kv([["sha256", el("span", { class: "sha" }, d.sha256)],
        ["examples", Object.entries(d.examples || {}).map(([k, n]) => `${k} ${n}`).join(", ")],
        ["path", el("span", { class: "mono" }, d.path || "–")], ["registered", d.created_at]])),
      section("Trained on it, directly or through a chain", graph, AH.nodeList(data.lineage)),
      section("Files", files(d.files)), () => AH.lineageGraph(graph, data.lineage)];
  }

  async function fused() {
    const data = await api(`api/fused/${encodeURIComponent(key)}`);
    const f = data.fused;
    setTitle(`Fused ${shortSha(f.sha256)}`);
    const graph = el("div", { class: "graph", id: "lineage" });
    return [el("h1", {}, "Fused model ", el("span", { class: "mono" }, shortSha(f.sha256))),
      el("div", { class: "actions" }, el("a", { href: `audit?target=${encodeURIComponent("fused:" + f.sha256)}`, id: "audit-link" },
        "Audit this lineage")),
      section("About", kv([["sha256", el("span", { class: "sha" }, f.sha256)], ["path", el("span", { class: "mono" }, f.path)],
        ["base", f.base ? el("a", { href: `base/${f.base.sha256}` }, f.base.name) : "–"],
        ["adapters", el("span", {}, (f.adapters || []).map((a) => el("div", {}, versionLink(a.ref))))],
        ["dequantized", f.dequantized], ["created", f.created_at]])),
      section("Lineage", graph, AH.nodeList(data.lineage)),
      section("Evaluations", data.evaluations.length ? table([{ label: "split", cell: (e) => e.split },
        { label: "metric", cell: (e) => e.metric }, { label: "scores", cell: (e) => fmt(e.scores) },
        { label: "dataset", cell: (e) => e.dataset.name }], data.evaluations) : empty("No evaluations recorded.")),
      section("Files", files(f.files)), () => AH.lineageGraph(graph, data.lineage)];
  }

  try {
    const parts = await { base, dataset, fused }[page]();
    const after = parts.filter((p) => typeof p === "function");
    document.getElementById("app").replaceChildren(...parts.filter((p) => typeof p !== "function"));
    await Promise.all(after.map((draw) => draw()));
    document.body.dataset.ready = "1";
  } catch (error) {
    AH.showError(error);
    document.body.dataset.ready = "error";
  }
})();
