// OMIS appliance dashboard: live state over MQTT (mqtt.js browser bundle), history, worklist,
// reviews and alerts from the archive's HTTP API (omis collect), charts with uPlot.  Topics and
// payloads: docs/mqtt.md; the API: docs/collector.md; the page: docs/dashboard.md.
//
// Endpoints come from the server, never from the page's URL: the API is this page's own origin
// and the broker is GET config.json (http.dashboard_broker_url).  A crafted link can therefore
// not make the page send a password anywhere else (issue 20).  Every value from the broker or the
// API is shown through textContent, never parsed as HTML; there is no inline script or style, so
// a strict Content-Security-Policy (script-src 'self') holds.
"use strict";

(function main() {
  const { el, localTime, modelText, text, num, obj, roleAtLeast } = window.Omis;
  const STORAGE_KEY = "omis-dashboard.broker";
  const LEGACY_KEY = "omis-dashboard.settings"; // held a URL-supplied broker and password
  const DEVICE_ID = /^[A-Za-z0-9_-]{1,64}$/;
  const KINDS = ["availability", "status", "result", "ota/state"];

  const $ = (id) => document.getElementById(id);
  const devices = new Map(); // id -> device record
  const forgotten = new Set(); // decommissioned while the page is open
  const archive = new window.Omis.Archive();
  const results = new window.Omis.Results(archive);
  const alerts = new window.Omis.Alerts(archive);
  const worklist = new window.Omis.Worklist(archive, results);
  let config = { broker_url: null, prefix: "omis/v1" };
  let credentials = { username: "", password: "" }; // for the broker (memory, or remembered)
  let role = "viewer";
  let client = null;
  let ignored = 0;
  let refreshTimers = [];

  // ------------------------------------------------------------- configuration ----

  function defaultBroker() {
    const secure = window.location.protocol === "https:";
    return `${secure ? "wss" : "ws"}://${window.location.hostname || "localhost"}:8884/mqtt`;
  }

  // The server's settings (same origin); a plain static server without one gets the defaults.
  async function loadConfig() {
    const found = { broker_url: defaultBroker(), prefix: "omis/v1" };
    try {
      const response = await fetch("config.json", { cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        const body = obj(await response.json());
        if (typeof body.broker_url === "string" && /^wss?:\/\//.test(body.broker_url)) found.broker_url = body.broker_url;
        if (typeof body.prefix === "string" && body.prefix) found.prefix = body.prefix.replace(/\/+$/, "");
      }
    } catch (err) {
      console.warn("config.json unreadable: using the defaults", err);
    }
    return found;
  }

  // A remembered broker password is used only for the broker it was remembered for.
  function loadRemembered() {
    window.localStorage.removeItem(LEGACY_KEY);
    try {
      const saved = obj(JSON.parse(window.localStorage.getItem(STORAGE_KEY) || "{}"));
      if (saved.broker_url === config.broker_url) {
        return { username: text(saved.username) || "", password: text(saved.password) || "", remember: Boolean(saved.password) };
      }
    } catch (err) {
      console.warn("ignoring unreadable saved settings", err);
    }
    return { username: "", password: "", remember: false };
  }

  function remember(username, password, keep) {
    const stored = { broker_url: config.broker_url, username };
    if (keep) stored.password = password;
    window.localStorage.setItem(STORAGE_KEY, JSON.stringify(stored));
  }

  function showSettings(open) {
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  }

  // ------------------------------------------------------------------- session ----

  async function probeArchive() {
    try {
      signedIn(await archive.me());
    } catch (err) {
      if (err.status === 401) { showLogin(""); return; }
      if (err.status === 404) { startLiveOnly(); return; } // a static server: no archive behind it
      showLogin(`The archive does not answer (${err.message}).`);
    }
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("app").hidden = true;
    $("tabs").hidden = true;
    $("login-error").textContent = message;
    $("history-note").textContent = "Sign in to see the archive.";
    const form = $("login-form");
    if (!form.elements.username.value) form.elements.username.focus();
  }

  async function onLogin(ev) {
    ev.preventDefault();
    const form = $("login-form");
    const username = form.elements.username.value.trim();
    const password = form.elements.password.value;
    const error = $("login-error");
    error.textContent = "";
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const body = obj(await archive.login(username, password));
      archive.setCsrf(body.csrf_token);
      credentials = { username, password };
      remember(username, password, form.elements.remember.checked);
      form.elements.password.value = "";
      signedIn({ name: body.name ?? username, role: body.role });
    } catch (err) {
      error.textContent = loginError(err);
    } finally {
      button.disabled = false;
    }
  }

  function loginError(err) {
    if (err.status === 401 || err.status === 403) return "Sign-in refused: wrong user name or password, or the account is disabled.";
    if (err.status === 429) return `Too many sign-in attempts: wait a minute and try again (${err.detail}).`;
    if (err.status === 422 || err.status === 400) return `Sign-in refused: ${err.detail}`;
    if (err.status === 0) return `Cannot reach the archive: ${err.detail}`;
    return `Sign-in failed (${err.message}).`;
  }

  function signedIn(me) {
    const who = obj(me);
    archive.enabled = true;
    if (typeof who.csrf_token === "string") archive.setCsrf(who.csrf_token);
    role = window.Omis.ROLES.includes(who.role) ? who.role : "viewer";
    worklist.role = role;
    alerts.role = role;
    document.body.dataset.role = role;
    $("who").textContent = `${text(who.name) || text(who.user) || "?"} (${role})`;
    $("logout").hidden = !archive.csrf; // a localhost session without accounts has nothing to end
    $("signin").hidden = who.via !== "local"; // anonymous local viewer: a person may still sign in
    $("login").hidden = true;
    $("app").hidden = false;
    $("tabs").hidden = false;
    results.readFilters();
    results.loadHistory(false);
    refreshArchive();
    worklist.load();
    // The broker needs the password again after a reload (unless remembered); an anonymous
    // local session (omis demo) tries the broker without one.
    if (credentials.password || who.via === "local") connect();
    else {
      disconnect();
      setConnection("disconnected", "enter the broker password under Connection for live updates");
    }
  }

  function startLiveOnly() {
    archive.enabled = false;
    $("login").hidden = true;
    $("app").hidden = false;
    results.loadHistory(false);
    alerts.render();
    if (credentials.username || credentials.password) connect();
    else showSettings(true);
  }

  async function onLogout() {
    try {
      await archive.logout();
    } catch (err) {
      console.warn("logout", err);
    }
    archive.setCsrf("");
    credentials = { username: "", password: "" };
    window.localStorage.removeItem(STORAGE_KEY);
    disconnect();
    window.location.reload(); // nothing of the session stays on the page
  }

  // A live result or availability change: the archive stored or alerted on it by now.
  function scheduleRefresh() {
    if (!archive.enabled || refreshTimers.length) return;
    refreshTimers = [700, 3000].map((ms, i) => setTimeout(() => {
      refreshArchive();
      if (i === 1) { refreshTimers = []; worklist.load(); }
    }, ms));
  }

  async function refreshArchive() {
    if (!archive.enabled) return;
    alerts.refresh();
    try {
      const known = await archive.devices();
      for (const item of window.Omis.list(known)) applyArchiveDevice(obj(item));
    } catch (err) {
      console.warn("devices unavailable", err);
    }
  }

  // The archive's last known state, until the broker says something newer.
  function applyArchiveDevice(item) {
    const id = text(item.device_id);
    if (!id || !DEVICE_ID.test(id) || forgotten.has(id)) return;
    const dev = device(id);
    dev.archived = num(item.results);
    if (!dev.live.availability && typeof item.availability === "string") dev.availability = item.availability;
    if (!dev.live.status && item.status) dev.status = obj(item.status);
    if (!dev.live.ota && item.ota_state) dev.ota = obj(item.ota_state);
    // the archive's fleet view (deploy/fleet/view.py): groups, rollout, recorded OTA outcomes
    if (item.fleet && typeof item.fleet === "object") dev.fleet = obj(item.fleet);
    renderDevice(dev);
  }

  // ---------------------------------------------------------------- connection ----

  function setConnection(state, detail) {
    const node = $("conn");
    node.dataset.state = state;
    node.textContent = detail ? `${state}: ${detail}` : state;
  }

  function connect() {
    disconnect();
    const url = config.broker_url;
    setConnection("connecting", url);
    const options = {
      protocolVersion: 5,
      clientId: `omis-dash-${Math.random().toString(16).slice(2, 10)}`,
      clean: true,
      reconnectPeriod: 3000,
      connectTimeout: 8000,
      // mqtt.js would run its keep-alive timer in a Worker made from a blob: URL, which a strict
      // CSP (script-src 'self', no worker-src blob:) refuses; plain timers need no exception.
      timerVariant: "native",
    };
    if (credentials.username) options.username = credentials.username;
    if (credentials.password) options.password = credentials.password;
    client = mqtt.connect(url, options);
    const prefix = config.prefix;
    client.on("connect", () => {
      setConnection("connected", url);
      const filters = Object.fromEntries(KINDS.map((kind) => [`${prefix}/+/${kind}`, { qos: 1 }]));
      client.subscribe(filters, (err) => { if (err) setConnection("error", `subscribe: ${err.message}`); });
    });
    client.on("reconnect", () => setConnection("connecting", url));
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

  function onSettings(ev) {
    ev.preventDefault();
    const form = $("settings");
    credentials = { username: form.elements.username.value.trim(), password: form.elements.password.value };
    remember(credentials.username, credentials.password, form.elements.remember.checked);
    showSettings(false);
    connect();
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
    const body = new TextDecoder().decode(payload);
    try {
      handler(deviceId, body);
    } catch (err) {
      ignored += 1;
      const note = $("ignored");
      note.hidden = false;
      note.textContent = `${ignored} malformed message(s) ignored; last on ${topic}: ${err.message}`;
    }
  }

  function parseJson(body, schema) {
    const data = JSON.parse(body);
    if (!data || typeof data !== "object" || data.schema !== schema) throw new Error(`not ${schema}`);
    return data;
  }

  function forget(id) {
    const dev = devices.get(id);
    forgotten.add(id);
    alerts.dropDevice(id);
    if (!dev) return;
    dev.card.remove();
    devices.delete(id);
    renderDeviceCount();
  }

  // The device's reply, as the archive returned it (POST /api/devices/{id}/scan|cancel).
  function showReply(dev, reply) {
    const what = text(reply.verb) || "command";
    const result = obj(reply.result);
    const error = obj(reply.error);
    let message;
    if (reply.ok !== true) message = `${what}: refused (${text(error.code) || "?"}): ${text(error.message) || ""}`;
    else if (what === "scan") message = `scan ${text(result.slide_id)}: accepted (scan ${text(result.scan_id)}, position ${text(result.position)})`;
    else if (what === "cancel") message = `cancel: cancelled ${window.Omis.list(result.cancelled).map(text).join(", ") || "nothing"}`;
    else message = `${what}: ok`;
    const node = dev.card.querySelector(".reply");
    node.textContent = message;
    node.dataset.ok = String(reply.ok === true);
  }

  const HANDLERS = {
    availability(id, body) {
      if (!body) { forget(id); return; } // decommissioned: the retained message was cleared
      const dev = device(id);
      const was = dev.availability;
      dev.availability = body;
      dev.live.availability = true;
      if (body === "offline" && was !== "offline") alerts.raise(`offline:${id}`, "offline", id, `${id} went offline (${localTime(new Date().toISOString())})`);
      if (body !== "offline") alerts.drop(`offline:${id}`);
      if (body !== was) scheduleRefresh();
      renderDevice(dev);
    },
    status(id, body) {
      if (!body) { if (devices.has(id)) { devices.get(id).status = null; renderDevice(devices.get(id)); } return; }
      const status = parseJson(body, "omis.status/1");
      const dev = device(id);
      dev.status = status;
      dev.live.status = true;
      renderDevice(dev);
    },
    "ota/state"(id, body) {
      if (!body) { if (devices.has(id)) { devices.get(id).ota = null; renderDevice(devices.get(id)); } return; }
      const state = parseJson(body, "omis.ota_state/1");
      const dev = device(id);
      dev.ota = state;
      dev.live.ota = true;
      renderDevice(dev);
    },
    result(id, body) {
      const result = parseJson(body, "omis.result/1");
      const dev = device(id);
      countResult(dev, result);
      renderDevice(dev);
      if (!results.addLive(result)) return; // redelivery, or outside the filters
      const row = window.Omis.rowOf(result);
      if (row.outcome === "classified" && row.risk === "high") {
        alerts.raise(`risk:${row.message_id}`, "high_risk", id, `slide ${row.slide_id}: high risk (p(high) ${window.Omis.fixed(row.p_high, 2)}) on ${id}`);
      }
      scheduleRefresh();
    },
  };

  // ------------------------------------------------------------------- devices ----

  function device(id) {
    let dev = devices.get(id);
    forgotten.delete(id);
    alerts.unhideDevice(id);
    if (!dev) {
      dev = {
        id, availability: "unknown", status: null, ota: null, fleet: null, model: null, archived: null,
        live: { availability: false, status: false, ota: false }, seen: new Set(),
        counts: { total: 0, abstained: 0, failed: 0, cancelled: 0, labels: {} },
      };
      dev.card = buildCard(dev);
      devices.set(id, dev);
      const cards = [...devices.keys()].sort();
      const next = cards[cards.indexOf(id) + 1];
      $("devices").insertBefore(dev.card, next ? devices.get(next).card : null);
      renderDeviceCount();
    }
    return dev;
  }

  const FACTS = [["model", "Model"], ["ota", "Store"], ["engine", "Engine"], ["app", "App"], ["queue", "Queue"], ["archived", "Archived"], ["error", "Last error"]];
  const OTA_FACTS = [
    ["serving", "Serving"], ["previous", "Previous"], ["step", "Step"], ["last", "Last update"], ["rollbacks", "Rollbacks"],
    ["groups", "Groups"], ["rollout", "Rollout"],
  ];

  function factList(className, facts) {
    const list = el("dl", className);
    for (const [key, label] of facts) {
      const row = el("div", `fact fact-${key}`);
      row.append(el("dt", "", label), el("dd", "", "–"));
      list.append(row);
    }
    return list;
  }

  function buildCard(dev) {
    const card = el("article", "device");
    card.dataset.device = dev.id;
    const top = el("div", "device-top");
    top.append(el("h3", "device-id", dev.id), el("span", "badge availability"), el("span", "badge state"));
    const ota = el("section", "ota");
    ota.setAttribute("aria-label", `Model updates of ${dev.id}`);
    ota.append(el("h4", "", "Model updates (OTA)"), factList("facts", OTA_FACTS));
    card.append(top, factList("facts", FACTS), el("p", "counts"), ota, buildCommands(dev));
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

  // Commands go through the archive, which sends them over its own MQTT session and records
  // who sent what in the audit trail (docs/dashboard.md "Commands"); the page never publishes.
  async function send(dev, verb, body) {
    const node = dev.card.querySelector(".reply");
    node.textContent = `${verb}: sent, waiting for the reply…`;
    node.dataset.ok = "";
    try {
      showReply(dev, obj(await archive.command(dev.id, verb, body)));
    } catch (err) {
      node.textContent = `${verb}: ${err.status === 504 ? "no reply" : "not sent"}: ${err.detail || err.message}`;
      node.dataset.ok = "false";
    }
  }

  function setFact(card, key, value) {
    const row = card.querySelector(`.fact-${key}`);
    row.querySelector("dd").textContent = value === null ? "–" : value;
    row.hidden = value === null;
  }

  function version(v) {
    return num(v) === null ? "–" : `v${v}`;
  }

  function outcomeLine(last) {
    if (typeof last === "string") return last;
    const o = obj(last);
    if (!text(o.result)) return null;
    // deploy/ota: committed, rolled_back (from the version named), rejected, interrupted.
    const words = { committed: "committed", rolled_back: "rolled back from", rejected: "rejected", interrupted: "interrupted" };
    const reason = text(o.reason);
    const at = text(o.at) ? `, ${localTime(o.at)}` : "";
    return `${words[o.result] || text(o.result)} ${version(o.version)}${reason ? `: ${reason}` : ""}${at}`;
  }

  // The store as the archive's fleet view last saw it (when no ota/state has arrived).
  function otaFromFleet(fleet) {
    return {
      current: fleet.serving_version, previous: fleet.previous_version, pending: fleet.pending_version,
      last_outcome: fleet.last_outcome, step: fleet.ota_step,
    };
  }

  // The OTA panel: what the model store serves, what it would fall back to, the running step,
  // the last outcome and the rollbacks (the device's count when it sends one, else the
  // archive's), and from the archive's fleet view the device's groups and latest rollout.
  function renderOta(dev) {
    const card = dev.card;
    const fleet = dev.fleet ? obj(dev.fleet) : null;
    const ota = dev.ota ? obj(dev.ota) : fleet && otaFromFleet(fleet);
    card.querySelector(".ota").hidden = ota === null;
    if (ota === null) return;
    const models = obj(ota.models);
    const named = (slot, v) => {
      const m = obj(slot);
      return num(v) === null ? "none" : `${text(m.name) ? `${m.name} ` : ""}${version(v)}`;
    };
    const pending = num(ota.pending);
    let trial = "";
    if (pending !== null) trial = pending === num(ota.current) ? " (on trial: not yet committed)" : ` (v${pending} being installed)`;
    setFact(card, "serving", `${named(models.current, ota.current)}${trial}`);
    setFact(card, "previous", named(models.previous, ota.previous));
    const progress = obj(ota.progress);
    const step = text(progress.step) || text(ota.step);
    setFact(card, "step", step ? `${step}${text(progress.version) ? ` (v${progress.version})` : ""}` : "idle");
    const last = ota.last_outcome;
    setFact(card, "last", outcomeLine(last) || "none");
    // The store keeps only the last outcome: a count when the device sends one, else whether
    // the last update was rolled back.
    const o = obj(last);
    const count = num(ota.rollbacks);
    const rolled = o.result === "rolled_back" ? `from ${version(o.version)}${text(o.reason) ? ` (${o.reason})` : ""}` : null;
    const recorded = fleet ? num(fleet.rollbacks) : null;
    let rollbacks = rolled ? `last update rolled back ${rolled}` : "none in the last update";
    if (count !== null) rollbacks = `${count}${rolled ? `; last ${rolled}` : ""}`;
    else if (recorded !== null) rollbacks = `${recorded} recorded by the archive${rolled ? `; last ${rolled}` : ""}`;
    setFact(card, "rollbacks", rollbacks);
    renderFleet(card, fleet);
  }

  function renderFleet(card, fleet) {
    const groups = fleet ? window.Omis.list(fleet.groups).map(text).filter(Boolean) : [];
    setFact(card, "groups", groups.length ? groups.join(", ") : null);
    const r = fleet && fleet.rollout ? obj(fleet.rollout) : null;
    const w = r ? num(r.wave) : null; // 0 = the canary wave, as omis fleet counts them
    const wave = w === null ? "" : `, wave ${w}${w === 0 ? " (canary)" : ""}`;
    setFact(card, "rollout", r ? `#${text(r.id)} to ${version(r.version)}: ${text(r.step) || "waiting"}${wave} (rollout ${text(r.state) || "?"})` : null);
  }

  // The model the device serves: the store's current slot (right after a local rollback, before
  // the next status), else what the status names.
  function servingModel(dev) {
    const status = obj(dev.status);
    const ota = obj(dev.ota);
    const current = obj(obj(ota.models).current);
    if (text(current.name) && num(current.version) !== null) return current;
    return obj(status.model || dev.model);
  }

  function renderDevice(dev) {
    const card = dev.card;
    const status = obj(dev.status);
    const avail = card.querySelector(".availability");
    const availability = text(dev.availability) || "unknown";
    avail.textContent = availability;
    avail.dataset.value = availability;
    card.dataset.availability = availability; // a stopped/offline device's status is stale
    const state = card.querySelector(".state");
    state.textContent = text(status.state) || "no status";
    state.dataset.value = text(status.state) || "unknown";
    const model = servingModel(dev);
    setFact(card, "model", modelText(text(model.name), text(model.version)));
    const ota = dev.ota ? obj(dev.ota) : null;
    setFact(card, "ota", ota ? `current ${version(ota.current)}, previous ${version(ota.previous)}${num(ota.pending) !== null ? `, pending v${ota.pending}` : ""}` : null);
    const engine = status.engine;
    setFact(card, "engine", engine && typeof engine === "object" ? [text(engine.name), text(engine.precision)].filter(Boolean).join(" ") : text(engine) || "–");
    setFact(card, "app", text(status.app_version) || "–");
    const queue = obj(status.queue);
    setFact(card, "queue", status.queue ? `${text(queue.depth) ?? "–"}/${text(queue.capacity) ?? "–"}, outbox ${text(obj(status.outbox).rows) ?? "–"}` : "–");
    setFact(card, "archived", dev.archived === null ? null : `${dev.archived} result(s)`);
    setFact(card, "error", status.last_error ? text(obj(status.last_error).message) || "error" : null);
    const c = dev.counts;
    const labels = Object.entries(c.labels).sort().map(([label, n]) => `${label} ${n}`).join(" · ");
    const extra = ["failed", "cancelled"].filter((k) => c[k] > 0).map((k) => ` · ${k} ${c[k]}`).join("");
    card.querySelector(".counts").textContent = `Since this page opened: ${c.total} result(s)${labels ? ` · ${labels}` : ""} · abstained ${c.abstained}${extra}`;
    card.querySelector(".commands").hidden = !roleAtLeast(role, "operator");
    renderOta(dev);
  }

  function renderDeviceCount() {
    $("device-count").textContent = String(devices.size);
    $("no-devices").hidden = devices.size > 0;
  }

  // Counts of this page's live results by outcome; classified ones by their decision.
  function countResult(dev, result) {
    const row = window.Omis.rowOf(result);
    if (dev.seen.has(row.message_id)) return; // a redelivery
    dev.seen.add(row.message_id);
    const c = dev.counts;
    c.total += 1;
    if (row.outcome === "classified") {
      const label = row.label || row.risk || "unlabelled";
      c.labels[label] = (c.labels[label] || 0) + 1;
    } else {
      c[row.outcome] += 1;
    }
    if (dev.archived !== null) dev.archived += 1; // the archive stores it too (refreshed soon)
    if (result.model && typeof result.model === "object") dev.model = result.model;
  }

  // ---------------------------------------------------------------------- wire ----

  function showView(view) {
    $("app").dataset.view = view;
    for (const button of $("tabs").querySelectorAll("button")) button.setAttribute("aria-pressed", String(button.dataset.view === view));
    if (view === "worklist") worklist.load();
  }

  async function wire() {
    $("settings-toggle").addEventListener("click", () => showSettings($("settings").hidden));
    $("settings").addEventListener("submit", onSettings);
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", onLogout);
    $("signin").addEventListener("click", () => { $("login").hidden = false; $("login-form").elements.username.focus(); });
    $("disconnect").addEventListener("click", disconnect);
    for (const button of $("tabs").querySelectorAll("button")) button.addEventListener("click", () => showView(button.dataset.view));
    $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); results.readFilters(); results.loadHistory(false); });
    $("filters").addEventListener("reset", () => setTimeout(() => { results.readFilters(); results.loadHistory(false); }, 0));
    $("export").addEventListener("click", async () => {
      const note = $("history-note");
      try { await archive.downloadCsv(results.readFilters()); } catch (err) { note.textContent = `CSV export failed: ${err.message}`; }
    });
    $("more").addEventListener("click", () => results.loadHistory(true));
    $("chart-zoom").addEventListener("click", () => results.toggleZoom());
    results.onSelect = (row, stored) => worklist.show(row, stored);
    archive.onSessionEnded = (err) => {
      archive.enabled = false;
      archive.setCsrf("");
      showLogin(`Your session ended (${err.detail}): sign in again.`);
    };
    window.addEventListener("resize", () => results.resize());

    config = await loadConfig();
    $("broker-url").textContent = config.broker_url;
    $("broker-prefix").textContent = config.prefix;
    const saved = loadRemembered();
    credentials = { username: saved.username, password: saved.password };
    const form = $("settings");
    form.elements.username.value = saved.username;
    form.elements.password.value = saved.password;
    form.elements.remember.checked = saved.remember;
    $("login-form").elements.username.value = saved.username;
    await probeArchive();
  }

  wire();
})();
