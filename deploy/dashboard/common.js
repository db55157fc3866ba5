// Shared helpers of the OMIS dashboard.  Loaded after vocabulary.js (the server's words, generated
// from deploy/messages/vocabulary.py) and before archive.js, results.js, app.js.
"use strict";

window.Omis = (function common() {
  const VOCABULARY = window.OmisVocabulary;
  // Results older than the stated outcome (format 1) abstained for this reason.
  const ABSTAIN_REASON = VOCABULARY.abstain_reasons.includes("uncertain_probability") ? "uncertain_probability" : VOCABULARY.abstain_reasons[0];

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  // "2026-01-01 13:00:01 CET": the browser's local time with its zone (results are stored in UTC).
  function localTime(iso) {
    if (!iso) return "–";
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

  // The outcome as the archive stores it (deploy/collector/outcome.py does the same).
  function outcomeOf(result) {
    const kind = result.outcome;
    const p = result.prediction || {};
    if (typeof kind === "string") {
      return { kind, reason: result.reason || (kind === "abstained" ? p.reason || ABSTAIN_REASON : null), stage: result.stage || null };
    }
    if (p.abstained) return { kind: "abstained", reason: p.reason || ABSTAIN_REASON, stage: null }; // older results
    return { kind: "classified", reason: null, stage: null };
  }

  function pHigh(result) {
    const p = result.prediction || {};
    if (typeof p.p_high === "number") return p.p_high;
    const probs = p.probabilities || {};
    return typeof probs.high === "number" ? probs.high : null;
  }

  // One table row's data, from a live omis.result/1 or from an /api/results item.
  function rowOf(item) {
    if (item.schema === "omis.result/1") {
      const o = outcomeOf(item);
      const p = item.prediction || {};
      const model = item.model || {};
      return {
        message_id: item.message_id, device_id: item.device_id, slide_id: item.slide_id, finished_at: item.finished_at,
        outcome: o.kind, outcome_reason: o.reason, outcome_stage: o.stage, review: o.kind !== "classified",
        // label is the decision (null when undecided); side is where an undecided p(high) leans
        label: p.label, risk: p.risk, side: p.side || null, p_high: pHigh(item), model_name: model.name, model_version: model.version, result: item,
      };
    }
    return { ...item, result: null };
  }

  function outcomeText(row) {
    if (row.outcome === "classified") return "classified";
    const where = row.outcome_stage ? ` at ${row.outcome_stage}` : "";
    return `${row.outcome}${where}${row.outcome_reason ? `: ${row.outcome_reason}` : ""}`;
  }

  function modelText(name, version) {
    return name !== undefined && name !== null ? `${name} v${version}` : "–";
  }

  return { el, localTime, outcomeOf, pHigh, rowOf, outcomeText, modelText, vocabulary: VOCABULARY };
})();
