// The worklist (GET /api/worklist: slides that need a person, plus the quality-control sample of
// classified-low slides, oldest first) and the review panel of the selected slide: its reviews
// (append-only: the newest is the verdict, earlier ones stay as history), claim, sign-out and
// amendment (POST /api/results/{id}/review).  Bethesda 2014 categories as the API takes them.
"use strict";

window.Omis.Worklist = class Worklist {
  constructor(archive, results) {
    this.archive = archive;
    this.results = results;
    this.role = "viewer";
    this.current = null; // the selected row
    this.loads = 0; // loads started: only the newest one may paint (answers can cross)
    this.body = document.getElementById("worklist").tBodies[0];
    this.form = document.getElementById("review-form");
    this.form.addEventListener("submit", (ev) => { ev.preventDefault(); this.submit(); });
    document.getElementById("claim").addEventListener("click", () => this.claim());
    document.getElementById("assign-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.claim(ev.target.elements.user.value.trim());
    });
    document.getElementById("worklist-filters").addEventListener("submit", (ev) => { ev.preventDefault(); this.load(); });
  }

  static isQc(item) {
    return item.reason === "qc_sample";
  }

  static REASONS = {
    high_risk: "high risk", abstained: "abstained", insufficient_fields: "too few usable fields",
    failed_scan: "failed scan", qc_sample: "QC sample",
  };

  get mayReview() {
    return window.Omis.roleAtLeast(this.role, "cytotech");
  }

  filters() {
    const form = document.getElementById("worklist-filters");
    const value = (name) => (form.elements[name] ? form.elements[name].value.trim() : "");
    return { reason: value("reason"), device: value("device"), signed: value("signed") };
  }

  async load() {
    const note = document.getElementById("worklist-note");
    if (!this.archive.enabled) { note.textContent = "The worklist needs the archive."; return; }
    const mine = ++this.loads;
    try {
      const page = window.Omis.obj(await this.archive.worklist(this.filters(), 200, 0));
      if (mine !== this.loads) return; // a newer load (after a claim, say) paints, not this one
      const items = window.Omis.list(page.items).map((i) => window.Omis.obj(i));
      this.body.replaceChildren(...items.map((item) => this.row(item)));
      const total = window.Omis.num(page.total) ?? items.length;
      const signed = this.filters().signed;
      note.textContent = `${total} slide(s) ${signed === "true" ? "signed out" : signed === "any" ? "in all" : "to review"}${total > items.length ? `; oldest ${items.length} shown` : ""}.`;
      if (!signed || signed === "false") document.getElementById("worklist-count").textContent = String(total);
    } catch (err) {
      if (mine === this.loads) note.textContent = `Worklist unavailable: ${err.message}`;
    }
  }

  row(item) {
    const { el, text, localTime, fixed, list, callOf, rowOf } = window.Omis;
    const data = rowOf(item);
    const tr = el("tr");
    tr.dataset.messageId = data.message_id;
    tr.tabIndex = 0;
    const why = el("td", "why");
    if (Worklist.isQc(item)) {
      tr.dataset.qc = "true";
      why.append(el("span", "badge qc", "QC sample"));
    } else {
      why.append(el("span", "", Worklist.REASONS[item.reason] || text(item.reason) || data.outcome));
    }
    const call = el("td", "label");
    const c = callOf(data);
    call.append(el("span", `badge ${c.badge}`, c.text));
    const verdict = item.verdict && typeof item.verdict === "object" ? item.verdict : null;
    const state = verdict ? `${text(verdict.bethesda) || text(verdict.adequacy) || "reviewed"}${verdict.supersedes !== null && verdict.supersedes !== undefined ? " (amended)" : ""}` : "open";
    tr.dataset.state = verdict ? "signed" : "open";
    tr.append(el("td", "time", localTime(data.finished_at)), el("td", "slide", data.slide_id), el("td", "dev", data.device_id),
      why, call, el("td", "phigh", fixed(data.p_high, 3)), el("td", "claimed", text(item.claimed_by) || "–"), el("td", "verdict", state));
    const open = () => {
      for (const other of this.body.rows) other.classList.toggle("selected", other === tr);
      this.results.select(data);
    };
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); open(); } });
    return tr;
  }

  // The review panel of the selected slide (called by Results after it loaded the record).
  show(row, stored) {
    this.current = row;
    const { el, text, localTime, list, obj } = window.Omis;
    const panel = document.getElementById("review");
    panel.hidden = !this.archive.enabled || !stored;
    if (panel.hidden) return;
    const reviews = list(obj(stored).reviews).map((r) => obj(r));
    const history = document.getElementById("review-history");
    history.replaceChildren(...reviews.map((r, i) => {
      const item = el("li", i === reviews.length - 1 ? "review current" : "review superseded");
      const verdict = `${text(r.bethesda) || "–"}, ${text(r.adequacy) || "–"}`;
      const who = `${text(r.user_name) || text(r.user) || "?"} (${text(r.role) || "?"})`;
      const kind = i === 0 ? "signed out" : "amended";
      item.append(el("strong", "verdict", verdict), el("span", "by", ` ${kind} by ${who}, ${localTime(text(r.created_at))}`));
      if (text(r.comment)) item.append(el("q", "comment", text(r.comment)));
      return item;
    }));
    const status = document.getElementById("review-status");
    status.textContent = reviews.length ? `Signed out${reviews.length > 1 ? `, amended ${reviews.length - 1}×` : ""}` : "Not reviewed yet: the device's call is preliminary.";
    const reported = text(obj(stored).report_status);
    status.dataset.state = reported || (reviews.length ? (reviews.length > 1 ? "amended" : "final") : "preliminary");
    this.form.hidden = !this.mayReview;
    document.getElementById("claim").hidden = !this.mayReview || reviews.length > 0;
    document.getElementById("assign-form").hidden = !window.Omis.roleAtLeast(this.role, "pathologist") || reviews.length > 0;
    document.getElementById("review-submit").textContent = reviews.length ? "Amend" : "Sign out";
    const latest = reviews[reviews.length - 1];
    if (latest) {
      this.form.elements.bethesda.value = text(latest.bethesda) || "";
      this.form.elements.adequacy.value = text(latest.adequacy) || "satisfactory";
    } else {
      this.form.reset();
    }
    this.form.elements.comment.value = "";
    document.getElementById("review-note").textContent = "";
  }

  async submit() {
    const note = document.getElementById("review-note");
    const row = this.current;
    if (!row) return;
    const f = this.form.elements;
    if (!f.bethesda.value && f.adequacy.value !== "unsatisfactory") {
      note.textContent = "Choose a Bethesda category (none only for an unsatisfactory specimen).";
      note.dataset.ok = "false";
      return;
    }
    const verdict = { bethesda: f.bethesda.value || null, adequacy: f.adequacy.value };
    if (f.comment.value.trim()) verdict.comment = f.comment.value.trim();
    const button = document.getElementById("review-submit");
    const amend = button.textContent === "Amend";
    button.disabled = true;
    try {
      await this.archive.review(row.message_id, verdict);
      const stored = await this.archive.result(row.message_id);
      this.show(row, stored);
      note.textContent = `${amend ? "Amended" : "Signed out"}: ${verdict.bethesda || "unsatisfactory specimen"}.`;
      note.dataset.ok = "true";
      this.load();
    } catch (err) {
      note.textContent = `Not saved: ${err.message}`;
      note.dataset.ok = "false";
    } finally {
      button.disabled = false;
    }
  }

  async claim(user) {
    const note = document.getElementById("review-note");
    if (!this.current) return;
    try {
      const answer = window.Omis.obj(await this.archive.claim(this.current.message_id, user));
      const holder = window.Omis.text(answer.claimed_by) || user;
      note.textContent = user ? `Assigned to ${holder}.` : "Claimed: the slide is yours on the worklist.";
      note.dataset.ok = "true";
      this.load();
    } catch (err) {
      note.textContent = `${user ? "Assigning" : "Claim"} failed: ${err.message}`;
      note.dataset.ok = "false";
    }
  }
};
