"""``report.json``, ``report.md`` and the plots of a training run.

The Markdown report sets the study's Table 2 beside this run's numbers.  Numbers from synthetic
data say whether the pipeline works, not how well the method screens patients.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware_bridge.fsutil import atomic_write_bytes, atomic_write_text
from training.metrics import high_risk_probability, roc_points

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# The study's Table 2 (sensitivity, specificity in %), with the classification problem of each.
STUDY_TABLE2: tuple[tuple[str, str, str, float, float], ...] = (
    ("[2]", "Naive Bayes", "2-class (II Pap – V Pap)", 78.16, 97.92),
    ("[23]", "Random Forest", "2-class (II, III Pap – IV, V Pap)", 37.14, 98.97),
    ("Study", "VGG16 CNN", "2-class (II, III Pap – IV, V Pap)", 83.3, 78.0),
)
STUDY_NOTE = (
    "The study reports VGG16 sensitivity 83.8 % (results) and 83.3 % (abstract, Table 2), "
    "specificity 78 % (79 % in the conclusion) and accuracy 80.4 %, on 441 real stained smears "
    "(II 141, III 112, IV 42, V 146).  Its Naive Bayes pair (78.16 / 97.92 %, accuracy 85.18 %) "
    "is from an easier problem, II vs V only; the Random Forest pair (37.14 / 98.97 %) is from "
    "the same II+III vs IV+V problem as the CNN.  The study gives no confidence intervals."
)
SYNTHETIC_WARNING = (
    "**These numbers are not clinical performance.**  When the data come from the simulator "
    "(`omis dataset synth`), they only show that the pipeline works end to end; the simulator's "
    "difficulty is a parameter, not a property of patients."
)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _pct(p: dict[str, Any] | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _auc(m: dict[str, Any]) -> str:
    ci = m.get("roc_auc_ci95")
    if m["roc_auc"] is None or not ci:
        return _num(m["roc_auc"])
    return f"{m['roc_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _row(name: str, m: dict[str, Any]) -> str:
    return (
        f"| {name} | {_pct(m['sensitivity'])} | {_pct(m['specificity'])} | "
        f"{_pct(m['accuracy'])} | {_auc(m)} | {_num(m['calibration']['brier'])} |"
    )


def _comparison_lines(report: dict[str, Any]) -> list[str]:
    cmp = report.get("comparison")
    if not cmp:
        return []
    lines = [
        "",
        f"## Paired tests: {cmp['network']} against each baseline (same slides)",
        "",
        "| baseline | AUC difference | DeLong p | McNemar p |",
        "|---|---|---|---|",
    ]
    for name, t in cmp["paired_with_network"].items():
        d = t["delong"]
        lines.append(
            f"| {name} | {_num(d['auc_difference'], '{:+.3f}')} | {_num(d['p_value'])} | "
            f"{_num(t['mcnemar']['p_value'])} |"
        )
    if cmp.get("against_best_baseline"):
        lines += ["", f"**{cmp['against_best_baseline']}**"]
    return lines


def _threshold_lines(report: dict[str, Any]) -> list[str]:
    th = report.get("thresholds")
    if not th:
        return []
    s = th["shipped"]
    lines = [
        "",
        "## Thresholds (chosen on validation data)",
        "",
        f"Shipped: decision {s['decision']:.4f} for {100 * (s['target_sensitivity'] or 0):.0f} % "
        f"sensitivity, abstain band [{s['abstain_low']:.4f}, {s['abstain_high']:.4f}], "
        f"temperature {s['temperature']:.3g}, on {s['n_validation']} validation predictions "
        f"(chosen_on: {s['chosen_on']}).  Each fold's test slides were scored with the "
        "thresholds chosen on that fold's own validation slides:",
        "",
    ]
    lines += [
        f"- fold {i}: decision {c['decision']:.4f}, band [{c['abstain_low']:.4f}, "
        f"{c['abstain_high']:.4f}] ({c['n_validation']} slides)"
        + (f" — {c['problem']}" if c["problem"] else "")
        for i, c in enumerate(th["per_fold"], start=1)
    ]
    return lines


def _referral_lines(report: dict[str, Any], model: str) -> list[str]:
    rows = [(f"{model} (this run)", report["cnn"]["pooled"])]
    rows += [
        (name.replace("_", " ").title(), res["pooled"])
        for name, res in report.get("baselines", {}).items()
        if isinstance(res, dict) and "pooled" in res and "referral_rate" in res["pooled"]
    ]
    if "referral_rate" not in rows[0][1]:
        return []
    lines = [
        "",
        "## What the device would do (each fold's abstain band on its test slides)",
        "",
        "Referred slides go to a person.  *Decided*: figures on the slides the device decides; "
        "*with review*: each referral counted as a correct human review.",
        "",
        "| model | referred | sens. decided | spec. decided | sens. with review | "
        "spec. with review |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {_pct(m['referral_rate'])} | {_pct(m['sensitivity_decided'])} | "
        f"{_pct(m['specificity_decided'])} | {_pct(m['sensitivity_with_review'])} | "
        f"{_pct(m['specificity_with_review'])} |"
        for name, m in rows
    ]
    return lines


def _shipped_lines(report: dict[str, Any]) -> list[str]:
    """The shipped model's operating point, measured on its held-out calibration split."""
    op = report.get("shipped_operating_point")
    if not op:
        return []
    th = op.get("thresholds", {})
    bound = th.get("referral_bound") or {}
    held = op.get("held_out") or op.get("figures") or {}
    lines = [
        "",
        "## The shipped model's operating point",
        "",
        f"Measured on the {op.get('measured_on')}, {op.get('slides')} slides.  Thresholds: "
        f"{op.get('method', 'see report.json')}.  Decision {th.get('decision', 0):.4f}, band "
        f"[{th.get('abstain_low', 0):.4f}, {th.get('abstain_high', 0):.4f}].",
    ]
    if bound:
        lines += [
            "",
            f"Referral bound: the band holds {bound['slides_in_band']} of {bound['slides']} "
            f"calibration slides (at most {bound['max_slides_in_band']} allowed), so it refers "
            f"at most {100 * bound['upper_bound']:.1f} % of new slides with probability "
            f"{bound['confidence']:g} (--max-referral {bound['max_referral']:g}); the bundle "
            "records that rate for the OTA health period.",
        ]
    if held:
        lines += [
            "",
            "| held out | value [95 %] |",
            "|---|---|",
            *(
                f"| {k.replace('_', ' ')} | {_pct(held.get(k))} |"
                for k in (
                    "referral_rate",
                    "sensitivity_at_decision",
                    "specificity_at_decision",
                    "sensitivity_decided",
                    "specificity_decided",
                    "sensitivity_with_review",
                    "specificity_with_review",
                )
                if isinstance(held.get(k), dict)
            ),
        ]
    if op.get("collapsed"):
        lines += ["", f"**Collapsed:** {op['collapsed']}"]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    pooled = report["cnn"]["pooled"]
    model = report.get("model", "vgg16")
    cov = report.get("render_coverage")
    lines = [
        f"# Training report: {report['name']} v{report['version']}",
        "",
        SYNTHETIC_WARNING,
        "",
        f"Task `{report['task']}` (classes {', '.join(report['classes'])}), preset "
        f"`{report['preset']}` ({model}), {report['folds']}-fold cross-validation grouped by "
        f"patient, {report['data']['slides_used']} slides of {report['data']['patients']} "
        f"patients (kind: {report['data']['kind']}).  Positive = high risk.  Proportions: "
        "Wilson 95 %; AUC: DeLong 95 %.  Decisions at each fold's validation-chosen threshold.",
        "",
        "## This run (pooled out-of-fold predictions)",
        "",
        "| model | sensitivity | specificity | accuracy | ROC AUC [95 %] | Brier |",
        "|---|---|---|---|---|---|",
        _row(f"{model} (this run)", pooled),
    ]
    for name, res in report.get("baselines", {}).items():
        if isinstance(res, dict) and "pooled" in res:
            lines.append(_row(name.replace("_", " ").title(), res["pooled"]))
    lines += _referral_lines(report, model)
    lines += _comparison_lines(report)
    lines += _threshold_lines(report)
    lines += _shipped_lines(report)
    if cov:
        lines += [
            "",
            "Render window coverage (fraction of each class's absolute spectral mass inside "
            "the shipped window): " + ", ".join(f"{k} {_num(v, '{:.4f}')}" for k, v in cov.items()),
        ]
    disc = report.get("discriminative_coverage")
    if disc:
        lines += [
            "",
            "Discriminative coverage (share of the class-separating signal inside the window): "
            f"shipped window {_num(disc['shipped_window_all_slides'], '{:.4f}')}; per fold on "
            "its test slides " + ", ".join(_num(v, "{:.4f}") for v in disc["per_fold_test_slides"]),
        ]
    for w in report.get("warnings", []):
        lines += ["", f"**Warning:** {w}"]
    lines += [
        "",
        "## The study's Table 2",
        "",
        "| ref. | method | problem | sens. % | spec. % |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r} | {m} | {p} | {s} | {sp} |" for r, m, p, s, sp in STUDY_TABLE2]
    lines += [
        "",
        STUDY_NOTE,
        "",
        f"## Per fold ({model})",
        "",
        "| fold | n | sensitivity | specificity | accuracy | ROC AUC | best epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report["cnn"]["per_fold"]:
        lines.append(
            f"| {f['fold']} | {f['n']} | {_pct(f['sensitivity'])} | {_pct(f['specificity'])} | "
            f"{_pct(f['accuracy'])} | {_num(f['roc_auc'])} | {f.get('best_epoch', 'n/a')} |"
        )
    lines += [
        "",
        f"Pooled confusion matrix (rows true, columns predicted; "
        f"{', '.join(report['classes'])}): `{pooled['confusion_matrix']}`",
        "",
        f"Final model: {report['final_model']['description']}.",
        "",
        "Out-of-fold predictions: `predictions.csv`.  Plots: `plots/confusion.png`, "
        "`plots/roc.png`, `plots/reliability.png`, `plots/loss.png`, `plots/mean_spectra.png`.",
        "",
    ]
    return "\n".join(lines)


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def plot_confusions(path: Path, report: dict[str, Any]) -> None:
    """Pooled and per-fold confusion matrices of the CNN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [("pooled", report["cnn"]["pooled"]["confusion_matrix"])]
    mats += [(f"fold {f['fold']}", f["confusion_matrix"]) for f in report["cnn"]["per_fold"]]
    classes = report["classes"]
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.2), squeeze=False)
    for ax, (title, cm) in zip(axes[0], mats, strict=True):
        arr = np.asarray(cm)
        ax.imshow(arr, cmap="Blues")
        for (i, j), v in np.ndenumerate(arr):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_roc(path: Path, labels: I64, probs: dict[str, F64], high_classes: Sequence[int]) -> None:
    """ROC curves (high risk vs low risk) of the CNN and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = np.isin(labels, list(high_classes))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, p in probs.items():
        fpr, tpr = roc_points(positive, high_risk_probability(p, high_classes))
        ax.plot(fpr, tpr, label=name, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, pooled out-of-fold")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_mean_spectra(
    path: Path, spectra: Sequence[tuple[F64, F64]], labels: I64, classes: Sequence[str]
) -> None:
    """Mean spectrum per class with a ± 1 SD band (spectra on the same axis only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x0 = spectra[0][0]
    for k, name in enumerate(classes):
        ys = [
            y
            for (x, y), lab in zip(spectra, labels, strict=True)
            if lab == k and x.shape == x0.shape
        ]
        if not ys:
            continue
        arr = np.stack(ys)
        mean, sd = arr.mean(axis=0), arr.std(axis=0)
        ax.plot(x0, mean, label=f"{name} (n={len(ys)})")
        ax.fill_between(x0, mean - sd, mean + sd, alpha=0.2)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("wavelength difference (nm)")
    ax.set_ylabel("y")
    ax.set_title("mean spectrum per class (± 1 SD)")
    ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_reliability(path: Path, report: dict[str, Any]) -> None:
    """Reliability diagram (observed vs predicted p(high)) of the network and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {report.get("model", "cnn"): report["cnn"]["pooled"]["calibration"]}
    for name, res in report.get("baselines", {}).items():
        if "pooled" in res:
            curves[name] = res["pooled"]["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, cal in curves.items():
        pts = [(b["mean_predicted"], b["observed"]) for b in cal["bins"] if b["count"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{name} (ECE {cal['ece']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("predicted p(high)")
    ax.set_ylabel("observed fraction high")
    ax.set_title("reliability, pooled out-of-fold")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_losses(path: Path, histories: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Training and validation loss per epoch of every fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, hist in enumerate(histories, start=1):
        ep = [h["epoch"] for h in hist]
        line = ax.plot(ep, [h["train_loss"] for h in hist], label=f"fold {k} train")[0]
        val = [(h["epoch"], h["val_loss"]) for h in hist if h["val_loss"] is not None]
        if val:
            xs, ys = zip(*val, strict=True)
            ax.plot(xs, ys, linestyle="--", color=line.get_color(), label=f"fold {k} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted cross-entropy")
    ax.set_title("loss per epoch")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
