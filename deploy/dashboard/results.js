// Results: the table (history from the archive + live results), filters, the spectrum chart with
// its render-window zoom, and the slide detail with per-field quality control.
"use strict";

window.Omis.Results = class Results {
  constructor(archive) {
    const { el } = window.Omis;
    this.el = el;
    this.archive = archive;
    this.rows = []; // newest first
    this.byId = new Map();
    this.selected = null;
    this.chart = null;
    this.fullAxis = false;
    this.shown = null; // the result in the chart
    this.filters = {};
    this.offset = 0;
    this.total = null; // archived rows matching the filters, grows with live rows
    this.onSelect = null; // (messageId, stored) after a row's archive record loaded
    this.body = document.getElementById("results").tBodies[0];
  }

  // ------------------------------------------------------------------ history ----

  async loadHistory(more) {
    const note = document.getElementById("history-note");
    if (!this.archive.enabled) { note.textContent = "No archive on this server: showing live results only."; return; }
    const PAGE = 100;
    try {
      const page = await this.archive.results(this.filters, PAGE, more ? this.offset : 0);
      if (!more) this.clear();
      for (const item of page.items) this.append(window.Omis.rowOf(item));
      this.offset = (more ? this.offset : 0) + page.items.length;
      this.total = page.total;
      this.updateNote();
      document.getElementById("more").hidden = this.offset >= page.total;
      if (!this.selected && this.rows.length) this.select(this.rows[0]);
    } catch (err) {
      note.textContent = `History unavailable (${err.message}): showing live results only.`;
    }
  }

  updateNote() {
    if (this.total === null) return;
    document.getElementById("history-note").textContent = `${this.total} archived result(s) match; ${this.rows.length} shown.`;
  }

  clear() {
    this.rows = [];
    this.byId.clear();
    this.body.replaceChildren();
    this.selected = null;
    this.updateCount();
  }

  readFilters() {
    const form = document.getElementById("filters");
    const value = (name) => form.elements[name].value.trim();
    const time = (name) => (value(name) ? new Date(value(name)).toISOString() : "");
    this.filters = {
      slide: value("slide"), device: value("device"), outcome: value("outcome"), risk: value("risk"),
      review: value("review"), since: time("since"), until: time("until"),
    };
    return this.filters;
  }

  matches(row) {
    const f = this.filters;
    if (f.device && row.device_id !== f.device) return false;
    if (f.outcome && row.outcome !== f.outcome) return false;
    if (f.risk && row.risk !== f.risk) return false;
    if (f.review && String(row.review) !== f.review) return false;
    if (f.slide && !String(row.slide_id).toLowerCase().includes(f.slide.toLowerCase())) return false;
    const at = row.finished_at ? new Date(row.finished_at).getTime() : NaN;
    if (f.since && !(at >= new Date(f.since).getTime())) return false;
    if (f.until && !(at < new Date(f.until).getTime())) return false;
    return true;
  }

  // ---------------------------------------------------------------------- rows ----

  // A live result: false when it was already shown (a redelivery) or is filtered out.
  addLive(result) {
    const row = window.Omis.rowOf(result);
    if (this.byId.has(row.message_id) || !this.matches(row)) return false;
    this.rows.unshift(row);
    this.byId.set(row.message_id, row);
    this.body.insertBefore(this.buildRow(row), this.body.firstChild);
    if (this.total !== null) this.total += 1; // the archive stores it too: the count stays true
    this.updateCount();
    this.updateNote();
    if (!this.selected || this.selected === (this.rows[1] && this.rows[1].message_id)) this.select(row); // follow the newest
    return true;
  }

  append(row) {
    if (this.byId.has(row.message_id)) return;
    this.rows.push(row);
    this.byId.set(row.message_id, row);
    this.body.append(this.buildRow(row));
    this.updateCount();
  }

  updateCount() {
    document.getElementById("result-count").textContent = String(this.rows.length);
  }

  buildRow(row) {
    const { el, localTime, outcomeText, modelText, callOf, fixed } = window.Omis;
    const tr = el("tr");
    tr.dataset.messageId = row.message_id;
    tr.dataset.outcome = row.outcome;
    tr.tabIndex = 0;
    const outcome = el("td", "outcome");
    outcome.append(el("span", `badge outcome-${row.outcome}`, row.outcome));
    if (row.outcome !== "classified") outcome.append(el("span", "reason", outcomeText(row).slice(row.outcome.length).replace(/^: /, "")));
    const label = el("td", "label");
    const call = callOf(row);
    label.append(el("span", `badge ${call.badge}`, call.text));
    const spark = el("td", "spark");
    spark.append(this.sparkline(row.result && row.result.spectrum));
    tr.append(el("td", "time", localTime(row.finished_at)), el("td", "dev", row.device_id), el("td", "slide", row.slide_id),
      outcome, label, el("td", "phigh", fixed(row.p_high, 3)),
      el("td", "model", modelText(row.model_name, row.model_version)), spark);
    tr.addEventListener("click", () => this.select(row));
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); this.select(row); } });
    return tr;
  }

  sparkline(spectrum) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 100 24");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "sparkline");
    svg.setAttribute("aria-hidden", "true");
    const values = Results.numbers(spectrum && spectrum.values);
    if (values.length > 1) {
      const lo = Math.min(...values);
      const span = Math.max(...values) - lo || 1;
      const points = values.map((v, i) => `${((i / (values.length - 1)) * 100).toFixed(2)},${(22 - ((v - lo) / span) * 20).toFixed(2)}`);
      const line = document.createElementNS(NS, "polyline");
      line.setAttribute("points", points.join(" "));
      svg.append(line);
    }
    return svg;
  }

  // --------------------------------------------------------- selection, detail ----

  static numbers(value) {
    return Array.isArray(value) ? value.map((v) => (typeof v === "number" && Number.isFinite(v) ? v : NaN)) : [];
  }

  // Select a row (of this table or of the worklist): chart, detail, and the archive's record
  // (with its reviews) for the review panel.
  async select(row) {
    this.selected = row.message_id;
    for (const tr of this.body.rows) tr.classList.toggle("selected", tr.dataset.messageId === this.selected);
    let result = row.result;
    let stored = null;
    if (this.archive.enabled) {
      try {
        stored = await this.archive.result(row.message_id);
        result = result || window.Omis.obj(stored.result);
        row.result = result;
      } catch (err) {
        if (!result) {
          document.getElementById("detail").hidden = false;
          document.getElementById("detail-note").textContent = `Cannot load ${row.slide_id}: ${err.message}`;
          return;
        }
      }
    }
    if (this.selected !== row.message_id || !result) return; // another row was picked meanwhile
    this.showChart(result, row);
    this.showDetail(result, row);
    if (this.onSelect) this.onSelect(row, stored);
  }

  showDetail(result, row) {
    const { el, localTime, outcomeText, modelText, text, obj, list, fixed, num } = window.Omis;
    const section = document.getElementById("detail");
    section.hidden = false;
    document.getElementById("detail-note").textContent = "";
    const facts = document.getElementById("detail-facts");
    facts.replaceChildren();
    const model = obj(result.model);
    const call = window.Omis.callOf(row);
    for (const [key, label, value] of [
      ["slide", "Slide", row.slide_id], ["device", "Device", row.device_id],
      ["time", "Finished", localTime(row.finished_at)], ["outcome", "Outcome", outcomeText(row)],
      ["call", "Call", call.text], ["phigh", "p(high)", fixed(row.p_high, 3)],
      ["model", "Model", `${modelText(text(model.name), text(model.version))} · ${(text(model.sha256) || "").slice(0, 12)}`],
    ]) {
      const item = el("div", `fact fact-${key}`);
      item.append(el("dt", "", label), el("dd", "", value));
      facts.append(item);
    }
    const body = document.getElementById("qc").tBodies[0];
    body.replaceChildren();
    for (const entry of list(result.fields)) {
      const field = obj(entry);
      const quality = text(field.quality) || "–";
      const valid = num(field.valid_fraction);
      const reasons = list(field.reasons).map((r) => text(r) ?? JSON.stringify(r)).join("; ");
      const tr = el("tr");
      tr.dataset.quality = quality;
      tr.append(el("td", "", text(field.index) ?? "–"), el("td", "", valid === null ? "–" : `${(100 * valid).toFixed(1)} %`),
        el("td", `quality ${quality === "ok" ? "quality-ok" : "quality-bad"}`, quality), el("td", "reasons", reasons || "–"));
      body.append(tr);
    }
  }

  // --------------------------------------------------------------------- chart ----

  // The model's render window when the result names it, else where the signal is (the
  // wavelength-difference axis is far wider than the signal; the full axis stays a toggle away).
  static window(spectrum) {
    const named = spectrum.x_range_nm || spectrum.render_window_nm;
    if (Array.isArray(named) && named.length === 2 && named.every((v) => typeof v === "number")) return { min: named[0], max: named[1], source: "render window" };
    const axis = Results.numbers(spectrum.axis);
    const values = Results.numbers(spectrum.values);
    const peak = Math.max(0, ...values.map(Math.abs));
    const inside = axis.filter((x, i) => peak > 0 && Math.abs(values[i]) >= 0.02 * peak);
    if (inside.length < 2) return null;
    const lo = Math.min(...inside);
    const hi = Math.max(...inside);
    const pad = Math.max((hi - lo) * 0.15, 1);
    return { min: Math.max(axis[0], lo - pad), max: Math.min(axis[axis.length - 1], hi + pad), source: "signal window" };
  }

  showChart(result, row) {
    const raw = window.Omis.obj(result.spectrum);
    const s = { ...raw, axis: Results.numbers(raw.axis), values: Results.numbers(raw.values) };
    this.shown = s;
    const call = window.Omis.callOf(row).text;
    document.getElementById("chart-caption").textContent = `${row.device_id} · ${row.slide_id} · ${call} · ${window.Omis.text(s.algorithm) || ""}`;
    const data = [Float64Array.from(s.axis), Float64Array.from(s.values)];
    if (this.chart) this.chart.setData(data);
    else {
      this.chart = new uPlot(this.chartOptions(), data, document.getElementById("chart"));
      document.getElementById("chart").dataset.ready = "true";
    }
    this.applyZoom();
  }

  toggleZoom() {
    this.fullAxis = !this.fullAxis;
    this.applyZoom();
  }

  applyZoom() {
    const button = document.getElementById("chart-zoom");
    button.setAttribute("aria-pressed", String(this.fullAxis));
    const chartEl = document.getElementById("chart");
    if (!this.chart || !this.shown) return;
    const axis = this.shown.axis || [];
    const win = Results.window(this.shown);
    const range = this.fullAxis || !win ? { min: axis[0], max: axis[axis.length - 1], source: "full axis" } : win;
    button.textContent = this.fullAxis ? "Zoom to the signal" : "Show the full axis";
    if (axis.length > 1) this.chart.setScale("x", { min: range.min, max: range.max });
    chartEl.dataset.xmin = String(range.min);
    chartEl.dataset.xmax = String(range.max);
    document.getElementById("chart-range").textContent = axis.length > 1 ? `${range.source}: ${range.min.toFixed(1)} to ${range.max.toFixed(1)} nm` : "";
  }

  chartOptions() {
    return {
      width: this.chartWidth(),
      height: 260,
      scales: { x: { time: false, auto: false } },
      axes: [{ label: "wavelength difference (nm)" }, { label: "intensity" }],
      series: [{ label: "nm" }, { label: "spectrum", stroke: "#1565c0", width: 2, fill: "rgba(21,101,192,0.10)" }],
      legend: { show: false },
    };
  }

  chartWidth() {
    return Math.max(280, document.getElementById("chart").clientWidth || 600);
  }

  resize() {
    if (this.chart) this.chart.setSize({ width: this.chartWidth(), height: 260 });
  }
};
