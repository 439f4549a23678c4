// Versions side by side: properties, hyper-parameters and shared evaluations (differences and bests
// highlighted), with their loss curves overlaid.
"use strict";

(async () => {
  const { el, api, fmt, versionLink, setTitle, empty } = AH;
  const params = new URLSearchParams(location.search);
  const refs = params.getAll("refs").flatMap((r) => r.split(",")).map((r) => r.trim()).filter(Boolean);
  setTitle("Compare");

  function picker() {
    const input = el("input", { id: "refs", size: 60, value: refs.join(", "), placeholder: "name@1, name@2, …" });
    return el("form", { class: "filters", onsubmit: (e) => {
      e.preventDefault();
      const list = input.value.split(",").map((r) => r.trim()).filter(Boolean);
      location.href = `compare?refs=${list.map(encodeURIComponent).join(",")}`;
    } }, el("label", {}, "versions (refs, comma-separated)", input), el("button", { type: "submit" }, "Compare"));
  }

  const app = document.getElementById("app");
  if (refs.length < 2) {
    app.replaceChildren(el("h1", {}, "Compare"), picker(),
      empty("Give two or more versions, or tick them in the catalogue and press “Compare selected”."));
    document.body.dataset.ready = "1";
    return;
  }
  try {
    const data = await api(`api/compare?refs=${refs.map(encodeURIComponent).join(",")}`);
    setTitle(`Compare ${data.columns.map((c) => c.ref).join(", ")}`);
    const body = [];
    let section = null;
    for (const row of data.rows) {
      if (row.section !== section) {
        section = row.section;
        body.push(el("tr", { class: "section" }, el("th", { colspan: data.columns.length + 1 }, section)));
      }
      body.push(el("tr", { class: row.differs ? "differs" : "" },
        el("th", {}, row.field, row.dataset ? el("span", { class: "muted" }, ` (${row.dataset})`) : null),
        row.values.map((value, i) => el("td", {
          class: [row.best.includes(i) ? "best" : row.differs ? "differs" : "", typeof value === "number" ? "num" : ""].join(" ").trim(),
        }, fmt(value)))));
    }
    const chart = el("div", { class: "chart", id: "loss-chart" });
    app.replaceChildren(
      el("h1", {}, "Compare"), picker(),
      el("p", { class: "muted" }, "Yellow: the versions differ. Green: the best value of a score. ",
        data.not_shared ? `${data.not_shared} evaluation(s) recorded on some of these versions only are not shown.` : ""),
      el("table", { id: "comparison" },
        el("thead", {}, el("tr", {}, el("th", {}, ""), data.columns.map((c) => el("th", { dataset: { ref: c.ref } }, versionLink(c.ref))))),
        el("tbody", {}, body)),
      el("h2", {}, "Loss curves"), chart);
    await AH.lossChart(chart, data.losses.map((p) => ({ ...p, series: `${p.ref} ${p.split}` })));
    document.body.dataset.ready = "1";
  } catch (error) {
    AH.showError(error);
    document.body.dataset.ready = "error";
  }
})();
