// One training run: progress, loss curves and checkpoints kept; while it runs, polled and redrawn in place.
"use strict";

(async () => {
  const { el, api, fmt, kv, table, section, empty, chips, versionLink, setTitle } = AH;
  const POLL_MS = 2000;
  const id = AH.pathKey();
  setTitle(`Run ${id}`);

  const summary = (r) => kv([
    ["name", r.name], ["status", el("span", { class: `status status-${r.status}`, id: "run-status" }, r.status)],
    ["progress", el("span", { id: "run-progress" }, el("progress", { max: r.iters, value: r.step }), ` step ${r.step} of ${r.iters}`)],
    ["base", r.base ? el("a", { href: `base/${r.base.sha256}` }, r.base.name) : "–"],
    ["dataset", r.dataset ? el("a", { href: `dataset/${r.dataset.sha256}` }, r.dataset.name) : "–"], ["parent", r.parent ? versionLink(r.parent) : "–"],
    ["result", r.result ? versionLink(r.result) : "–"], ["trained tokens", r.trained_tokens],
    ["train seconds", r.train_seconds], ["started", r.started_at], ["finished", r.finished_at]]);
  const checkpoints = (rows) => (rows.length ? table([
    { label: "step", class: "num", cell: (c) => c.step }, { label: "train loss", class: "num", cell: (c) => fmt(c.train_loss) },
    { label: "val loss", class: "num", cell: (c) => fmt(c.val_loss) },
    { label: "kept because", cell: (c) => (c.kept_because.length ? chips(c.kept_because) : "–") },
    { label: "file", class: "mono", cell: (c) => c.file }], rows, { id: "checkpoints" }) : empty("No checkpoints on disk."));
  const series = (points) => points.map((p) => ({ ...p, series: p.split }));

  try {
    let data = await api(`api/run/${encodeURIComponent(id)}`);
    const chart = el("div", { class: "chart", id: "loss-chart" });
    const summaryBox = el("div", { id: "summary" }, summary(data.run));
    const checkpointBox = el("div", { id: "checkpoint-box" }, checkpoints(data.checkpoints));
    document.getElementById("app").replaceChildren(
      el("h1", {}, "Run ", el("span", { class: "mono" }, data.run.id)),
      section("Progress", summaryBox), section("Loss curves", chart), section("Checkpoints kept", checkpointBox),
      section("Configuration", table([{ label: "option", cell: (r) => r[0] }, { label: "value", class: "mono", cell: (r) => fmt(r[1]) }],
        Object.entries(data.config), { id: "config" })));
    // A run with no losses yet draws its chart on the first poll that brings some.
    let drawn = data.losses.some((p) => p.loss !== null) ? await AH.lossChart(chart, series(data.losses)) : null;
    if (!drawn) chart.replaceChildren(empty("No losses reported yet."));
    document.body.dataset.ready = "1";
    const poll = async () => {
      if (data.run.status !== "running") return;
      try {
        data = await api(`api/run/${encodeURIComponent(id)}`);
        summaryBox.replaceChildren(summary(data.run));
        checkpointBox.replaceChildren(checkpoints(data.checkpoints));
        if (drawn) await drawn.update(series(data.losses));
        else if (data.losses.some((p) => p.loss !== null)) drawn = await AH.lossChart(chart, series(data.losses));
        document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
      } catch (error) {
        summaryBox.prepend(el("p", { class: "error" }, error.message));
      }
      setTimeout(poll, POLL_MS);
    };
    setTimeout(poll, POLL_MS);
  } catch (error) {
    AH.showError(error);
    document.body.dataset.ready = "error";
  }
})();
