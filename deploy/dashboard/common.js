// Shared helpers of the OMIS dashboard.  Loaded after vocabulary.js (the server's words, generated
// from deploy/messages/vocabulary.py) and before every other script.
// Payloads come from devices and the archive: every field may have any JSON type, so values are
// read through text()/num()/list()/obj() and shown with textContent, never parsed as HTML.
"use strict";

window.Omis = (function common() {
  const VOCABULARY = window.OmisVocabulary;
  // Results older than the stated outcome (format 1) abstained for this reason.
  const ABSTAIN_REASON = VOCABULARY.abstain_reasons.includes("uncertain_probability") ? "uncertain_probability" : VOCABULARY.abstain_reasons[0];
  // Roles of the archive, weakest first (docs/collector.md).
  const ROLES = ["viewer", "operator", "cytotech", "pathologist", "admin"];

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // A string for display: strings as they are, numbers and booleans printed, anything else null.
  function text(value) {
    if (typeof value === "string") return value;
    if (typeof value === "number" && Number.isFinite(value)) return String(value);
    if (typeof value === "boolean") return String(value);
    return null;
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  // An array: a lone string becomes a one-item list (fields[].reasons was once a string).
  function list(value) {
    if (Array.isArray(value)) return value;
    if (value === undefined || value === null || value === "") return [];
    return [value];
  }

  function obj(value) {
    return value && typeof value === "object" && !Array.isArray(value) ? value : {};
  }

  function fixed(value, digits) {
    const n = num(value);
    return n === null ? "–" : n.toFixed(digits);
  }

  function roleAtLeast(role, wanted) {
    return ROLES.indexOf(role) >= ROLES.indexOf(wanted) && ROLES.includes(role);
  }

  // "2026-01-01 13:00:01 CET": the browser's local time with its zone (results are stored in UTC).
  function localTime(iso) {
    if (typeof iso !== "string" || !iso) return "–";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return iso;
    const parts = {};
    const fmt = new Intl.DateTimeFormat(undefined, {
      year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      second: "2-digit", hourCycle: "h23", timeZoneName: "short",
    });
    for (const part of fmt.formatToParts(date)) parts[part.type] = part.value;
    return `${parts.year}-${parts.month}-${parts.day} ${parts.hour}:${parts.minute}:${parts.second} ${parts.timeZoneName}`;
  }

  const OUTCOMES = ["classified", "abstained", "failed", "cancelled"];

  // The outcome as the archive stores it (deploy/collector/outcome.py does the same).
  function outcomeOf(result) {
    const kind = text(result.outcome);
    const p = obj(result.prediction);
    if (kind !== null && OUTCOMES.includes(kind)) {
      const reason = text(result.reason) || (kind === "abstained" ? text(p.reason) || ABSTAIN_REASON : null);
      return { kind, reason, stage: text(result.stage) };
    }
    if (p.abstained === true) return { kind: "abstained", reason: text(p.reason) || ABSTAIN_REASON, stage: null }; // older results
    return { kind: "classified", reason: null, stage: null };
  }

  function pHigh(result) {
    const p = obj(result.prediction);
    if (num(p.p_high) !== null) return p.p_high;
    return num(obj(p.probabilities).high);
  }

  // The decision: prediction.label is the thresholded call (prediction.risk for the binary task).
  function decisionOf(result) {
    const p = obj(result.prediction);
    return { label: text(p.label), risk: text(p.risk), side: text(p.side) };
  }

  // One table row's data, from a live omis.result/1 or from an /api/results item.
  function rowOf(item) {
    const source = obj(item);
    if (source.schema === "omis.result/1") {
      const o = outcomeOf(source);
      const d = decisionOf(source);
      const model = obj(source.model);
      return {
        message_id: text(source.message_id) || "", device_id: text(source.device_id) || "–",
        slide_id: text(source.slide_id) || "–", finished_at: text(source.finished_at),
        outcome: o.kind, outcome_reason: o.reason, outcome_stage: o.stage, review: o.kind !== "classified",
        label: d.label, risk: d.risk, side: d.side, p_high: pHigh(source), model_name: text(model.name),
        model_version: text(model.version), result: source,
      };
    }
    return {
      message_id: text(source.message_id) || "", device_id: text(source.device_id) || "–",
      slide_id: text(source.slide_id) || "–", finished_at: text(source.finished_at),
      outcome: OUTCOMES.includes(source.outcome) ? source.outcome : "classified",
      outcome_reason: text(source.outcome_reason), outcome_stage: text(source.outcome_stage),
      review: source.review === true, label: text(source.label), risk: text(source.risk),
      p_high: num(source.p_high), model_name: text(source.model_name), model_version: text(source.model_version),
      result: null,
    };
  }

  function outcomeText(row) {
    if (row.outcome === "classified") return "classified";
    const where = row.outcome_stage ? ` at ${row.outcome_stage}` : "";
    return `${row.outcome}${where}${row.outcome_reason ? `: ${row.outcome_reason}` : ""}`;
  }

  // The call as a short text and the badge class: abstained and cancelled are not a risk.
  function callOf(row) {
    // An abstained call names the side of the band p(high) fell on (prediction.side), else the
    // label an older device sent.
    const leaning = row.side ? `leans ${row.side}` : row.label;
    if (row.outcome === "abstained") return { text: `abstained${leaning ? ` (${leaning})` : ""}`, badge: "risk-abstained" };
    if (row.outcome === "cancelled") return { text: "cancelled", badge: "risk-cancelled" };
    if (row.outcome === "failed") return { text: "failed", badge: "risk-failed" };
    const risk = row.risk === "high" || row.risk === "low" ? row.risk : "none";
    return { text: row.label || row.risk || "–", badge: `risk-${risk}` };
  }

  function modelText(name, version) {
    return name !== undefined && name !== null ? `${name} v${version ?? "–"}` : "–";
  }

  return {
    el, text, num, list, obj, fixed, roleAtLeast, ROLES, localTime, outcomeOf, pHigh, decisionOf,
    rowOf, outcomeText, callOf, modelText, vocabulary: VOCABULARY,
  };
})();
