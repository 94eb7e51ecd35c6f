"""Write the evaluation report: ``report.json``, ``report.md`` and ``report.html``.

The HTML file is self-contained and works offline: CSS inline, figures embedded as base64
PNG. Tables are built once (:func:`build_tables`) and rendered to Markdown and HTML, so the
two always show the same numbers. Not-estimable entries show as "n.e." with the reason
listed at the end; ``report.json`` holds every number (``null`` plus a reason, never NaN).
"""

from __future__ import annotations

import base64
import html
import struct
from pathlib import Path

from evaluation._common import round_half_up
from qsm_core.io.atomic import write_json, write_text

__all__ = ["write_report", "build_tables", "render_markdown", "render_html", "fmt_ci", "fmt_p"]


# ---------------------------------------------------------------- formatting
def fmt_ci(e, *, pct: bool = False, digits: int | None = None) -> str:
    """``est (lo–hi)`` of a statistic dict; percentages with ``pct``; 'n.e.' if missing."""
    if not isinstance(e, dict) or e.get("estimate") is None:
        return "n.e."
    d = (1 if pct else 2) if digits is None else digits
    f = 100.0 if pct else 1.0

    def r(v):
        return round_half_up(f * v, d)

    s = r(e["estimate"]) + ("%" if pct else "")
    if e.get("ci_low") is not None and e.get("ci_high") is not None:
        s += f" ({r(e['ci_low'])}–{r(e['ci_high'])})"
    return s


def fmt_boot(e: dict, key: str, digits: int = 2) -> str:
    """Bootstrap interval of ``e[key]`` as ``lo–hi``."""
    b = (e.get(key) or {}).get("bootstrap") if isinstance(e.get(key), dict) else None
    if not b or b.get("ci_low") is None:
        return "n.e."
    return f"{b['ci_low']:.{digits}f}–{b['ci_high']:.{digits}f}"


def fmt_p(p) -> str:
    """p-value: '< 0.001' or three decimals; 'n.e.' when missing."""
    if p is None:
        return "n.e."
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_is(p) -> str:
    """'p = 0.012' or 'p < 0.001'."""
    s = fmt_p(p)
    return f"p {s}" if s.startswith("<") else f"p = {s}"


def _frac(e) -> str:
    if not isinstance(e, dict) or e.get("k") is None:
        return ""
    return f"{e['k']}/{e['n']}"


def _est(e, digits=2) -> str:
    return "n.e." if not isinstance(e, dict) or e.get("estimate") is None \
        else f"{e['estimate']:.{digits}f}"


# ---------------------------------------------------------------- tables
def _lesion_table(result: dict, ref: str) -> dict:
    les = result["lesion"][ref]
    rows = []
    for name, s in les["scorers"].items():
        b = s.get("binary", {})
        rows.append([name, fmt_ci(s["roc_auc"]), fmt_boot(s, "roc_auc"),
                     (_est(s["pr_auc"]) + (f" ({fmt_boot(s, 'pr_auc')})"
                                           if fmt_boot(s, "pr_auc") != "n.e." else "")),
                     _est(s["partial_auc"]),
                     fmt_ci(b.get("sensitivity"), pct=True), fmt_ci(b.get("specificity"),
                                                                     pct=True),
                     fmt_ci(s.get("kappa"))])
    for name, r in les["readers"].items():
        b = r["binary"]
        rows.append([name.replace("_", " ") + " †", "—", "—", "—", "—",
                     fmt_ci(b.get("sensitivity"), pct=True),
                     fmt_ci(b.get("specificity"), pct=True), fmt_ci(r.get("kappa"))])
    mf = result["parameters"]["max_fpr"]
    return {
        "id": f"lesion-{ref}",
        "title": f"Per-lesion performance against {ref} "
                 f"({les['n_lesions']} lesions, {les['n_positive']} positive, "
                 f"{les['n_patients']} patients; prevalence {fmt_ci(les['prevalence'], pct=True)})",
        "header": ["Scorer", "ROC AUC (DeLong 95% CI)", "AUC cluster-bootstrap CI",
                   "PR AUC (bootstrap CI)", f"pAUC FPR≤{mf:g}", "Sensitivity (95% CI)",
                   "Specificity (95% CI)", f"κ vs {ref} (95% CI)"],
        "rows": rows,
        "note": "Sensitivity/specificity with exact Clopper–Pearson CIs; κ with large-sample CI; "
                "pAUC McClish-standardised (0.5 = chance). † readers: binary calls only"
                + ("; the consensus includes each reader." if ref == "consensus" else "."),
    }


def _delong_table(result: dict) -> dict | None:
    rows = []
    for ref in result["parameters"]["references"]:
        for c in result["lesion"][ref]["paired_delong"]:
            if c.get("estimate") is None:
                rows.append([ref, f"{c.get('scorer_a')} − {c.get('scorer_b')}", "n.e.", "", "",
                             ""])
                continue
            rows.append([ref, f"{c['scorer_a']} − {c['scorer_b']}",
                         f"{c['auc_a']:.3f} vs {c['auc_b']:.3f}",
                         fmt_ci(c, digits=3),
                         ("n.e." if c["bootstrap"].get("ci_low") is None else
                          f"{c['bootstrap']['ci_low']:.3f}–{c['bootstrap']['ci_high']:.3f}"),
                         ("" if c.get("z") is None else f"z = {c['z']:.2f}, ")
                         + p_is(c["p_value"])])
    if not rows:
        return None
    return {"id": "delong", "title": "Paired comparison of lesion AUCs (DeLong test)",
            "header": ["Reference", "Difference", "AUCs", "ΔAUC (DeLong 95% CI)",
                       "ΔAUC cluster-bootstrap CI", "Test (two-sided)"], "rows": rows}


def _reader_table(result: dict) -> dict | None:
    ag = result["agreement"]
    rows = []
    for pair, k in (ag.get("pairwise_kappa_readers") or {}).items():
        rows.append([pair.replace("_", " "), fmt_ci(k), str(k.get("n", ""))])
    fk = ag.get("fleiss_kappa_readers")
    rows.append(["Fleiss' κ, all readers", _est(fk), str(fk.get("n_subjects", "")) if fk else ""])
    if ag.get("mean_pairwise_kappa_readers") is not None:
        rows.append(["mean pairwise Cohen's κ", f"{ag['mean_pairwise_kappa_readers']:.2f}", ""])
    return {"id": "readers", "title": "Inter-reader agreement per lesion",
            "header": ["Readers", "κ (95% CI)", "Lesions"], "rows": rows,
            "note": "Reader-vs-reference κ is in the per-lesion table."}


def _patient_table(result: dict) -> dict | None:
    pat = result["patient"]
    rules = pat.get("rules")
    if not isinstance(rules, dict) or "not_estimable" in rules:
        return {"id": "patient", "title": "Per-patient diagnosis rules",
                "header": ["Status"], "rows": [[(rules or {}).get("not_estimable", "n.e.")]]}
    rows = []
    for rule, by in rules.items():
        for rater, e in by.items():
            if "sensitivity" not in e:
                rows.append([rater, f"{rule} PRL", "n.e.", "n.e.", "", ""])
                continue
            c = e["counts"]
            rows.append([rater.replace("_", " "), f"{rule.replace('>=', '≥ ')} PRL",
                         f"{fmt_ci(e['sensitivity'], pct=True)} [{_frac(e['sensitivity'])}]",
                         f"{fmt_ci(e['specificity'], pct=True)} [{_frac(e['specificity'])}]",
                         fmt_ci(e["accuracy"], pct=True),
                         f"{c['tp']}/{c['fn']}/{c['tn']}/{c['fp']}"])
    return {"id": "patient",
            "title": f"Per-patient diagnosis: {pat['positive_group']} "
                     f"(n = {pat.get('n_positive_group')}) vs {pat['negative_group']} "
                     f"(n = {pat.get('n_negative_group')}), baseline scans",
            "header": ["PRLs counted by", "Rule", "Sensitivity (95% CI)",
                       "Specificity (95% CI)", "Accuracy (95% CI)", "TP/FN/TN/FP"],
            "rows": rows,
            "note": "A patient is called positive when at least k lesions are PRLs. Exact "
                    "Clopper–Pearson CIs."}


def _cohort_rows(rows: list, groups: list) -> list:
    out = []
    for r in rows:
        comp = r.get("comparison") or {}
        p = fmt_p(comp.get("p_value")) if comp else ""
        test = comp.get("test", comp.get("not_estimable", "")) if comp else ""
        if r["kind"] == "continuous":
            out.append([r["characteristic"]] + [r["groups"][g]["text"] for g in groups]
                       + [r["overall"]["text"], p, test])
        elif r["kind"] == "categorical":
            for i, lv in enumerate(r["levels"]):
                cells = []
                for g in groups + ["__overall"]:
                    d = (r["overall"] if g == "__overall" else r["groups"][g])["levels"][lv]
                    cells.append("" if d["percent"] is None else
                                 f"{d['count']} ({d['percent']:.0f}%)")
                out.append([f"{r['characteristic']}: {lv}"] + cells
                           + ([p, test] if i == 0 else ["", ""]))
        elif r["kind"] == "proportion":
            cells = []
            for g in groups + ["__overall"]:
                d = r["overall"] if g == "__overall" else r["groups"][g]
                cells.append("n/a" if d["percent"] is None else
                             f"{d['count']}/{d['n']} ({d['percent']:.1f}%)")
            out.append([r["characteristic"]] + cells + [p, test])
        else:
            d = r["overall"]
            cells = [""] * len(groups) + ["n/a" if d["percent"] is None else
                                          f"{d['count']}/{d['n']} ({d['percent']:.0f}%)"]
            out.append([r["characteristic"]] + cells + ["", ""])
    return out


def _cohort_table(result: dict) -> dict:
    co = result["cohort"]
    groups = list(co["groups"])
    return {"id": "cohort", "title": "Cohort characteristics and rim prevalence",
            "header": ["Characteristic"] + [f"{g} (n = {co['groups'][g]})" for g in groups]
            + ["All", "p", "Test"],
            "rows": _cohort_rows(co["rows"], groups),
            "note": "Continuous: mean ± SD; median [IQR]. " + co["tests"] + "."}


def _enh_table(result: dict) -> dict | None:
    rows = []
    for col, d in result["cohort"]["rim_enhancement"].items():
        for label, e in [("all", d["overall"])] + list(d["by_group"].items()):
            if "table" not in e:
                rows.append([col, label, "n.e.", "", "", "", e.get("not_estimable", "")])
                continue
            (a, b), (c, dd) = e["table"]
            comp = e["comparison"]
            rows.append([col, label, f"{a}", f"{b}", f"{c}", f"{dd}",
                         f"{p_is(comp.get('p_value'))} "
                         f"({comp.get('test', comp.get('not_estimable', ''))})"])
    if not rows:
        return None
    return {"id": "enhancement", "title": "Rims versus enhancement (baseline lesions)",
            "header": ["Rim by", "Group", "rim & enhancing", "rim & non-enh.",
                       "no rim & enhancing", "no rim & non-enh.", "Test"], "rows": rows}


def _calib_mcnemar_table(result: dict) -> dict | None:
    ref = result["parameters"]["reference"]
    rows = []
    for name, s in result["lesion"][ref]["scorers"].items():
        cal = s.get("calibration") or {}
        mc = "; ".join(f"{r.replace('_', ' ')}: b={m['b']}, c={m['c']}, {p_is(m['p_value'])}"
                       for r, m in s.get("mcnemar_vs_readers", {}).items() if "b" in m) or "n.e."
        rows.append([name, s.get("threshold", {}).get("source",
                                                      s.get("threshold", {}).get(
                                                          "not_estimable", "")),
                     "n.e." if cal.get("ece") is None else f"{cal['ece']:.3f}",
                     "n.e." if cal.get("brier") is None else f"{cal['brier']:.3f}", mc])
    if not rows:
        return None
    return {"id": "calibration", "title": f"Calls, calibration and McNemar tests (vs {ref})",
            "header": ["Scorer", "Calls from", "ECE", "Brier", "McNemar vs each reader "
                       "(b = scorer+/reader−, c = scorer−/reader+; exact p)"], "rows": rows}


def _count_table(result: dict) -> dict | None:
    rows = []
    for ref, by in result["patient"].get("count_agreement", {}).items():
        for r, e in by.items():
            md = e.get("mean_difference") or {}
            rows.append([ref, r.replace("_", " "), fmt_ci(e["icc"]),
                         (_est(e["spearman"]) + (f" ({p_is(e['spearman'].get('p_value'))})"
                                                 if e["spearman"].get("p_value") is not None
                                                 else "")),
                         "n.e." if md.get("estimate") is None else
                         f"{md['estimate']:+.2f} ± {md['sd'] or 0:.2f}"])
    if not rows:
        return None
    return {"id": "counts", "title": "Agreement of per-patient PRL counts",
            "header": ["Reference", "Counted by", "ICC(2,1) (95% CI)", "Spearman ρ",
                       "Mean difference ± SD"], "rows": rows}


def _followup_tables(result: dict) -> list:
    fu = result["followup"]
    if not isinstance(fu, dict) or "rows" not in fu:
        return [{"id": "followup", "title": "Follow-up", "header": ["Status"],
                 "rows": [[(fu or {}).get("not_estimable", "n.e.")]]}]
    groups = list(fu["groups"])
    t1 = {"id": "followup", "title": f"Follow-up ({fu['n_patients_with_followup']} patients "
                                      f"with ≥ 2 sessions)",
          "header": ["Characteristic"] + [f"{g} (n = {fu['groups'][g]})" for g in groups]
          + ["All", "p", "Test"], "rows": _cohort_rows(fu["rows"], groups),
          "note": fu["definition"]}
    rows = []
    for rater, e in fu["new_rim_rule"].items():
        if "sensitivity" not in e:
            rows.append([rater, "n.e.", "n.e."])
            continue
        rows.append([rater.replace("_", " "),
                     f"{fmt_ci(e['sensitivity'], pct=True)} [{_frac(e['sensitivity'])}]",
                     f"{fmt_ci(e['specificity'], pct=True)} [{_frac(e['specificity'])}]"])
    t2 = {"id": "followup-rule", "title": "Diagnostic value of “≥ 1 new rim at follow-up”",
          "header": ["New rims by", "Sensitivity (95% CI)", "Specificity (95% CI)"],
          "rows": rows}
    return [t1, t2]


def build_tables(result: dict) -> dict:
    """All report tables, as ``{"key": [...], "detail": [...]}``.

    Each table is a dict with ``id``, ``title``, ``header``, ``rows`` (strings) and an
    optional ``note``.
    """
    refs = result["parameters"]["references"]
    key = [_lesion_table(result, refs[0]), _delong_table(result), _reader_table(result),
           _patient_table(result)]
    detail = [_lesion_table(result, r) for r in refs[1:]]
    detail += [_cohort_table(result), _enh_table(result), _calib_mcnemar_table(result),
               _count_table(result)] + _followup_tables(result)
    return {"key": [t for t in key if t], "detail": [t for t in detail if t]}


# ---------------------------------------------------------------- markdown
def _md_table(t: dict) -> str:
    def esc(x):
        return str(x).replace("|", "\\|")
    lines = [f"### {t['title']}", "", "| " + " | ".join(map(esc, t["header"])) + " |",
             "|" + "|".join(["---"] * len(t["header"])) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in t["rows"]]
    if t.get("note"):
        lines += ["", f"*{t['note']}*"]
    return "\n".join(lines) + "\n"


def _provenance_lines(result: dict) -> list[str]:
    pv = result["provenance"]
    out = [f"Generated by {pv['generated_by']['name']} {pv['generated_by']['version']} "
           f"({pv['generated_by']['module']}) on {pv['created_utc']}; Python {pv['python']}."]
    for s in pv["inputs"]:
        sha = f", sha256 {s['sha256'][:12]}…" if s.get("sha256") else ""
        out.append(f"{s['kind']}: {s['source']} ({s['rows']} rows{sha})")
    return out


def _summary_sentences(result: dict) -> list[str]:
    ref = result["parameters"]["reference"]
    les = result["lesion"][ref]
    out = []
    for name, s in les["scorers"].items():
        if s["roc_auc"].get("estimate") is not None:
            out.append(f"{name}: lesion ROC AUC {fmt_ci(s['roc_auc'])} vs {ref} "
                       f"(cluster bootstrap {fmt_boot(s, 'roc_auc')}).")
    for c in les["paired_delong"]:
        if c.get("estimate") is not None:
            out.append(f"{c['scorer_a']} − {c['scorer_b']}: ΔAUC {fmt_ci(c, digits=3)}, "
                       f"DeLong {p_is(c['p_value'])}.")
    ag = result["agreement"]
    if ag.get("mean_pairwise_kappa_readers") is not None:
        out.append(f"Readers: mean pairwise κ {ag['mean_pairwise_kappa_readers']:.2f}, "
                   f"Fleiss' κ {_est(ag['fleiss_kappa_readers'])}.")
    pat = result["patient"]
    rules = pat.get("rules")
    if isinstance(rules, dict) and ">=1" in rules and ref in rules[">=1"]:
        e = rules[">=1"][ref]
        if "sensitivity" in e:
            out.append(f"≥ 1 PRL by {ref}: sensitivity {fmt_ci(e['sensitivity'], pct=True)}, "
                       f"specificity {fmt_ci(e['specificity'], pct=True)} for "
                       f"{pat['positive_group']} vs {pat['negative_group']}.")
    return out


def render_markdown(result: dict) -> str:
    """The report as Markdown (tables only; figures are in the HTML)."""
    tabs = build_tables(result)
    inp = result["inputs"]
    groups = ", ".join(f"{k}: {v}" for k, v in inp["groups"].items())
    parts = [f"# {result['title']}", "", *[f"- {x}" for x in _provenance_lines(result)], "",
             f"{inp['n_participants']} participants ({groups}), "
             f"{inp['n_sessions']} scans, {inp['n_lesions']} lesions; readers: "
             f"{', '.join(inp['readers']) or 'none'}; scorers: "
             f"{', '.join(s['name'] for s in inp['scorers']) or 'none'}.", "",
             "## Key results", "", *[f"- {s}" for s in _summary_sentences(result)], ""]
    parts += [_md_table(t) for t in tabs["key"]]
    parts += ["## Details", ""] + [_md_table(t) for t in tabs["detail"]]
    parts += ["## Not estimable", ""]
    ne = result.get("not_estimable") or []
    parts += [f"- `{e['path']}`: {e['reason']}" for e in ne] or ["- none"]
    if result.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    parts += ["", "## Methods", "", METHODS]
    return "\n".join(parts) + "\n"


METHODS = (
    "ROC AUC is the Mann–Whitney statistic; its 95% CI uses the DeLong structural-component "
    "variance (Wald, clipped to [0, 1]); pairs of scorers are compared with the paired DeLong "
    "z-test. Because lesions of one patient are correlated, every AUC, PR AUC and ΔAUC also has "
    "a patient-cluster bootstrap percentile interval (patients resampled with replacement, all "
    "their lesions kept). PR AUC is the average precision. The partial AUC over FPR ≤ max_fpr is "
    "McClish-standardised. Proportions (sensitivity, specificity, PPV, NPV) have exact "
    "Clopper–Pearson CIs. Cohen's κ has the Fleiss–Cohen–Everitt large-sample CI; Fleiss' κ "
    "summarises all readers; McNemar tests are exact binomial (mid-p in report.json). "
    "Per-patient rules count PRLs on each participant's baseline scan; participants without "
    "lesions count 0. PRL-count agreement: ICC(2,1) (absolute agreement) and Spearman's ρ. "
    "Cohort tables: Fisher's exact test when an expected count is < 5, otherwise chi-square "
    "(Yates-corrected for 2 × 2); Wilcoxon rank-sum for continuous variables. "
    "'n.e.' marks a statistic that the data cannot support; the reason is listed.")


# ---------------------------------------------------------------- html
_CSS = """
:root{--ink:#1b1b1b;--muted:#5d6670;--rule:#1b1b1b;--light:#e4e6e9;--accent:#1f4e79}
*{box-sizing:border-box}
body{font-family:"Georgia","Times New Roman",serif;color:var(--ink);background:#fff;margin:0}
main{max-width:1060px;margin:0 auto;padding:28px 36px 60px}
h1{font-size:26px;margin:0 0 4px;font-weight:600}
h2{font-size:18px;margin:34px 0 10px;border-bottom:2px solid var(--accent);padding-bottom:3px;
   color:var(--accent);font-family:"Helvetica Neue",Arial,sans-serif;font-weight:600}
.sub{color:var(--muted);font-size:13px;font-family:"Helvetica Neue",Arial,sans-serif}
.prov{font-family:"Helvetica Neue",Arial,sans-serif;font-size:12px;color:var(--muted);
      border:1px solid var(--light);background:#fafbfc;padding:10px 14px;margin:14px 0}
.prov code{font-size:11.5px}
.summary{background:#f4f7fb;border-left:4px solid var(--accent);padding:10px 16px;margin:12px 0;
         font-size:14.5px}
.summary li{margin:3px 0}
table{border-collapse:collapse;width:100%;margin:6px 0 4px;font-size:12.5px;
      font-family:"Helvetica Neue",Arial,sans-serif}
caption{caption-side:top;text-align:left;font-weight:600;font-size:13.5px;padding:0 0 6px;
        font-family:"Georgia",serif}
caption .num{color:var(--accent)}
thead th{border-top:2px solid var(--rule);border-bottom:1px solid var(--rule);text-align:left;
         padding:5px 8px;font-weight:600;vertical-align:bottom}
table{margin-bottom:18px}
table.narrow{width:auto;min-width:55%}
td:first-child{white-space:nowrap}
#cohort td:nth-last-child(2),#followup td:nth-last-child(2){white-space:nowrap}
#cohort td:last-child,#followup td:last-child{font-size:11px;color:var(--muted)}
tbody td{padding:4px 8px;border-bottom:1px solid var(--light);vertical-align:top}
tbody tr:last-child td{border-bottom:2px solid var(--rule)}
td:not(:first-child){font-variant-numeric:tabular-nums}
.note{font-size:11.5px;color:var(--muted);margin:2px 0 18px;font-family:"Helvetica Neue",Arial,
      sans-serif}
figure{margin:16px 0 22px;text-align:center}
figure img{max-width:100%;height:auto;border:1px solid var(--light)}
figcaption{font-size:12px;color:var(--muted);margin-top:4px;text-align:left;
           font-family:"Helvetica Neue",Arial,sans-serif}
.ne{font-size:12px;font-family:"Helvetica Neue",Arial,sans-serif}
.ne code{font-size:11px;color:var(--muted)}
.methods{font-size:13px;line-height:1.5}
@media print{main{padding:0}h2{break-after:avoid}table,figure{break-inside:avoid}}
"""


def _html_table(t: dict, num: int) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in t["header"])
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>"
                   for r in t["rows"])
    note = f'<p class="note">{e(t["note"])}</p>' if t.get("note") else ""
    cls = ' class="narrow"' if len(t["header"]) <= 3 else ""
    return (f'<table id="{e(t["id"])}"{cls}><caption><span class="num">Table {num}.</span> '
            f'{e(t["title"])}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f"</table>{note}")


def render_html(result: dict, figures: dict | None = None) -> str:
    """The report as one self-contained HTML page (figures as base64 PNG)."""
    e = html.escape
    tabs = build_tables(result)
    inp = result["inputs"]
    prov = "<br>".join(e(x) for x in _provenance_lines(result))
    par = result["parameters"]
    also = (" (also vs " + e(", ".join(par["references"][1:])) + ")"
            if len(par["references"]) > 1 else "")
    params = (f"reference: <b>{e(par['reference'])}</b>{also}; "
              f"threshold: {e(str(par['threshold']))}; groups: {e(par['group_column'])} "
              f"({e(str(par['positive_group']))} vs "
              f"{e(str(par['negative_group'] or 'all others'))}); bootstrap: {par['n_boot']} "
              f"patient resamples, seed {par['seed']}; confidence level "
              f"{100 * par['confidence_level']:g}%")
    n = 0
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(result['title'])}</title>",
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<style>{_CSS}</style></head><body><main>",
           f"<h1>{e(result['title'])}</h1>",
           f'<div class="sub">{inp["n_participants"]} participants '
           f"({e(', '.join(f'{k}: {v}' for k, v in inp['groups'].items()))}) · "
           f"{inp['n_sessions']} scans · {inp['n_lesions']} lesions · readers: "
           f"{e(', '.join(inp['readers']) or 'none')} · scorers: "
           f"{e(', '.join(s['name'] for s in inp['scorers']) or 'none')}</div>",
           f'<div class="prov">{prov}<br>{params}</div>',
           '<h2>Key results</h2><ul class="summary">'
           + "".join(f"<li>{e(s)}</li>" for s in _summary_sentences(result)) + "</ul>"]
    for t in tabs["key"]:
        n += 1
        out.append(_html_table(t, n))
    figures = figures or {}
    if figures:
        out.append("<h2>Figures</h2>")
        for i, (key, f) in enumerate(figures.items(), 1):
            b64 = base64.b64encode(f["png"]).decode("ascii")
            # 150-dpi PNGs shown at print size (96 CSS px per inch)
            width = int(struct.unpack(">I", f["png"][16:20])[0] * 96 / 150)
            out.append(f'<figure id="fig-{e(key)}"><img alt="{e(key)} figure" '
                       f'style="width:{width}px" src="data:image/png;base64,{b64}">'
                       f"<figcaption><b>Figure {i}.</b> "
                       f"{e(f['caption'])}</figcaption></figure>")
    out.append("<h2>Details</h2>")
    for t in tabs["detail"]:
        n += 1
        out.append(_html_table(t, n))
    ne = result.get("not_estimable") or []
    out.append('<h2>Not estimable</h2><ul class="ne">' + ("".join(
        f"<li><code>{e(x['path'])}</code>: {e(x['reason'])}</li>" for x in ne)
        or "<li>none</li>") + "</ul>")
    if result.get("notes"):
        out.append('<h2>Notes</h2><ul class="ne">'
                   + "".join(f"<li>{e(x)}</li>" for x in result["notes"]) + "</ul>")
    out.append(f'<h2>Methods</h2><p class="methods">{e(METHODS)}</p>')
    out.append("</main></body></html>")
    return "\n".join(out)


def write_report(result: dict, out_dir, *, figures: bool = True) -> list[Path]:
    """Write report.json, report.md and report.html atomically into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    if figures:
        from evaluation.figures import all_figures
        figs = all_figures(result)
    paths = [out / "report.json", out / "report.md", out / "report.html"]
    result = dict(result)
    result["files"] = [str(p) for p in paths]
    write_json(paths[0], result)
    write_text(paths[1], render_markdown(result))
    write_text(paths[2], render_html(result, figs))
    return paths
