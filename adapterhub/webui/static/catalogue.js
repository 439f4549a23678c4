// The catalogue: one row per name (its latest matching version) or per version, filtered, sorted, paged
// by the server (api/catalogue); the filters live in the address, so a filtered view is a link.
"use strict";

(() => {
  const { el, api, fmt, tagChips, chips, versionLink, setTitle, showError } = AH;
  const COLUMNS = [
    { key: "name", label: "name" }, { key: "version", label: "latest", num: true },
    { key: "versions", label: "versions", num: true }, { key: "kind", label: "kind" },
    { key: "rank", label: "rank", num: true }, { key: "base", label: "base" }, { key: "tags", label: "tags" },
    { key: "aliases", label: "aliases" }, { key: "eval", label: "evaluations" }, { key: "created_at", label: "created" },
  ];
  const state = new URLSearchParams(location.search);
  const selected = new Set();
  let facets = null;
  let timer = null;

  function query() {
    const q = new URLSearchParams();
    for (const key of ["base", "kind", "name", "versions", "sort", "offset", "limit"]) {
      if (state.get(key)) q.set(key, state.get(key));
    }
    for (const tag of state.getAll("tag")) if (tag) q.append("tag", tag);
    return q;
  }

  function go(changes, resetPage = true) {
    for (const [key, value] of Object.entries(changes)) {
      if (value === null || value === "") state.delete(key); else state.set(key, value);
    }
    if (resetPage) state.delete("offset");
    history.replaceState(null, "", `${location.pathname}${state.toString() ? "?" + state : ""}`);
    load();
  }

  function filters() {
    const scores = facets.scores || [];
    const option = (value, text, current) => el("option", { value, selected: value === (current || "") }, text);
    const form = el("form", { class: "filters", id: "filters", onsubmit: (e) => e.preventDefault() },
      el("label", {}, "name", el("input", { id: "f-name", type: "search", placeholder: "text or glob, e.g. sql-*",
        value: state.get("name") || "", oninput: (e) => { clearTimeout(timer); timer = setTimeout(() => go({ name: e.target.value.trim() }), 250); } })),
      el("label", {}, "base", el("select", { id: "f-base", onchange: (e) => go({ base: e.target.value }) },
        option("", "any base", state.get("base")),
        facets.bases.map((b) => option(b.sha256, `${b.name} (${b.versions})`, state.get("base"))))),
      el("label", {}, "kind", el("select", { id: "f-kind", onchange: (e) => go({ kind: e.target.value }) },
        option("", "any kind", state.get("kind")),
        ["lora", "dora", "loreft"].map((k) => option(k, `${k} (${facets.kinds[k] || 0})`, state.get("kind"))))),
      el("label", {}, "tag", el("input", { id: "f-tag", list: "tag-values", placeholder: "key=value",
        value: state.get("tag") || "", onchange: (e) => go({ tag: e.target.value.trim() }) })),
      el("datalist", { id: "tag-values" }, Object.keys(facets.tags).map((t) => el("option", { value: t }))),
      el("label", {}, "show", el("select", { id: "f-versions", onchange: (e) => go({ versions: e.target.value }) },
        option("", "latest version of each name", state.get("versions")), option("all", "every version", state.get("versions")))),
      el("label", {}, "score", el("select", { id: "f-score", disabled: !scores.length,
        onchange: (e) => go({ sort: e.target.value ? `eval:${e.target.value}` : "" }) },
        option("", scores.length ? "sort by a score…" : "no scores recorded", ""),
        scores.map((s) => option(s, s, (state.get("sort") || "").replace(/^-?eval:/, ""))))),
      el("button", { type: "button", id: "compare-selected", disabled: selected.size < 2,
        onclick: () => { location.href = `compare?refs=${[...selected].map(encodeURIComponent).join(",")}`; } },
        `Compare selected (${selected.size})`));
    return form;
  }

  function cell(row, key) {
    switch (key) {
      case "name": return el("a", { href: AH.versionHref(row.ref) }, row.name);
      case "base": return row.base ? el("a", { href: `base/${row.base.sha256}` }, row.base.name) : "–";
      case "tags": return tagChips(row.tags);
      case "aliases": return chips(Object.entries(row.aliases).map(([a, v]) => `${a} → @${v}`), "chip alias");
      case "eval": return chips(Object.entries(row.scores).map(([s, r]) => `${s} ${fmt(r.value)} (${r.dataset})`), "chip score");
      case "created_at": return row.created_at.replace("T", " ").replace("Z", "");
      default: return fmt(row[key]);
    }
  }

  function header(column) {
    const sort = state.get("sort") || "name";
    const firstScore = (facets.scores || [])[0];
    const key = column.key === "eval" ? (sort.replace(/^-/, "").startsWith("eval:") ? sort.replace(/^-/, "") : firstScore && `eval:${firstScore}`) : column.key;
    const current = sort.replace(/^-/, "") === key ? (sort.startsWith("-") ? "desc" : "asc") : null;
    return el("th", { class: [key ? "sortable" : "", current ? `sorted-${current}` : "", column.num ? "num" : ""].join(" ").trim(),
      dataset: { column: column.key }, title: key ? `sort by ${key}` : "no scores recorded",
      onclick: key ? () => go({ sort: current === "asc" ? `-${key}` : key }) : null }, column.label);
  }

  function render(page) {
    const app = document.getElementById("app");
    const latest = state.get("versions") !== "all";
    const columns = latest ? COLUMNS : COLUMNS.filter((c) => c.key !== "versions").map((c) => (c.key === "version" ? { ...c, label: "version" } : c));
    const table = el("table", { id: "catalogue" },
      el("thead", {}, el("tr", {}, el("th", {}, ""), columns.map(header))),
      el("tbody", {}, page.rows.map((row) => el("tr", { dataset: { ref: row.ref } },
        el("td", {}, el("input", { type: "checkbox", title: `compare ${row.ref}`, checked: selected.has(row.ref),
          onchange: (e) => { if (e.target.checked) selected.add(row.ref); else selected.delete(row.ref); refreshCompare(); } })),
        columns.map((c) => el("td", { class: `${c.key}${c.num ? " num" : ""}` }, cell(row, c.key)))))));
    const first = page.total ? page.offset + 1 : 0;
    const last = page.offset + page.rows.length;
    const pager = el("div", { class: "pager", id: "pager" },
      el("button", { type: "button", id: "prev", disabled: page.offset === 0,
        onclick: () => go({ offset: String(Math.max(0, page.offset - page.limit)) }, false) }, "‹ Prev"),
      el("span", { id: "range" }, `${first}–${last} of ${page.total} ${latest ? "names" : "versions"}`),
      el("button", { type: "button", id: "next", disabled: last >= page.total,
        onclick: () => go({ offset: String(page.offset + page.limit) }, false) }, "Next ›"),
      el("label", {}, "rows ", el("select", { onchange: (e) => go({ limit: e.target.value }) },
        ["25", "50", "100", "250"].map((n) => el("option", { value: n, selected: (state.get("limit") || "50") === n }, n)))));
    app.replaceChildren(
      el("h1", {}, "Catalogue"),
      el("p", { class: "muted", id: "totals" }, `${page.names_total} names, ${page.versions_total} versions in this registry`),
      filters(), page.rows.length ? table : AH.empty("No adapters match these filters."), pager);
    const focused = document.getElementById("f-name");
    if (document.activeElement === document.body && state.get("name")) focused.focus();
  }

  function refreshCompare() {
    const button = document.getElementById("compare-selected");
    button.disabled = selected.size < 2;
    button.textContent = `Compare selected (${selected.size})`;
  }

  async function load() {
    try {
      const nameBox = document.getElementById("f-name");
      const typing = nameBox && document.activeElement === nameBox;
      const [facetData, page] = await Promise.all([facets ? facets : api("api/facets"), api(`api/catalogue?${query()}`)]);
      facets = facetData;
      render(page);
      if (typing) {
        const box = document.getElementById("f-name");
        box.focus();
        box.setSelectionRange(box.value.length, box.value.length);
      }
      document.body.dataset.ready = "1";
    } catch (error) {
      showError(error);
      document.body.dataset.ready = "error";
    }
  }

  setTitle("Catalogue");
  load();
})();
