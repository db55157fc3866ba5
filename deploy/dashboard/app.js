// OMIS appliance dashboard: MQTT over WebSockets (mqtt.js browser bundle), charts with uPlot.
// Topics and payloads: docs/mqtt.md (omis/v1/<device>/availability|status|result|ota/state).
// Every value from the broker is shown through textContent, never parsed as HTML.
"use strict";

(function main() {
  const STORAGE_KEY = "omis-dashboard.settings";
  const DEVICE_ID = /^[A-Za-z0-9_-]{1,64}$/;
  const MAX_ROWS = 200;
  const KINDS = ["availability", "status", "result", "ota/state"];

  const $ = (id) => document.getElementById(id);
  const devices = new Map(); // id -> device record
  const results = []; // newest first
  let client = null;
  let chart = null;
  let selected = null; // message_id of the result shown in the chart
  let ignored = 0;

  // ------------------------------------------------------------------ settings ----

  function defaultUrl() {
    const secure = window.location.protocol === "https:";
    const host = window.location.hostname || "localhost";
    return `${secure ? "wss" : "ws"}://${host}:8884/mqtt`;
  }

  function loadSettings() {
    const settings = { url: defaultUrl(), username: "", password: "", prefix: "omis/v1", remember: false };
    try {
      Object.assign(settings, JSON.parse(window.localStorage.getItem(STORAGE_KEY) || "{}"));
    } catch (err) {
      console.warn("ignoring unreadable saved settings", err);
    }
    const query = new URLSearchParams(window.location.search);
    const fromQuery = { broker: "url", url: "url", username: "username", password: "password", prefix: "prefix" };
    for (const [param, key] of Object.entries(fromQuery)) {
      if (query.has(param)) settings[key] = query.get(param);
    }
    settings.prefix = settings.prefix.replace(/\/+$/, "");
    return settings;
  }

  function saveSettings(settings) {
    const stored = { url: settings.url, username: settings.username, prefix: settings.prefix, remember: settings.remember };
    if (settings.remember) stored.password = settings.password;
    window.localStorage.setItem(STORAGE_KEY, JSON.stringify(stored));
  }

  function fillForm(settings) {
    const form = $("settings");
    for (const key of ["url", "username", "password", "prefix"]) form.elements[key].value = settings[key] || "";
    form.elements.remember.checked = Boolean(settings.remember);
  }

  function readForm() {
    const form = $("settings");
    return {
      url: form.elements.url.value.trim(),
      username: form.elements.username.value.trim(),
      password: form.elements.password.value,
      prefix: form.elements.prefix.value.trim().replace(/\/+$/, ""),
      remember: form.elements.remember.checked,
    };
  }

  function showSettings(open) {
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  }

  // ---------------------------------------------------------------- connection ----

  function setConnection(state, detail) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = detail ? `${state}: ${detail}` : state;
  }

  function connect(settings) {
    disconnect();
    setConnection("connecting", settings.url);
    const options = {
      protocolVersion: 5,
      clientId: `omis-dash-${Math.random().toString(16).slice(2, 10)}`,
      clean: true,
      reconnectPeriod: 3000,
      connectTimeout: 8000,
    };
    if (settings.username) options.username = settings.username;
    if (settings.password) options.password = settings.password;
    client = mqtt.connect(settings.url, options);
    const prefix = settings.prefix;
    client.on("connect", () => {
      setConnection("connected", settings.url);
      const filters = Object.fromEntries(KINDS.map((kind) => [`${prefix}/+/${kind}`, { qos: 1 }]));
      client.subscribe(filters, (err) => { if (err) setConnection("error", `subscribe: ${err.message}`); });
    });
    client.on("reconnect", () => setConnection("connecting", settings.url));
    client.on("offline", () => setConnection("disconnected", "broker unreachable"));
    client.on("error", (err) => setConnection("error", err.message));
    client.on("message", (topic, payload) => onMessage(prefix, topic, payload));
  }

  function disconnect() {
    if (client) {
      client.end(true);
      client = null;
    }
    setConnection("disconnected");
  }

  // ------------------------------------------------------------------ messages ----

  function onMessage(prefix, topic, payload) {
    const head = `${prefix}/`;
    if (!topic.startsWith(head)) return;
    const rest = topic.slice(head.length);
    const slash = rest.indexOf("/");
    const deviceId = rest.slice(0, slash);
    const handler = HANDLERS[rest.slice(slash + 1)];
    if (slash < 1 || !DEVICE_ID.test(deviceId) || !handler) return;
    const text = new TextDecoder().decode(payload);
    try {
      handler(device(deviceId), text);
    } catch (err) {
      ignored += 1;
      const note = $("ignored");
      note.hidden = false;
      note.textContent = `${ignored} malformed message(s) ignored; last on ${topic}: ${err.message}`;
    }
  }

  function parseJson(text, schema) {
    const data = JSON.parse(text);
    if (!data || data.schema !== schema) throw new Error(`not ${schema}`);
    return data;
  }

  const HANDLERS = {
    availability(dev, text) {
      if (!text) { devices.delete(dev.id); dev.card.remove(); renderDeviceCount(); return; } // retained cleared
      dev.availability = text;
      renderDevice(dev);
    },
    status(dev, text) {
      dev.status = parseJson(text, "omis.status/1");
      renderDevice(dev);
    },
    "ota/state"(dev, text) {
      dev.ota = parseJson(text, "omis.ota_state/1");
      renderDevice(dev);
    },
    result(dev, text) {
      const result = parseJson(text, "omis.result/1");
      if (results.some((r) => r.message_id === result.message_id)) return; // redelivery
      countResult(dev, result);
      addResult(result);
      renderDevice(dev);
    },
  };

  // ------------------------------------------------------------------- devices ----

  function device(id) {
    let dev = devices.get(id);
    if (!dev) {
      dev = { id, availability: "unknown", status: null, ota: null, model: null, counts: { total: 0, abstained: 0, labels: {} } };
      dev.card = buildCard(id);
      devices.set(id, dev);
      const cards = [...devices.keys()].sort();
      const next = cards[cards.indexOf(id) + 1];
      $("devices").insertBefore(dev.card, next ? devices.get(next).card : null);
      renderDeviceCount();
    }
    return dev;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function buildCard(id) {
    const card = el("article", "device");
    card.dataset.device = id;
    card.dataset.testid = "device-card";
    const top = el("div", "device-top");
    top.append(el("h3", "device-id", id), el("span", "badge availability"), el("span", "badge state"));
    const facts = el("dl", "facts");
    for (const [key, label] of [["model", "Model"], ["ota", "Store"], ["engine", "Engine"], ["app", "App"], ["queue", "Queue"], ["error", "Last error"]]) {
      const row = el("div", `fact fact-${key}`);
      row.append(el("dt", "", label), el("dd", "", "–"));
      facts.append(row);
    }
    const counts = el("p", "counts");
    card.append(top, facts, counts);
    return card;
  }

  function setFact(card, key, text) {
    const row = card.querySelector(`.fact-${key}`);
    row.querySelector("dd").textContent = text;
    row.hidden = text === null;
  }

  function modelText(model) {
    return model && model.name !== undefined ? `${model.name} v${model.version}` : "–";
  }

  function renderDevice(dev) {
    const card = dev.card;
    const status = dev.status || {};
    const avail = card.querySelector(".availability");
    avail.textContent = dev.availability;
    avail.dataset.value = dev.availability;
    card.dataset.availability = dev.availability; // a stopped/offline device's status is stale
    const state = card.querySelector(".state");
    state.textContent = status.state || "no status";
    state.dataset.value = status.state || "unknown";
    setFact(card, "model", modelText(status.model || dev.model));
    setFact(card, "ota", dev.ota ? `current v${dev.ota.current ?? "–"}, previous v${dev.ota.previous ?? "–"}${dev.ota.pending != null ? `, pending v${dev.ota.pending}` : ""}` : null);
    const engine = status.engine;
    setFact(card, "engine", engine && typeof engine === "object" ? [engine.name, engine.precision].filter(Boolean).join(" ") : engine || "–");
    setFact(card, "app", status.app_version || "–");
    setFact(card, "queue", status.queue ? `${status.queue.depth}/${status.queue.capacity}, outbox ${status.outbox ? status.outbox.rows : "–"}` : "–");
    setFact(card, "error", status.last_error ? status.last_error.message : null);
    const c = dev.counts;
    const labels = Object.entries(c.labels).sort().map(([label, n]) => `${label} ${n}`).join(" · ");
    card.querySelector(".counts").textContent = `${c.total} result(s)${labels ? ` · ${labels}` : ""} · abstained ${c.abstained}`;
  }

  function renderDeviceCount() {
    $("device-count").textContent = String(devices.size);
    $("no-devices").hidden = devices.size > 0;
  }

  function countResult(dev, result) {
    const p = result.prediction || {};
    dev.counts.total += 1;
    if (p.abstained) dev.counts.abstained += 1;
    else if (p.label) dev.counts.labels[p.label] = (dev.counts.labels[p.label] || 0) + 1;
    dev.model = result.model;
  }

  // ------------------------------------------------------------------- results ----

  function probabilityOf(prediction) {
    const probs = prediction.probabilities || {};
    if (prediction.label && probs[prediction.label] !== undefined) return probs[prediction.label];
    const values = Object.values(probs);
    return values.length ? Math.max(...values) : null;
  }

  function addResult(result) {
    results.unshift(result);
    const body = $("results").tBodies[0];
    body.insertBefore(buildRow(result), body.firstChild);
    while (results.length > MAX_ROWS) {
      const gone = results.pop();
      body.lastChild.remove();
      if (gone.message_id === selected) selected = null;
    }
    $("result-count").textContent = String(results.length);
    if (!selected || selected === (results[1] && results[1].message_id)) selectResult(result); // follow the newest
  }

  function buildRow(result) {
    const p = result.prediction || {};
    const row = el("tr");
    row.dataset.messageId = result.message_id;
    row.dataset.testid = "result-row";
    row.tabIndex = 0;
    const time = (result.finished_at || "").replace("T", " ").slice(0, 19);
    const prob = probabilityOf(p);
    const label = el("td", "label");
    label.append(el("span", `badge risk-${p.abstained ? "abstained" : p.risk || "none"}`, p.abstained ? `abstained${p.label ? ` (${p.label})` : ""}` : p.label || "–"));
    const spark = el("td", "spark");
    spark.append(sparkline(result.spectrum));
    row.append(el("td", "time", time), el("td", "dev", result.device_id), el("td", "slide", result.slide_id), label,
      el("td", "prob", prob === null ? "–" : prob.toFixed(3)), el("td", "model", modelText(result.model)), spark);
    row.addEventListener("click", () => selectResult(result));
    row.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") selectResult(result); });
    return row;
  }

  function sparkline(spectrum) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 100 24");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "sparkline");
    const values = (spectrum && spectrum.values) || [];
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

  // --------------------------------------------------------------------- chart ----

  function selectResult(result) {
    selected = result.message_id;
    for (const row of $("results").tBodies[0].rows) row.classList.toggle("selected", row.dataset.messageId === selected);
    const s = result.spectrum || { axis: [], values: [] };
    const p = result.prediction || {};
    $("chart-caption").textContent = `${result.device_id} · ${result.slide_id} · ${p.abstained ? "abstained" : p.label} · ${s.algorithm || ""}`;
    const data = [Float64Array.from(s.axis || []), Float64Array.from(s.values || [])];
    if (chart) {
      chart.setData(data);
      return;
    }
    chart = new uPlot(chartOptions(), data, $("chart"));
    $("chart").dataset.ready = "true";
  }

  function chartOptions() {
    return {
      width: chartWidth(),
      height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "wavelength difference (nm)" }, { label: "intensity" }],
      series: [{ label: "nm" }, { label: "spectrum", stroke: "#1565c0", width: 2, fill: "rgba(21,101,192,0.10)" }],
      legend: { show: false },
    };
  }

  function chartWidth() {
    return Math.max(280, $("chart").clientWidth || 600);
  }

  // ---------------------------------------------------------------------- wire ----

  function wire() {
    const settings = loadSettings();
    fillForm(settings);
    $("settings-toggle").addEventListener("click", () => showSettings($("settings").hidden));
    $("settings").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const next = readForm();
      saveSettings(next);
      showSettings(false);
      connect(next);
    });
    $("disconnect").addEventListener("click", disconnect);
    window.addEventListener("resize", () => { if (chart) chart.setSize({ width: chartWidth(), height: 260 }); });
    if (settings.url && settings.username) connect(settings);
    else showSettings(true);
  }

  wire();
})();
