// Alerts: with an archive, its open alerts (high risk first, never pushed out by other kinds),
// acknowledged through POST /api/alerts/{id}/ack so that the acknowledgement lasts; a few shown,
// the rest a tap away.  Without an archive (static page), alerts raised from live messages.
"use strict";

window.Omis.Alerts = class Alerts {
  constructor(archive) {
    this.archive = archive;
    this.list = document.getElementById("alerts");
    this.more = document.getElementById("alerts-more");
    this.count = document.getElementById("alert-count");
    this.note = document.getElementById("alerts-note");
    this.expanded = false;
    this.hiddenDevices = new Set(); // decommissioned while the page is open
    this.local = new Map(); // key -> {key, kind, device_id, text} without an archive
    this.remote = [];
    this.total = 0;
    this.role = "viewer";
    this.more.addEventListener("click", () => { this.expanded = !this.expanded; this.render(); });
  }

  static SHOWN = 3;
  static PAGE = 100;
  static KIND_ORDER = { high_risk: 0, offline: 1, seq_gap: 2 };
  static KIND_TEXT = { high_risk: "High risk", offline: "Offline", seq_gap: "Missing results" };

  async refresh() {
    if (!this.archive.enabled) return;
    try {
      const page = await this.archive.alerts(Alerts.PAGE);
      this.remote = window.Omis.list(page.items).map((a) => window.Omis.obj(a)).filter((a) => !a.acked_at && !a.resolved_at);
      this.total = Number.isFinite(page.total) && page.total > 0 ? page.total : this.remote.length;
      this.note.textContent = "";
      this.render();
    } catch (err) {
      this.note.textContent = `Alerts unavailable: ${err.message}`;
    }
  }

  // Live alerts only matter without an archive; the archive raises its own.
  raise(key, kind, deviceId, text) {
    if (this.archive.enabled || this.local.has(key)) return;
    this.local.set(key, { key, kind, device_id: deviceId, detail: text, created_at: new Date().toISOString() });
    this.render();
  }

  drop(key) {
    if (this.local.delete(key)) this.render();
  }

  dropDevice(deviceId) {
    this.hiddenDevices.add(deviceId);
    for (const [key, alert] of this.local) if (alert.device_id === deviceId) this.local.delete(key);
    this.render();
  }

  unhideDevice(deviceId) {
    if (this.hiddenDevices.delete(deviceId)) this.render();
  }

  items() {
    const { text } = window.Omis;
    const all = this.archive.enabled ? this.remote : [...this.local.values()];
    return all.filter((a) => !this.hiddenDevices.has(text(a.device_id)))
      .sort((a, b) => (Alerts.KIND_ORDER[a.kind] ?? 9) - (Alerts.KIND_ORDER[b.kind] ?? 9)
        || String(b.created_at || "").localeCompare(String(a.created_at || "")));
  }

  render() {
    const items = this.items();
    const shown = this.expanded ? items : items.slice(0, Alerts.SHOWN);
    this.list.replaceChildren(...shown.map((a) => this.item(a)));
    const total = this.archive.enabled ? Math.max(this.total - (this.remote.length - items.length), items.length) : items.length;
    this.count.textContent = String(total);
    this.more.hidden = items.length <= Alerts.SHOWN;
    this.more.textContent = this.expanded ? "Show fewer alerts" : `Show all ${items.length}${total > items.length ? ` of ${total}` : ""} alerts`;
    this.more.setAttribute("aria-expanded", String(this.expanded));
    document.getElementById("alerts-section").hidden = items.length === 0 && !this.note.textContent;
  }

  item(alert) {
    const { el, text, localTime } = window.Omis;
    const kind = text(alert.kind) || "alert";
    const node = el("li", `alert alert-${kind.replace(/[^a-z_]/g, "")}`);
    const key = alert.key || `archive:${text(alert.id)}`;
    node.dataset.key = key;
    node.dataset.kind = kind;
    node.dataset.device = text(alert.device_id) || "";
    if (alert.id !== undefined) node.dataset.alertId = text(alert.id) || "";
    const words = text(alert.detail) || text(alert.text) || "";
    const head = el("span", "alert-kind", Alerts.KIND_TEXT[kind] || kind);
    const body = el("span", "alert-text", words);
    const when = el("span", "alert-time", localTime(text(alert.created_at)));
    const button = el("button", this.archive.enabled ? "ack" : "dismiss", this.archive.enabled ? "Acknowledge" : "Dismiss");
    button.type = "button";
    // Who may acknowledge (docs/collector.md): high risk cytotech+, the rest operator+.
    button.hidden = this.archive.enabled && !window.Omis.roleAtLeast(this.role, kind === "high_risk" ? "cytotech" : "operator");
    button.setAttribute("aria-label", `${button.textContent}: ${words}`);
    button.addEventListener("click", () => this.acknowledge(alert, key, button));
    node.append(head, body, when, button);
    return node;
  }

  async acknowledge(alert, key, button) {
    if (!this.archive.enabled) { this.drop(key); return; }
    button.disabled = true;
    try {
      await this.archive.ack(alert.id);
      this.remote = this.remote.filter((a) => a !== alert);
      this.total = Math.max(0, this.total - 1);
      this.note.textContent = "";
      this.render();
    } catch (err) {
      button.disabled = false;
      this.note.textContent = `Acknowledging failed: ${err.message}`;
      this.render();
    }
  }
};
