// A version: everything `show` knows, its files, training, loss curves, checkpoints, evaluations and lineage.
"use strict";

(async () => {
  const { el, api, fmt, bytes, kv, table, section, empty, tagChips, chips, versionLink, shortSha, setTitle } = AH;
  const ref = AH.pathKey();
  setTitle(ref);
  try {
    const data = await api(`api/version/${AH.refPath(ref)}`);
    const v = data.version;
    setTitle(v.ref);
    const base = v.base ? el("span", {}, el("a", { href: `base/${v.base.sha256}` }, v.base.name),
      el("span", { class: "muted" }, ` ${shortSha(v.base.sha256)} (${v.base.model_type || "?"})`)) : "unknown";
    const dataset = v.dataset ? el("span", {}, el("a", { href: `dataset/${v.dataset.sha256}` }, v.dataset.name),
      el("span", { class: "muted" }, ` ${shortSha(v.dataset.sha256)} ${Object.entries(v.dataset.examples || {}).map(([k, n]) => `${k} ${n}`).join(", ")}`)) : "–";
    const parents = v.parents.length ? el("span", {}, v.parents.map((p) => el("div", {}, `${p.relation} `,
      p.relation === "resumed-from" || p.relation === "stacked-from" || p.relation === "promoted-from" ? versionLink(p.ref) : el("span", { class: "mono" }, p.ref),
      el("span", { class: "muted" }, ` ${shortSha(p.sha256)}${p.weight !== undefined ? ` weight ${p.weight}` : ""}`)))) : "–";
    const about = kv([
      ["name", el("a", { href: `./?name=${encodeURIComponent(v.name)}&versions=all` }, v.name)],
      ["version", v.version], ["sha256", el("span", { class: "sha" }, v.sha256)],
      ["kind", v.kind], ["rank", v.rank], ["scale", v.scale], ["targets", v.targets.join(", ")],
      ["layers", `${v.num_layers} (${(v.layers || []).join(", ")})`], ["parameters", v.num_parameters],
      ["dtype", v.dtype], ["base", base], ["dataset", dataset], ["parents", parents],
      ["children", data.children.length ? data.children.map((c) => el("span", {}, versionLink(c), " ")) : "–"],
      ["aliases", v.aliases.length ? chips(v.aliases, "chip alias") : "–"],
      ["tags", Object.keys(v.tags).length ? tagChips(v.tags) : "–"],
      v.loreft ? ["loreft", v.loreft] : null,
      v.source ? ["source", v.source] : null,
      ["created", v.created_at],
    ]);
    const files = table([
      { label: "file", cell: (f) => f.name }, { label: "size", class: "num", cell: (f) => bytes(f.size) },
      { label: "sha256", class: "sha", cell: (f) => f.sha256 }], v.files, { id: "files" });
    const training = data.training && Object.keys(data.training).length ? kv(Object.entries(data.training).map(([k, value]) =>
      [k, k === "run_id" ? el("a", { href: `run/${encodeURIComponent(value)}` }, value) : value])) : empty("No training record.");
    const hyper = Object.keys(data.hyperparameters).length
      ? table([{ label: "hyper-parameter", cell: (r) => r[0] }, { label: "value", class: "mono", cell: (r) => fmt(r[1]) }],
        Object.entries(data.hyperparameters), { id: "hyperparameters" }) : empty("No hyper-parameters recorded.");
    const checkpoints = data.checkpoints.length ? table([
      { label: "step", class: "num", cell: (c) => c.step }, { label: "train loss", class: "num", cell: (c) => fmt(c.train_loss) },
      { label: "val loss", class: "num", cell: (c) => fmt(c.val_loss) },
      { label: "kept because", cell: (c) => c.kept_because.length ? chips(c.kept_because) : "–" },
      { label: "file", class: "mono", cell: (c) => c.file }], data.checkpoints, { id: "checkpoints" })
      : empty(data.run ? "No checkpoints left on disk for this run." : "Not trained here: no run, no checkpoints.");
    const evaluations = data.evaluations.length ? table([
      { label: "split", cell: (e) => e.split }, { label: "metric", cell: (e) => e.metric },
      { label: "scores", cell: (e) => chips(Object.entries(e.scores).map(([k, s]) => `${k} ${fmt(s)}`), "chip score") },
      { label: "dataset", cell: (e) => e.dataset.name }, { label: "base", cell: (e) => e.base.name },
      { label: "examples", class: "num", cell: (e) => e.examples }, { label: "when", cell: (e) => e.created_at }],
      data.evaluations, { id: "evaluations" }) : empty("No evaluations recorded.");
    const chart = el("div", { class: "chart", id: "loss-chart" });
    const below = el("div", { class: "graph", id: "descendants", hidden: true });
    const findBelow = el("button", { type: "button", id: "find-descendants", onclick: async () => {
      findBelow.disabled = true;
      try {
        const made = await api(`api/descendants/${AH.refPath(v.ref)}`);
        if (made.edges.length) {
          below.hidden = false;
          await AH.lineageGraph(below, made);
          findBelow.replaceWith(AH.nodeList(made));
        } else {
          findBelow.replaceWith(empty("Nothing in this registry was made from it."));
        }
        document.body.dataset.descendants = String(made.nodes.length);
      } catch (error) {
        findBelow.replaceWith(el("p", { class: "error" }, error.message));
      }
    } }, "Find what was made from it");
    const graph = el("div", { class: "graph", id: "lineage" });
    document.getElementById("app").replaceChildren(
      el("h1", {}, v.ref, " ", el("span", { class: "chip" }, v.kind)),
      v.description ? el("p", { class: "description" }, v.description) : null,
      el("div", { class: "actions" },
        el("a", { href: `audit?target=${encodeURIComponent("adapter:" + v.ref)}`, id: "audit-link" }, "Audit this lineage"),
        el("a", { href: `compare?refs=${encodeURIComponent(v.ref)}` }, "Compare with…"),
        el("a", { href: `api/version/${AH.refPath(v.ref)}` }, "JSON")),
      section("About", about),
      section("Versions of this name", el("div", {}, data.versions.map((s) => s.ref === v.ref
        ? el("span", { class: "chip" }, s.ref) : el("span", {}, versionLink(s.ref), " ")))),
      section("Lineage", graph, AH.nodeList(data.lineage)),
      section("Made from it", below, findBelow),
      section("Loss curves", chart),
      section("Checkpoints kept", checkpoints),
      section("Training", training, hyper),
      section("Evaluations", evaluations),
      section("Files", files));
    await Promise.all([AH.lineageGraph(graph, data.lineage),
      AH.lossChart(chart, data.losses.map((p) => ({ ...p, series: p.split })))]);
    document.body.dataset.ready = "1";
  } catch (error) {
    AH.showError(error);
    document.body.dataset.ready = "error";
  }
})();
