// The fleet page: each device's serving and shadow versions, OTA step, last outcome and
// rollbacks (GET /api/devices, its `fleet` block: deploy/fleet/view.py), each shadow
// candidate's comparison with serving (GET /api/shadow) and each rollout's waves and steps
// (GET /api/fleet/rollouts).  Refreshed every `?refresh=` seconds (default 15).
// No inline script (CSP); every value may have any JSON type and is shown with textContent.
"use strict";

(function fleetPage() {
  const { el, text, num, list, obj } = window.Omis;
  const DEFAULT_REFRESH_S = 15;
  const ROLLOUTS_SHOWN = 20;
  const SHA256 = /^[0-9a-f]{64}$/;
  // the name half of /api/shadow's name:version (deploy/collector/shadow_api.py)
  const MODEL_NAME = /^[^:\x00-\x20\x7f]{1,128}$/;
  const FAILED_STEPS = new Set(["rejected", "rolled_back", "timeout", "compare_failed"]);

  class HttpError extends Error {
    constructor(status, detail) {
      super(`${status} ${detail}`);
      this.status = status;
    }
  }

  async function getJson(path) {
    const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = JSON.stringify(obj(await response.json()).detail ?? detail); } catch (err) { /* not JSON */ }
      throw new HttpError(response.status, detail);
    }
    return response.json();
  }

  function refreshSeconds() {
    const asked = Number(new URLSearchParams(window.location.search).get("refresh"));
    return Number.isFinite(asked) && asked >= 1 && asked <= 3600 ? asked : DEFAULT_REFRESH_S;
  }

  function version(value) {
    const n = num(value);
    return n === null ? "–" : `v${n}`;
  }

  function modelText(ref) {
    const r = obj(ref);
    const name = text(r.name);
    return `${name === null ? "?" : name} ${version(r.version)}`;
  }

  // The candidate as /api/shadow takes it: its sha256, else name:version; null when neither.
  function candidateOf(ref) {
    const r = obj(ref);
    if (typeof r.sha256 === "string" && SHA256.test(r.sha256)) return r.sha256;
    const n = num(r.version);
    if (typeof r.name === "string" && MODEL_NAME.test(r.name) && n !== null && Number.isInteger(n)) return `${r.name}:${n}`;
    return null;
  }

  function outcomeText(value) {
    const o = obj(value);
    const result = text(o.result);
    if (result === null) return "–";
    const reason = text(o.reason);
    return `${result}${num(o.version) !== null ? ` ${version(o.version)}` : ""}${reason ? `: ${reason}` : ""}`;
  }

  function stepText(fleet) {
    const step = text(fleet.ota_step);
    const r = fleet.rollout ? obj(fleet.rollout) : null;
    const inRollout = r && num(r.id) !== null ? `rollout #${num(r.id)}: ${text(r.step) || "–"}` : null;
    return [step, inRollout].filter(Boolean).join(" · ") || "–";
  }

  function deviceRow(device) {
    const fleet = obj(device.fleet);
    const state = obj(device.ota_state);
    const shadowRef = Object.keys(obj(state.shadow)).length ? state.shadow : null;
    const shadow = shadowRef ? modelText(shadowRef) : version(fleet.shadow_version);
    const rollbacks = num(fleet.rollbacks);
    const row = el("tr");
    const cells = [
      text(device.device_id) || "–",
      list(fleet.groups).map(text).filter(Boolean).join(", ") || "–",
      version(fleet.serving_version),
      shadow,
      stepText(fleet),
      outcomeText(fleet.last_outcome),
      rollbacks === null ? "–" : String(rollbacks),
      text(device.availability) || "unknown",
    ];
    for (const value of cells) row.append(el("td", null, value));
    if (rollbacks) row.className = "alerting";
    return row;
  }

  function rate(value) {
    const r = obj(value);
    const k = num(r.k);
    const n = num(r.n);
    const share = num(r.rate);
    return `${share === null ? "n/a" : `${(100 * share).toFixed(1)} %`} (${k ?? "–"}/${n ?? "–"})`;
  }

  function shadowSummary(body) {
    const b = obj(body);
    const referral = obj(b.referral);
    const counts = obj(b.counts);
    const parts = [
      `agreement ${rate(b.agreement)}`,
      `referral ${rate(referral.candidate)} vs serving ${rate(referral.serving)}`,
      `${num(counts.shadow_results) ?? "–"} shadow results`,
    ];
    const reviewed = obj(b.reviewed);
    if (num(reviewed.slides)) {
      const cand = obj(reviewed.candidate);
      const serv = obj(reviewed.serving);
      parts.push(`reviewed ${reviewed.slides}: sensitivity ${rate(cand.sensitivity)} vs ${rate(serv.sensitivity)}, `
        + `specificity ${rate(cand.specificity)} vs ${rate(serv.specificity)}`);
    }
    return parts.join("; ");
  }

  async function shadowItem(device) {
    const id = text(device.device_id) || "–";
    const state = obj(device.ota_state);
    const candidate = candidateOf(state.shadow);
    const item = el("li", null);
    item.append(el("strong", null, id), `: ${modelText(state.shadow)} in shadow beside ${version(obj(device.fleet).serving_version)}. `);
    if (candidate === null) {
      item.append(el("span", "muted", "the device names no usable candidate (sha256 or name and version)"));
      return item;
    }
    const query = new URLSearchParams({ candidate });
    if (typeof device.device_id === "string") query.set("device", device.device_id);
    const href = `api/shadow?${query.toString()}`;
    try {
      item.append(el("span", null, shadowSummary(await getJson(href))), " ");
    } catch (err) {
      item.append(el("span", "error", `comparison unavailable: ${err.message}`), " ");
    }
    const link = el("a", null, "comparison (JSON)");
    link.href = href;
    item.append(link);
    return item;
  }

  function stepLine(step) {
    const d = obj(step);
    const name = text(d.step) || "–";
    const v = num(d.version) === null ? "" : ` ${version(d.version)}`;
    const detail = text(d.detail);
    const line = el("li", `step step-${FAILED_STEPS.has(name) ? "failed" : name === "committed" ? "ok" : "open"}`,
      `${text(d.device_id) || "–"}: ${name}${v}${detail ? ` (${detail})` : ""}`);
    return line;
  }

  function committedOf(steps) {
    return steps.filter((d) => obj(d).step === "committed").length;
  }

  function targetText(value) {
    const entries = Object.entries(obj(value)).map(([k, v]) => `${k} ${text(v) ?? list(v).map(text).filter(Boolean).join(", ")}`);
    return entries.length ? entries.join("; ") : "–";
  }

  function rolloutItem(value) {
    const r = obj(value);
    const bundle = obj(r.bundle);
    const state = text(r.state) || "–";
    const waves = list(r.waves).map(list);
    const all = waves.flat();
    const item = el("li", `rollout rollout-${state === "halted" ? "halted" : state === "completed" ? "completed" : "running"}`);
    item.append(el("h3", null, `#${num(r.id) ?? "–"} ${text(bundle.name) || "?"} ${version(bundle.version)}: ${state}`));
    const facts = el("p", "muted", `${committedOf(all)}/${all.length} committed · target ${targetText(r.target)} · `
      + `started ${window.Omis.localTime(r.created_at)} · updated ${window.Omis.localTime(r.updated_at)}`);
    item.append(facts);
    const reason = text(r.reason);
    if (reason) item.append(el("p", "reason", `reason: ${reason}`));
    const ol = el("ol", "waves");
    waves.forEach((wave, i) => {
      const li = el("li", null);
      li.append(el("span", "wave-name", `${i === 0 ? "canary" : `wave ${i}`} (${committedOf(wave)}/${wave.length} committed)`));
      const steps = el("ul", "steps");
      for (const step of wave) steps.append(stepLine(step));
      li.append(steps);
      ol.append(li);
    });
    item.append(ol);
    return item;
  }

  async function load() {
    const note = document.getElementById("fleet-note");
    const [devicesBody, rolloutsBody] = await Promise.all([
      getJson("api/devices"), getJson(`api/fleet/rollouts?limit=${ROLLOUTS_SHOWN}`),
    ]);
    const devices = list(devicesBody).filter((d) => Object.keys(obj(d)).length);
    const tbody = document.querySelector("#fleet-devices tbody");
    tbody.replaceChildren(...devices.map(deviceRow));
    document.getElementById("fleet-device-count").textContent = String(devices.length);
    const holding = devices.filter((d) => Object.keys(obj(obj(d.ota_state).shadow)).length);
    const shadowItems = await Promise.all(holding.map(shadowItem));
    const shadowList = document.getElementById("fleet-shadow");
    shadowList.replaceChildren(...(shadowItems.length ? shadowItems : [el("li", "muted", "no device holds a shadow candidate")]));
    const rollouts = list(rolloutsBody).map(rolloutItem);
    document.getElementById("fleet-rollouts").replaceChildren(...rollouts);
    document.getElementById("fleet-rollout-count").textContent = String(rollouts.length);
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    note.textContent = `${plural(devices.length, "device")}, ${plural(rollouts.length, "rollout")}; updated ${window.Omis.localTime(new Date().toISOString())}`;
  }

  function failed(err) {
    const note = document.getElementById("fleet-note");
    note.textContent = err instanceof HttpError && err.status === 401
      ? "Sign in on the Appliances page first, then come back."
      : `The archive did not answer: ${err.message}`;
  }

  function start() {
    const every = refreshSeconds() * 1000;
    const cycle = () => load().catch(failed).finally(() => window.setTimeout(cycle, every));
    cycle();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
