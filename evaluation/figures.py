"""Report figures drawn with matplotlib's Agg canvas (no pyplot, no global state).

Every function takes the result dict of :func:`evaluation.harness.evaluate` and returns
PNG bytes, or ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import functools
import io

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["roc_figure", "pr_figure", "calibration_figure", "patient_counts_figure",
           "agreement_figure", "all_figures"]

_COLORS = ["#1f4e79", "#c0504d", "#4f8a3c", "#8064a2", "#d08a2a", "#2a9d9d"]
_READER_MARKERS = ["o", "s", "^", "D", "v", "P"]
_RC = {"font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "legend.fontsize": 7.5,
       "xtick.labelsize": 7.5, "ytick.labelsize": 7.5}


def _fig(ncols: int, *, height: float = 3.2, width_per: float = 3.4) -> Figure:
    fig = Figure(figsize=(width_per * ncols, height), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _with_rc(fn):
    """Draw with the report's font sizes without touching global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, facecolor="white")
    return buf.getvalue()


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)


def _fmt_ci(e: dict, key: str = "estimate", digits: int = 2) -> str:
    if not isinstance(e, dict) or e.get(key) is None:
        return "n.e."
    s = f"{e[key]:.{digits}f}"
    if e.get("ci_low") is not None:
        s += f" ({e['ci_low']:.{digits}f}–{e['ci_high']:.{digits}f})"
    return s


@_with_rc
def roc_figure(result: dict) -> bytes | None:
    """ROC curves of every scorer, one panel per reference, readers as operating points."""
    refs = [r for r in result["parameters"]["references"]
            if any("roc_curve" in s for s in result["lesion"][r]["scorers"].values())]
    if not refs:
        return None
    fig = _fig(len(refs), height=3.4)
    axes = fig.subplots(1, len(refs), squeeze=False)[0]
    max_fpr = result["parameters"]["max_fpr"]
    for ax, ref in zip(axes, refs):
        les = result["lesion"][ref]
        ax.axvspan(0, max_fpr, color="#f2f2f2", zorder=0, label=f"pAUC region (FPR ≤ {max_fpr:g})")
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        for i, (name, s) in enumerate(les["scorers"].items()):
            if "roc_curve" not in s:
                continue
            ax.plot(s["roc_curve"]["fpr"], s["roc_curve"]["tpr"], c=_COLORS[i % 6], lw=1.5,
                    drawstyle="default",
                    label=f"{name}: AUC {_fmt_ci(s['roc_auc'])}")
        for j, (rname, rd) in enumerate(les["readers"].items()):
            b = rd["binary"]
            if "sensitivity" not in b or b["sensitivity"].get("estimate") is None \
                    or b["specificity"].get("estimate") is None:
                continue
            ax.plot(1 - b["specificity"]["estimate"], b["sensitivity"]["estimate"],
                    _READER_MARKERS[j % 6], mfc="white", mec="black", ms=5, ls="none",
                    label=rname.replace("_", " "))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("False positive rate (1 − specificity)")
        ax.set_ylabel("True positive rate (sensitivity)")
        ax.set_title(f"ROC per lesion vs {ref} (n = {les['n_lesions']}, {les['n_positive']} +)")
        ax.legend(loc="lower right", frameon=False)
        _style(ax)
    return _png(fig)


@_with_rc
def pr_figure(result: dict) -> bytes | None:
    """Precision-recall curves, one panel per reference, with the prevalence baseline."""
    refs = [r for r in result["parameters"]["references"]
            if any("pr_curve" in s for s in result["lesion"][r]["scorers"].values())]
    if not refs:
        return None
    fig = _fig(len(refs), height=3.4)
    axes = fig.subplots(1, len(refs), squeeze=False)[0]
    for ax, ref in zip(axes, refs):
        les = result["lesion"][ref]
        prev = les["n_positive"] / les["n_lesions"]
        ax.axhline(prev, ls=":", c="grey", lw=0.8, label=f"prevalence {prev:.2f}")
        for i, (name, s) in enumerate(les["scorers"].items()):
            if "pr_curve" not in s:
                continue
            r = np.r_[0.0, s["pr_curve"]["recall"]]
            p = np.r_[s["pr_curve"]["precision"][0], s["pr_curve"]["precision"]]
            boot = s["pr_auc"].get("bootstrap", {})
            ax.step(r, p, where="pre", c=_COLORS[i % 6], lw=1.5,
                    label=f"{name}: AP {_fmt_ci({**boot, 'estimate': s['pr_auc']['estimate']})}")
        for j, (rname, rd) in enumerate(les["readers"].items()):
            b = rd["binary"]
            if "sensitivity" not in b or b["ppv"].get("estimate") is None \
                    or b["sensitivity"].get("estimate") is None:
                continue
            ax.plot(b["sensitivity"]["estimate"], b["ppv"]["estimate"], _READER_MARKERS[j % 6],
                    mfc="white", mec="black", ms=5, ls="none", label=rname.replace("_", " "))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("Recall (sensitivity)")
        ax.set_ylabel("Precision (PPV)")
        ax.set_title(f"Precision–recall per lesion vs {ref}")
        ax.legend(loc="lower left", frameon=False)
        _style(ax)
    return _png(fig)


@_with_rc
def calibration_figure(result: dict) -> bytes | None:
    """Reliability diagram of probability scorers against the primary reference."""
    ref = result["parameters"]["reference"]
    sc = {n: s["calibration"] for n, s in result["lesion"][ref]["scorers"].items()
          if isinstance(s.get("calibration"), dict) and "reliability" in s["calibration"]}
    if not sc:
        return None
    fig = _fig(1, height=3.4, width_per=3.8)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8, label="perfect calibration")
    for i, (name, c) in enumerate(sc.items()):
        rel = c["reliability"]
        pts = [(m, o, n) for m, o, n in zip(rel["mean_predicted"], rel["observed_fraction"],
                                            rel["count"]) if n]
        m, o, n = map(np.asarray, zip(*pts))
        ax.plot(m, o, "-o", c=_COLORS[i % 6], ms=3 + 4 * np.sqrt(n / n.max()).mean(), lw=1.3,
                label=f"{name}: ECE {c['ece']:.3f}, Brier {c['brier']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("Mean predicted probability (bin)")
    ax.set_ylabel(f"Observed fraction positive ({ref})")
    ax.set_title("Calibration (reliability diagram)")
    ax.legend(loc="upper left", frameon=False)
    _style(ax)
    return _png(fig)


@_with_rc
def patient_counts_figure(result: dict) -> bytes | None:
    """Per-patient PRL counts by group for the reference(s) and each scorer."""
    pat = result["patient"]
    rows = pat.get("counts") or []
    if not rows:
        return None
    gcol = pat["group_column"]
    refs = result["parameters"]["references"]
    raters = refs + [s["name"] for s in result["inputs"]["scorers"] if s["name"] in rows[0]]
    groups = sorted({str(r[gcol]) for r in rows})
    fig = _fig(1, height=3.2, width_per=max(4.0, 1.2 * len(groups) * len(raters) ** 0.5 + 2))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    width = 0.8 / len(raters)
    for gi, g in enumerate(groups):
        for ri, r in enumerate(raters):
            v = np.array([x[r] for x in rows if str(x[gcol]) == g and x.get(r) is not None],
                         float)
            if v.size == 0:
                continue
            xc = gi + (ri - (len(raters) - 1) / 2) * width
            ax.scatter(xc + rng.uniform(-width * 0.3, width * 0.3, v.size), v, s=9,
                       c=_COLORS[ri % 6], alpha=0.75, lw=0,
                       label=r if gi == 0 else None)
            ax.hlines(np.median(v), xc - width * 0.4, xc + width * 0.4, colors="black", lw=1.2)
    for k in result["parameters"]["min_counts"]:
        ax.axhline(k - 0.5, ls="--", c="grey", lw=0.7)
        ax.text(len(groups) - 0.5, k - 0.5, f" ≥{k}", va="bottom", ha="right", fontsize=7,
                color="grey")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n = {sum(str(x[gcol]) == g for x in rows)})" for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("PRLs per patient (baseline)")
    ax.set_title("Per-patient PRL counts (bar = median; dashed = rule cut-offs)")
    ax.legend(loc="upper right", frameon=False, markerscale=1.5)
    _style(ax)
    return _png(fig)


@_with_rc
def agreement_figure(result: dict) -> bytes | None:
    """Heat map of pairwise Cohen's kappa among readers, references and scorer calls."""
    km = result["agreement"].get("kappa_matrix")
    if not km or len(km["raters"]) < 2:
        return None
    names = km["raters"]
    mat = np.array([[np.nan if v is None else v for v in row] for row in km["kappa"]], float)
    n = len(names)
    fig = _fig(1, height=0.42 * n + 1.4, width_per=0.5 * n + 2.4)
    ax = fig.subplots()
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="Blues")
    for i in range(n):
        for j in range(n):
            txt = "n.e." if np.isnan(mat[i, j]) else f"{mat[i, j]:.2f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if (not np.isnan(mat[i, j]) and mat[i, j] > 0.6) else "black")
    labels = [x.replace("_", " ") for x in names]
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=40, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels)
    ax.set_title("Per-lesion agreement (Cohen's κ)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="κ")
    return _png(fig)


def all_figures(result: dict) -> dict[str, dict]:
    """Every figure: ``{key: {"png": bytes, "caption": str}}`` (missing ones left out)."""
    ref = result["parameters"]["reference"]
    specs = [
        ("roc", roc_figure, "ROC curves per lesion (AUC with DeLong 95% CI); open markers are "
                            "the readers' operating points; shaded: partial-AUC region."),
        ("pr", pr_figure, "Precision–recall curves per lesion (average precision with "
                          "patient-cluster bootstrap 95% CI); dotted: prevalence."),
        ("calibration", calibration_figure, f"Reliability diagram of probability scores "
                                            f"against {ref} (10 equal-width bins)."),
        ("patient_counts", patient_counts_figure, "Baseline PRL counts per patient by group."),
        ("agreement", agreement_figure, "Pairwise Cohen's kappa per lesion among readers, "
                                        "references and scorer calls."),
    ]
    out = {}
    for key, fn, cap in specs:
        png = fn(result)
        if png:
            out[key] = {"png": png, "caption": cap}
    return out
