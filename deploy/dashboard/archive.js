// The archive's HTTP API (omis collect, docs/collector.md): history, CSV, one result, alerts, role.
"use strict";

window.Omis.Archive = class Archive {
  constructor(base, username, password) {
    this.base = (base || "").replace(/\/+$/, "");
    this.headers = {};
    if (username && password) this.headers.Authorization = `Basic ${btoa(`${username}:${password}`)}`;
  }

  get enabled() {
    return Boolean(this.base);
  }

  url(path, params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
    }
    const text = query.toString();
    return `${this.base}${path}${text ? `?${text}` : ""}`;
  }

  async get(path, params, as) {
    const response = await fetch(this.url(path, params), { headers: this.headers, cache: "no-store" });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (err) { /* not JSON */ }
      throw new Error(`${response.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    return as === "blob" ? response.blob() : response.json();
  }

  results(filters, limit, offset) { return this.get("/results", { ...filters, limit, offset }); }
  result(messageId) { return this.get(`/results/${encodeURIComponent(messageId)}`); }
  devices() { return this.get("/devices"); }
  alerts() { return this.get("/alerts", { open: true, limit: 50 }); }
  me() { return this.get("/me"); }

  // CSV through fetch (so the credentials go along), then saved as a file.
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
