// OMIS appliance dashboard: live state over MQTT (mqtt.js browser bundle), history from the
// archive's HTTP API (omis collect), charts with uPlot.  Topics and payloads: docs/mqtt.md.
// Every value from the broker or the API is shown through textContent, never parsed as HTML.
"use strict";

(function main() {
  const { el, localTime, modelText } = window.Omis;
  const STORAGE_KEY = "omis-dashboard.settings";
  const DEVICE_ID = /^[A-Za-z0-9_-]{1,64}$/;
  const KINDS = ["availability", "status", "result", "ota/state"];

  const $ = (id) => document.getElementById(id);
  const devices = new Map(); // id -> device record
  let client = null;
  let archive = new window.Omis.Archive("");
  let results = new window.Omis.Results(archive);
  let operator = false;
  let ignored = 0;

  // ------------------------------------------------------------------ settings ----

  function defaultUrl() {
    const secure = window.location.protocol === "https:";
    const host = window.location.hostname || "localhost";
    return `${secure ? "wss" : "ws"}://${host}:8884/mqtt`;
  }

  function defaultApi() {
    return window.location.protocol.startsWith("http") ? `${window.location.origin}/api` : "";
  }

  function loadSettings() {
    const settings = { url: defaultUrl(), api: defaultApi(), username: "", password: "", prefix: "omis/v1", remember: false };
    try {
      Object.assign(settings, JSON.parse(window.localStorage.getItem(STORAGE_KEY) || "{}"));
    } catch (err) {
      console.warn("ignoring unreadable saved settings", err);
    }
    const query = new URLSearchParams(window.location.search);
    const fromQuery = { broker: "url", url: "url", api: "api", username: "username", password: "password", prefix: "prefix" };
    for (const [param, key] of Object.entries(fromQuery)) {
      if (query.has(param)) settings[key] = query.get(param);
    }
    settings.prefix = settings.prefix.replace(/\/+$/, "");
    return settings;
  }

  function saveSettings(settings) {
    const stored = { url: settings.url, api: settings.api, username: settings.username, prefix: settings.prefix, remember: settings.remember };
    if (settings.remember) stored.password = settings.password;
    window.localStorage.setItem(STORAGE_KEY, JSON.stringify(stored));
  }

  function fillForm(settings) {
    const form = $("settings");
    for (const key of ["url", "api", "username", "password", "prefix"]) form.elements[key].value = settings[key] || "";
    form.elements.remember.checked = Boolean(settings.remember);
  }

  function readForm() {
    const form = $("settings");
    return {
      url: form.elements.url.value.trim(),
      api: form.elements.api.value.trim(),
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
    const node = $("conn");
    node.dataset.state = state;
    node.textContent = detail ? `${state}: ${detail}` : state;
  }

  function start(settings, live) {
    archive = new window.Omis.Archive(settings.api, settings.username, settings.password);
    results = new window.Omis.Results(archive);
    results.readFilters();
    results.loadHistory(false);
    loadArchiveState();
    if (live) connect(settings);
  }

  async function loadArchiveState() {
    if (!archive.enabled) return;
    try {
      operator = (await archive.me()).role === "operator";
      document.body.dataset.role = operator ? "operator" : "viewer";
      subscribeReplies();
      for (const dev of devices.values()) renderDevice(dev);
      for (const alert of await archive.alerts()) {
        if (alert.kind === "high_risk") raiseAlert(`risk:${alert.message_id}`, "high_risk", alert.device_id, alert.detail);
        if (alert.kind === "offline") raiseAlert(`offline:${alert.device_id}`, "offline", alert.device_id, `${alert.device_id} went offline (${localTime(alert.created_at)})`);
        if (alert.kind === "seq_gap") raiseAlert(`gap:${alert.id}`, "seq_gap", alert.device_id, `${alert.device_id}: ${alert.detail}`);
      }
      for (const item of await archive.devices()) device(item.device_id).archived = item.results;
      for (const dev of devices.values()) renderDevice(dev);
    } catch (err) {
      console.warn("archive state unavailable", err);
    }
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
    client.omisPrefix = prefix;
    client.on("connect", () => {
      setConnection("connected", settings.url);
      const filters = Object.fromEntries(KINDS.map((kind) => [`${prefix}/+/${kind}`, { qos: 1 }]));
      client.subscribe(filters, (err) => { if (err) setConnection("error", `subscribe: ${err.message}`); });
      subscribeReplies();
    });
    client.on("reconnect", () => setConnection("connecting", settings.url));
    client.on("offline", () => setConnection("disconnected", "broker unreachable"));
    client.on("error", (err) => setConnection("error", err.message));
    client.on("message", (topic, payload) => onMessage(prefix, topic, payload));
  }

  function subscribeReplies() {
    if (operator && client && client.connected) client.subscribe(`${client.omisPrefix}/+/cmd/+/reply`, { qos: 1 });
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
      handler(deviceId, text);
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

  function forget(id) {
    const dev = devices.get(id);
    if (!dev) return;
    dev.card.remove();
    devices.delete(id);
    dropAlerts(id);
    renderDeviceCount();
  }

  function onReply(id, text) {
    const reply = parseJson(text, "omis.reply/1");
    const dev = devices.get(id);
    if (!dev || !dev.pending.has(reply.correlation_id)) return; // not one of ours
    dev.pending.delete(reply.correlation_id);
    const what = reply.verb;
    let message;
    if (!reply.ok) message = `${what}: refused (${reply.error.code}): ${reply.error.message}`;
    else if (what === "scan") message = `scan ${reply.result.slide_id}: accepted (scan ${reply.result.scan_id}, position ${reply.result.position})`;
    else if (what === "cancel") message = `cancel: cancelled ${reply.result.cancelled.join(", ") || "nothing"}`;
    else message = `${what}: ok`;
    const node = dev.card.querySelector(".reply");
    node.textContent = message;
    node.dataset.ok = String(reply.ok);
  }

  const HANDLERS = {
    availability(id, text) {
      if (!text) { forget(id); return; } // decommissioned: the retained message was cleared
      const dev = device(id);
      const was = dev.availability;
      dev.availability = text;
      if (text === "offline" && was !== "offline") raiseAlert(`offline:${id}`, "offline", id, `${id} went offline (${localTime(new Date().toISOString())})`);
      if (text !== "offline") dropAlert(`offline:${id}`);
      renderDevice(dev);
    },
    status(id, text) {
      if (!text) { if (devices.has(id)) { devices.get(id).status = null; renderDevice(devices.get(id)); } return; }
      const dev = device(id);
      dev.status = parseJson(text, "omis.status/1");
      renderDevice(dev);
    },
    "ota/state"(id, text) {
      if (!text) { if (devices.has(id)) { devices.get(id).ota = null; renderDevice(devices.get(id)); } return; }
      const dev = device(id);
      dev.ota = parseJson(text, "omis.ota_state/1");
      renderDevice(dev);
    },
    result(id, text) {
      const result = parseJson(text, "omis.result/1");
      const dev = device(id);
      if (!results.addLive(result)) return; // redelivery, or outside the filters
      countResult(dev, result);
      const row = window.Omis.rowOf(result);
      if (row.outcome === "classified" && row.risk === "high") {
        raiseAlert(`risk:${row.message_id}`, "high_risk", id, `slide ${row.slide_id}: high risk (p(high) ${row.p_high === null ? "–" : row.p_high.toFixed(3)}) on ${id}`);
      }
      renderDevice(dev);
    },
    "cmd/scan/reply": onReply,
    "cmd/cancel/reply": onReply,
  };

  // -------------------------------------------------------------------- alerts ----

  function raiseAlert(key, kind, deviceId, text) {
    const list = $("alerts");
    if (list.querySelector(`[data-key="${CSS.escape(key)}"]`)) return;
    const item = el("li", `alert alert-${kind}`);
    item.dataset.key = key;
    item.dataset.kind = kind;
    item.dataset.device = deviceId;
    const dismiss = el("button", "dismiss", "Dismiss");
    dismiss.type = "button";
    dismiss.setAttribute("aria-label", `Dismiss: ${text}`);
    dismiss.addEventListener("click", () => item.remove());
    item.append(el("span", "alert-text", text), dismiss);
    list.prepend(item);
  }

  function dropAlert(key) {
    const item = $("alerts").querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (item) item.remove();
  }

  function dropAlerts(deviceId) {
    for (const item of $("alerts").querySelectorAll(`[data-device="${CSS.escape(deviceId)}"]`)) item.remove();
  }

  // ------------------------------------------------------------------- devices ----

  function device(id) {
    let dev = devices.get(id);
    if (!dev) {
      dev = { id, availability: "unknown", status: null, ota: null, model: null, archived: null, pending: new Set(), counts: { total: 0, abstained: 0, labels: {} } };
      dev.card = buildCard(dev);
      devices.set(id, dev);
      const cards = [...devices.keys()].sort();
      const next = cards[cards.indexOf(id) + 1];
      $("devices").insertBefore(dev.card, next ? devices.get(next).card : null);
      renderDeviceCount();
    }
    return dev;
  }

  function buildCard(dev) {
    const card = el("article", "device");
    card.dataset.device = dev.id;
    const top = el("div", "device-top");
    top.append(el("h3", "device-id", dev.id), el("span", "badge availability"), el("span", "badge state"));
    const facts = el("dl", "facts");
    for (const [key, label] of [["model", "Model"], ["ota", "Store"], ["engine", "Engine"], ["app", "App"], ["queue", "Queue"], ["archived", "Archived"], ["error", "Last error"]]) {
      const row = el("div", `fact fact-${key}`);
      row.append(el("dt", "", label), el("dd", "", "–"));
      facts.append(row);
    }
    card.append(top, facts, el("p", "counts"), buildCommands(dev));
    return card;
  }

  function buildCommands(dev) {
    const form = el("form", "commands");
    form.hidden = true;
    form.setAttribute("aria-label", `Commands for ${dev.id}`);
    const label = el("label", "", "Slide id");
    const input = el("input");
    input.name = "slide";
    input.required = true;
    input.pattern = "[A-Za-z0-9_.:-]{1,64}";
    input.autocomplete = "off";
    label.append(input);
    const scan = el("button", "primary scan", "Scan");
    scan.type = "submit";
    const cancel = el("button", "cancel", "Cancel scan");
    cancel.type = "button";
    const reply = el("p", "reply");
    reply.setAttribute("role", "status");
    form.append(label, scan, cancel, reply);
    form.addEventListener("submit", (ev) => { ev.preventDefault(); send(dev, "scan", { slide_id: input.value.trim() }); });
    cancel.addEventListener("click", () => send(dev, "cancel", {}));
    return form;
  }

  function send(dev, verb, body) {
    const node = dev.card.querySelector(".reply");
    if (!client || !client.connected) { node.textContent = `${verb}: not connected to the broker`; return; }
    const correlation = `dash-${Date.now().toString(36)}-${Math.random().toString(16).slice(2, 8)}`;
    dev.pending.add(correlation);
    node.textContent = `${verb}: sent, waiting for the reply…`;
    node.dataset.ok = "";
    const topic = `${client.omisPrefix}/${dev.id}/cmd/${verb}`;
    client.publish(topic, JSON.stringify({ ...body, correlation_id: correlation }), { qos: 1 }, (err) => {
      if (err) node.textContent = `${verb}: not sent: ${err.message}`;
    });
  }

  function setFact(card, key, text) {
    const row = card.querySelector(`.fact-${key}`);
    row.querySelector("dd").textContent = text;
    row.hidden = text === null;
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
    const model = status.model || dev.model || {};
    setFact(card, "model", modelText(model.name, model.version));
    setFact(card, "ota", dev.ota ? `current v${dev.ota.current ?? "–"}, previous v${dev.ota.previous ?? "–"}${dev.ota.pending != null ? `, pending v${dev.ota.pending}` : ""}` : null);
    const engine = status.engine;
    setFact(card, "engine", engine && typeof engine === "object" ? [engine.name, engine.precision].filter(Boolean).join(" ") : engine || "–");
    setFact(card, "app", status.app_version || "–");
    setFact(card, "queue", status.queue ? `${status.queue.depth}/${status.queue.capacity}, outbox ${status.outbox ? status.outbox.rows : "–"}` : "–");
    setFact(card, "archived", dev.archived === null ? null : `${dev.archived} result(s)`);
    setFact(card, "error", status.last_error ? status.last_error.message : null);
    const c = dev.counts;
    const labels = Object.entries(c.labels).sort().map(([label, n]) => `${label} ${n}`).join(" · ");
    card.querySelector(".counts").textContent = `${c.total} result(s)${labels ? ` · ${labels}` : ""} · abstained ${c.abstained}`;
    card.querySelector(".commands").hidden = !operator;
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
      start(next, true);
    });
    $("disconnect").addEventListener("click", disconnect);
    $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); results.readFilters(); results.loadHistory(false); });
    $("filters").addEventListener("reset", () => setTimeout(() => { results.readFilters(); results.loadHistory(false); }, 0));
    $("export").addEventListener("click", async () => {
      const note = $("history-note");
      try { await archive.downloadCsv(results.readFilters()); } catch (err) { note.textContent = `CSV export failed: ${err.message}`; }
    });
    $("more").addEventListener("click", () => results.loadHistory(true));
    $("chart-zoom").addEventListener("click", () => results.toggleZoom());
    window.addEventListener("resize", () => results.resize());
    const live = Boolean(settings.url && settings.username);
    if (!live) showSettings(true);
    start(settings, live); // history needs no broker
  }

  wire();
})();
