// Shared by every page: DOM building (text only, never markup), JSON fetching, tables, and the two
// drawings (loss curves, lineage graph) as Vega specs. Registry text (names, tags, descriptions) is
// user input: it only ever reaches the page through textContent, attribute values and Vega's SVG text.
"use strict";

const AH = (() => {
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // A ref in a path keeps its @ readable; everything else in it is encoded.
  const refPath = (ref) => encodeURIComponent(ref).replace(/%40/g, "@");
  const versionHref = (ref) => "version/" + refPath(ref);
  const versionLink = (ref) => el("a", { href: versionHref(ref), class: "ref" }, ref);
  const shortSha = (sha) => (sha ? String(sha).slice(0, 12) : "–");

  async function api(path) {
    const response = await fetch(path, { headers: { accept: "application/json" } });
    const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    if (!response.ok) {
      const error = new Error(body.hint ? `${body.error} — ${body.hint}` : body.error);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function fmt(value) {
    if (value === null || value === undefined || value === "") return "–";
    if (typeof value === "number") {
      return Number.isInteger(value) ? value.toLocaleString("en") : String(Number(value.toPrecision(6)));
    }
    if (Array.isArray(value)) return value.map(fmt).join(", ");
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function bytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  const chips = (items, className = "chip") => items.map((text) => el("span", { class: className }, text));
  const tagChips = (tags) => chips(Object.entries(tags || {}).sort().map(([k, v]) => `${k}=${v}`), "chip tag");

  // columns: [{label, cell(row) -> node|text, class}]
  function table(columns, rows, attrs = {}) {
    return el("table", attrs,
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { class: c.class }, c.label)))),
      el("tbody", {}, rows.map((row) => el("tr", {}, columns.map((c) => el("td", { class: c.class }, c.cell(row)))))));
  }

  function kv(pairs) {
    return el("table", { class: "kv" }, el("tbody", {}, pairs.filter((p) => p).map(([key, value]) =>
      el("tr", {}, el("th", {}, key), el("td", {}, value instanceof Node || Array.isArray(value) ? value : fmt(value))))));
  }

  const section = (title, ...content) => el("section", {}, el("h2", {}, title), ...content);
  const empty = (text) => el("p", { class: "muted" }, text);

  function showError(error) {
    const app = document.getElementById("app");
    app.replaceChildren(el("p", { class: "error" }, error.message || String(error)),
      el("p", {}, el("a", { href: "./" }, "Back to the catalogue")));
  }

  function setTitle(text) { document.title = `${text} · adapterhub`; }

  // The last path segment, decoded: the ref, run id or sha256 a page is about.
  const pathKey = () => decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");

  // ---- drawings (Vega, SVG renderer: every point, node and edge is an element the tests can count) ----

  const KIND_COLORS = { adapter: "#dbeafe", base: "#fde68a", dataset: "#bbf7d0", fused: "#fbcfe8",
    checkpoint: "#e5e7eb", remote: "#ddd6fe" };
  const STATUS_COLORS = { ok: "#16a34a", changed: "#dc2626", missing: "#ea580c", unchecked: "#64748b" };

  async function draw(container, spec) {
    const view = new vega.View(vega.parse(spec), { renderer: "svg", container, hover: true, logLevel: vega.Error });
    await view.runAsync();
    return view;
  }

  // points: [{series, split, step, loss}]; returns {update(points)} so a running run's curve grows in place.
  async function lossChart(container, points, { height = 260 } = {}) {
    const drawable = points.filter((p) => p.loss !== null);
    if (!drawable.length) {
      container.replaceChildren(empty("No losses recorded for this version."));
      return { update: () => {} };
    }
    const width = Math.max(360, (container.clientWidth || 760) - 24);
    const spec = {
      width, height, padding: 8, autosize: { type: "fit-x", contains: "padding" },
      data: [{ name: "points", values: drawable }],
      scales: [
        { name: "x", type: "linear", domain: { data: "points", field: "step" }, range: "width", zero: false, nice: true },
        { name: "y", type: "linear", domain: { data: "points", field: "loss" }, range: "height", zero: false, nice: true },
        { name: "color", type: "ordinal", domain: { data: "points", field: "series", sort: true }, range: "category" },
      ],
      axes: [
        { orient: "bottom", scale: "x", title: "step", tickMinStep: 1 },
        { orient: "left", scale: "y", title: "loss", grid: true, gridOpacity: 0.35 },
      ],
      legends: [{ fill: "color", orient: "right", title: "series", symbolType: "circle" }],
      marks: [
        { type: "group", name: "loss-series",
          from: { facet: { name: "series", data: "points", groupby: "series" } },
          marks: [{ type: "line", name: "loss-line", from: { data: "series" },
            sort: { field: "datum.step" },
            encode: { update: { x: { scale: "x", field: "step" }, y: { scale: "y", field: "loss" },
              stroke: { scale: "color", field: "series" }, strokeWidth: { value: 2 },
              strokeDash: { signal: "datum.split === 'val' ? [6, 3] : [1, 0]" } } } }] },
        { type: "symbol", name: "loss-point", from: { data: "points" },
          encode: { update: { x: { scale: "x", field: "step" }, y: { scale: "y", field: "loss" },
            fill: { scale: "color", field: "series" }, size: { value: 36 },
            shape: { signal: "datum.split === 'val' ? 'square' : 'circle'" },
            tooltip: { signal: "{series: datum.series, step: datum.step, loss: format(datum.loss, '.4f')}" } } } },
      ],
    };
    const view = await draw(container, spec);
    container.dataset.points = String(drawable.length);
    return {
      async update(next) {
        const rows = next.filter((p) => p.loss !== null);
        await view.change("points", vega.changeset().remove(() => true).insert(rows)).runAsync();
        container.dataset.points = String(rows.length);
      },
    };
  }

  function nodeList(graph) {
    return el("ul", { class: "nodes" }, graph.nodes.map((n) => el("li", {},
      el("span", { class: `chip kind-${n.kind}` }, n.kind), " ",
      n.href ? el("a", { href: n.href }, n.label) : el("span", {}, n.label),
      el("span", { class: "muted" }, ` sha256 ${shortSha(n.sha256)}`),
      n.status ? el("span", { class: `status status-${n.status}` }, n.status) : null,
      n.found ? null : el("span", { class: "status status-missing" }, "not in this registry"))));
  }

  // graph: webui/graph.py's layout (nodes placed, edges as SVG paths); drawn as is.
  async function lineageGraph(container, graph) {
    const spec = {
      width: graph.width, height: graph.height, padding: 16, autosize: "pad",
      data: [{ name: "nodes", values: graph.nodes }, { name: "edges", values: graph.edges }],
      scales: [{ name: "kind", type: "ordinal", domain: Object.keys(KIND_COLORS), range: Object.values(KIND_COLORS) },
        { name: "status", type: "ordinal", domain: Object.keys(STATUS_COLORS), range: Object.values(STATUS_COLORS) }],
      marks: [
        { type: "path", name: "lineage-edge", from: { data: "edges" },
          encode: { update: { path: { field: "path" }, stroke: { value: "#64748b" }, strokeWidth: { value: 1.5 } } } },
        { type: "symbol", name: "lineage-arrow", from: { data: "edges" },
          encode: { update: { x: { field: "arrow_x" }, y: { field: "arrow_y" }, shape: { value: "triangle-up" },
            size: { value: 60 }, fill: { value: "#64748b" } } } },
        { type: "rect", name: "lineage-edge-label-bg", from: { data: "edges" },
          encode: { update: { xc: { field: "label_x" }, yc: { field: "label_y" }, height: { value: 15 },
            width: { signal: "length(datum.relation) * 6 + 10" }, fill: { value: "#ffffff" }, opacity: { value: 0.9 } } } },
        { type: "text", name: "lineage-edge-label", from: { data: "edges" },
          encode: { update: { x: { field: "label_x" }, y: { field: "label_y" }, text: { field: "relation" },
            align: { value: "center" }, baseline: { value: "middle" }, fontSize: { value: 10 }, fill: { value: "#334155" } } } },
        { type: "rect", name: "lineage-node", from: { data: "nodes" },
          encode: { update: { x: { field: "x" }, y: { field: "y" }, width: { field: "width" }, height: { field: "height" },
            cornerRadius: { value: 6 }, fill: { scale: "kind", field: "kind" },
            stroke: { signal: "datum.status ? scale('status', datum.status) : datum.found ? '#475569' : '#dc2626'" },
            strokeWidth: { signal: "datum.status || datum.root ? 2.5 : 1" },
            strokeDash: { signal: "datum.found ? [1, 0] : [4, 3]" },
            href: { field: "href" }, cursor: { signal: "datum.href ? 'pointer' : 'default'" }, tooltip: { field: "title" } } } },
        { type: "text", name: "lineage-node-text", from: { data: "nodes" },
          encode: { update: { x: { signal: "datum.x + datum.width / 2" }, y: { signal: "datum.y + 7" },
            text: { signal: "[datum.kind + (datum.status ? ' · ' + datum.status : ''), datum.label, 'sha256 ' + (datum.sha256 ? slice(datum.sha256, 0, 12) : 'unknown')]" },
            align: { value: "center" }, baseline: { value: "top" }, lineHeight: { value: 13 }, fontSize: { value: 11 },
            limit: { signal: "datum.width - 10" }, fill: { value: "#0f172a" },
            href: { field: "href" }, cursor: { signal: "datum.href ? 'pointer' : 'default'" }, tooltip: { field: "title" } } } },
      ],
    };
    const view = await draw(container, spec);
    container.dataset.nodes = String(graph.nodes.length);
    container.dataset.edges = String(graph.edges.length);
    return view;
  }

  return { el, api, fmt, bytes, chips, tagChips, table, kv, section, empty, showError, setTitle, pathKey,
    refPath, versionHref, versionLink, shortSha, lossChart, lineageGraph, nodeList };
})();
