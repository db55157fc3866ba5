// The archive's HTTP API (omis collect, docs/collector.md), always on the page's own origin: the
// session cookie goes nowhere else, and no password is ever sent after the sign-in itself.
// Writes carry the CSRF token the sign-in returned (header X-CSRF-Token).
"use strict";

window.Omis.ApiError = class ApiError extends Error {
  constructor(status, detail) {
    super(status ? `${status} ${detail}` : detail);
    this.status = status;
    this.detail = detail;
  }
};

window.Omis.Archive = class Archive {
  constructor() {
    this.base = `${window.location.origin}/api`;
    this.enabled = false; // set once /api/me answered
    this.onSessionEnded = null; // called on a 401 after the sign-in (expired or ended session)
    this.csrf = window.sessionStorage.getItem("omis-dashboard.csrf") || "";
  }

  setCsrf(token) {
    this.csrf = typeof token === "string" ? token : "";
    if (this.csrf) window.sessionStorage.setItem("omis-dashboard.csrf", this.csrf);
    else window.sessionStorage.removeItem("omis-dashboard.csrf");
  }

  url(path, params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
    }
    const search = query.toString();
    return `${this.base}${path}${search ? `?${search}` : ""}`;
  }

  static async failure(response) {
    let detail = response.statusText || "error";
    try {
      const body = await response.json();
      if (body && body.detail !== undefined) detail = body.detail;
    } catch (err) { /* not JSON */ }
    if (Array.isArray(detail)) detail = detail.map((d) => (d && d.msg ? `${(d.loc || []).slice(-1)[0] || ""}: ${d.msg}` : JSON.stringify(d))).join("; ");
    return new window.Omis.ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }

  async request(method, path, params, body, as) {
    // X-Requested-With: the archive then answers 401 without a Basic challenge, which would make
    // the browser hold the request for its own password dialog instead of showing the login form.
    const init = { method, cache: "no-store", credentials: "same-origin", headers: { "X-Requested-With": "omis-dashboard" } };
    if (method !== "GET") {
      init.headers["X-CSRF-Token"] = this.csrf;
      if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
    }
    let response;
    try {
      response = await fetch(this.url(path, params), init);
    } catch (err) {
      throw new window.Omis.ApiError(0, `archive unreachable (${err.message})`);
    }
    if (!response.ok) {
      const error = await Archive.failure(response);
      if (response.status === 401 && this.enabled && path !== "/login" && this.onSessionEnded) this.onSessionEnded(error);
      throw error;
    }
    if (as === "blob") return response.blob();
    if (as === "paged") return { items: await response.json(), total: Number(response.headers.get("X-Total-Count")) };
    if (response.status === 204) return null;
    return response.json();
  }

  get(path, params, as) { return this.request("GET", path, params, undefined, as); }
  post(path, body) { return this.request("POST", path, undefined, body); }

  me() { return this.get("/me"); }
  login(name, password) { return this.post("/login", { name, password }); }
  logout() { return this.post("/logout", {}); }
  results(filters, limit, offset) { return this.get("/results", { ...filters, limit, offset }); }
  result(messageId) { return this.get(`/results/${encodeURIComponent(messageId)}`); }
  devices() { return this.get("/devices"); }
  // Open (unresolved, unacknowledged) alerts; the server puts high risk first.
  alerts(limit) { return this.get("/alerts", { open: true, limit }, "paged"); }
  ack(alertId) { return this.post(`/alerts/${encodeURIComponent(alertId)}/ack`, {}); }
  worklist(filters, limit, offset) { return this.get("/worklist", { ...filters, limit, offset }); }
  // Claim for oneself, or (pathologist and above) assign to ``user``.
  claim(messageId, user) { return this.post(`/worklist/${encodeURIComponent(messageId)}/claim`, user ? { user } : {}); }
  // scan/cancel: the archive sends it, waits for the device's reply and audits it (operators+).
  command(deviceId, verb, body) { return this.post(`/devices/${encodeURIComponent(deviceId)}/${verb}`, body); }
  review(messageId, verdict) { return this.post(`/results/${encodeURIComponent(messageId)}/review`, verdict); }

  // CSV through fetch (the session cookie goes along), then saved as a file.
  async downloadCsv(filters) {
    const blob = await this.get("/results.csv", filters, "blob");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "omis-results.csv";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }
};
