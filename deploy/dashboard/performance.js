// The performance page: GET /api/performance of the archive that serves this page
// (docs/collector.md), one row and one chart per model version.  No inline script (CSP).
"use strict";

(function performancePage() {
  const SERIES = [
    { key: "sensitivity", label: "sensitivity", stroke: "#c0392b" },
    { key: "specificity", label: "specificity", stroke: "#2471a3" },
    { key: "referral_rate", label: "referral rate", stroke: "#b7950b" },
  ];
  const charts = [];

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function pct(p) {
    if (!p || p.value === null || p.value === undefined) return "n/a";
    const ci = p.ci95 ? ` [${(100 * p.ci95[0]).toFixed(0)}–${(100 * p.ci95[1]).toFixed(0)}]` : "";
    return `${(100 * p.value).toFixed(1)} %${ci} (${p.successes}/${p.n})`;
  }

  function query(form) {
    const params = new URLSearchParams();
    for (const [key, value] of new FormData(form).entries()) {
      if (value === "") continue;
      params.set(key, key === "since" ? `${value}T00:00:00Z` : String(value));
    }
    return params.toString();
  }

  async function load(form) {
    const note = document.getElementById("perf-note");
    note.textContent = "Loading…";
    const text = query(form);
    const response = await fetch(`api/performance${text ? `?${text}` : ""}`, { cache: "no-store" });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = JSON.stringify((await response.json()).detail); } catch (err) { /* not JSON */ }
      note.textContent = `The archive answered ${response.status}: ${detail}`;
      return;
    }
    const body = await response.json();
    render(body);
    note.textContent = `${body.counts.results} results, ${body.counts.reviewed} reviewed; computed ${body.computed_at}`;
  }

  function alertText(model) {
    if (!model.alerts.length) return model.validated ? "none" : "no validated baseline";
    return model.alerts.map((a) => `${a.kind}: ${a.metric}`).join("; ");
  }

  function render(body) {
    const tbody = document.querySelector("#perf-models tbody");
    tbody.replaceChildren();
    for (const m of body.models) {
      const row = document.createElement("tr");
      const c = m.confusion;
      const psi = m.drift && m.drift.p_high && m.drift.p_high.psi;
      const cells = [
        `${m.model} v${m.version}`, m.counts.results, m.counts.reviewed,
        `${c.tp} ${c.fn} ${c.tn} ${c.fp}`, pct(m.sensitivity), pct(m.specificity),
        pct(m.referral_rate), pct(m.qc_failure_rate), pct(m.out_of_range_rate),
        psi === null || psi === undefined ? "n/a" : psi.toFixed(2), alertText(m),
      ];
      for (const value of cells) row.append(el("td", String(value)));
      if (m.alerts.length) row.className = "alerting";
      tbody.append(row);
    }
    document.getElementById("model-count").textContent = String(body.models.length);
    drawCharts(body.models);
  }

  function drawCharts(models) {
    while (charts.length) charts.pop().destroy();
    const holder = document.getElementById("perf-charts");
    holder.replaceChildren();
    for (const m of models) {
      const figure = el("figure", null, "perf-chart");
      figure.setAttribute("aria-label", `${m.model} v${m.version} over time`);
      figure.append(el("figcaption", `${m.model} v${m.version}: per day (UTC)`));
      holder.append(figure);
      const days = m.over_time.map((d) => Date.parse(`${d.day}T12:00:00Z`) / 1000);
      const data = [days, ...SERIES.map((s) => m.over_time.map((d) => (d[s.key].value === null ? null : d[s.key].value)))];
      const opts = {
        width: Math.min(720, holder.clientWidth || 720),
        height: 220,
        scales: { y: { range: [0, 1] } },
        series: [{}, ...SERIES.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, points: { show: true } }))],
        axes: [{}, { values: (u, ticks) => ticks.map((t) => `${Math.round(100 * t)} %`) }],
      };
      charts.push(new window.uPlot(opts, data, figure));
    }
  }

  function start() {
    const form = document.getElementById("perf-filters");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      load(form).catch((err) => { document.getElementById("perf-note").textContent = String(err); });
    });
    form.addEventListener("reset", () => setTimeout(() => form.requestSubmit(), 0));
    load(form).catch((err) => { document.getElementById("perf-note").textContent = String(err); });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
