"""Cohort table in the style of the seed study's Table 1.

Categorical rows are compared between groups with Fisher's exact test when any expected
count is below 5 (2 x 2: scipy's exact test; larger tables: Fisher-Freeman-Halton by Monte
Carlo with a fixed seed), else Pearson's chi-square (Yates-corrected for 2 x 2). Continuous
rows use the Wilcoxon rank-sum test (Mann-Whitney U; Kruskal-Wallis for more than two
groups). The test chosen is written beside every p-value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from evaluation._common import not_estimable
from evaluation.patient import baseline_lesions, patient_counts

__all__ = ["categorical_test", "continuous_test", "cohort_table", "rim_enhancement"]

_SKIP = {"participant_id", "session_id"}


def categorical_test(table, *, seed: int = 0) -> dict:
    """Independence test of a groups x levels counts table, chosen by expected counts.

    Returns
    -------
    dict
        ``p_value``, ``test`` (the name and why), ``min_expected``; or not estimable.
    """
    t = np.asarray(table, dtype=float)
    t = t[t.sum(1) > 0][:, t.sum(0) > 0] if t.size else t
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 2:
        return not_estimable("fewer than two groups or two levels with data")
    expected = stats.contingency.expected_freq(t)
    small = bool((expected < 5).any())
    min_e = float(expected.min())
    if small and t.shape == (2, 2):
        res = stats.fisher_exact(t.astype(int))
        return {"p_value": float(res.pvalue), "min_expected": min_e,
                "test": "Fisher's exact (an expected count < 5)"}
    if small:
        res = stats.fisher_exact(t.astype(int), method=stats.MonteCarloMethod(
            n_resamples=9999, rng=np.random.default_rng(seed)))
        return {"p_value": float(res.pvalue), "min_expected": min_e,
                "test": "Fisher-Freeman-Halton, Monte Carlo 9999 tables (an expected "
                        "count < 5)"}
    res = stats.chi2_contingency(t, correction=True)
    name = "chi-square, Yates-corrected" if t.shape == (2, 2) else "chi-square"
    return {"p_value": float(res.pvalue), "statistic": float(res.statistic),
            "dof": int(res.dof), "min_expected": min_e, "test": f"{name} (expected counts >= 5)"}


def continuous_test(samples: list) -> dict:
    """Wilcoxon rank-sum (2 groups) or Kruskal-Wallis (more) test of continuous values."""
    xs = [np.asarray(s, float)[np.isfinite(np.asarray(s, float))] for s in samples]
    xs = [x for x in xs if x.size]
    if len(xs) < 2:
        return not_estimable("fewer than two groups with data")
    allv = np.concatenate(xs)
    if np.ptp(allv) == 0:
        return {"p_value": 1.0, "test": "all values equal"}
    if len(xs) == 2:
        res = stats.mannwhitneyu(xs[0], xs[1], alternative="two-sided", method="auto")
        return {"p_value": float(res.pvalue), "statistic": float(res.statistic),
                "test": "Wilcoxon rank-sum (Mann-Whitney U)"}
    res = stats.kruskal(*xs)
    return {"p_value": float(res.pvalue), "statistic": float(res.statistic),
            "test": "Kruskal-Wallis"}


def _summ_cont(x) -> dict:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0, "text": "n/a"}
    q1, med, q3 = np.quantile(x, [0.25, 0.5, 0.75])
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {"n": int(x.size), "mean": float(x.mean()), "sd": sd, "median": float(med),
            "q1": float(q1), "q3": float(q3),
            "text": f"{x.mean():.1f} ± {sd:.1f}; {med:.1f} [{q1:.1f}–{q3:.1f}]"}


def _cont_row(label: str, values_by_group: dict) -> dict:
    return {"characteristic": label, "kind": "continuous",
            "groups": {g: _summ_cont(v) for g, v in values_by_group.items()},
            "overall": _summ_cont(np.concatenate([np.asarray(v, float)
                                                   for v in values_by_group.values()])),
            "comparison": continuous_test(list(values_by_group.values())),
            "format": "mean ± SD; median [IQR]"}


def _cat_row(label: str, series_by_group: dict, *, seed: int = 0) -> dict:
    levels = sorted({str(v) for s in series_by_group.values() for v in s if pd.notna(v)})
    groups = {}
    table = []
    for g, s in series_by_group.items():
        s = pd.Series(s).dropna().astype(str)
        counts = [int((s == lv).sum()) for lv in levels]
        table.append(counts)
        n = len(s)
        groups[g] = {"n": n, "levels": {lv: {"count": c, "percent": 100 * c / n if n else None}
                                        for lv, c in zip(levels, counts)}}
    tot = np.asarray(table).sum(0) if table else np.zeros(len(levels))
    ntot = int(tot.sum())
    return {"characteristic": label, "kind": "categorical", "levels": levels, "groups": groups,
            "overall": {"n": ntot, "levels": {lv: {"count": int(c), "percent":
                                                   100 * c / ntot if ntot else None}
                                              for lv, c in zip(levels, tot)}},
            "comparison": categorical_test(np.asarray(table), seed=seed), "format": "n (%)"}


def _prop_row(label: str, k_n_by_group: dict, unit: str) -> dict:
    groups, table = {}, []
    for g, (k, n) in k_n_by_group.items():
        groups[g] = {"count": int(k), "n": int(n), "percent": 100 * k / n if n else None}
        table.append([k, n - k])
    K = sum(k for k, _ in k_n_by_group.values())
    N = sum(n for _, n in k_n_by_group.values())
    return {"characteristic": label, "kind": "proportion", "unit": unit, "groups": groups,
            "overall": {"count": int(K), "n": int(N), "percent": 100 * K / N if N else None},
            "comparison": categorical_test(np.asarray(table)), "format": "n/N (%)"}


def rim_enhancement(lesions: pd.DataFrame, rim_column: str) -> dict:
    """Lesion-level 2 x 2 table of rim (rows) by enhancement (columns), with its test."""
    if "enhancing" not in lesions.columns:
        return not_estimable("no 'enhancing' column in the lesions table")
    d = lesions[[rim_column, "enhancing"]].dropna()
    t = np.zeros((2, 2), dtype=int)
    for i in (0, 1):
        for j in (0, 1):
            t[i, j] = int(((d[rim_column] == 1 - i) & (d["enhancing"] == 1 - j)).sum())
    out = {"rows": ["rim", "no rim"], "columns": ["enhancing", "non-enhancing"],
           "table": t.tolist(), "n": int(t.sum()), "comparison": categorical_test(t)}
    return out


def cohort_table(participants: pd.DataFrame, lesions: pd.DataFrame, *, group_column: str,
                 rim_columns: list[str], seed: int = 0) -> dict:
    """Per-group characteristics and rim prevalence with between-group tests.

    Parameters
    ----------
    participants, lesions : DataFrame
        Validated tables.
    group_column : str
        Grouping column of participants.
    rim_columns : list of str
        0/1 lesion columns to summarise (the reference first, e.g. consensus, truth_prl).

    Returns
    -------
    dict
        ``groups`` (names and sizes), ``rows`` (one dict per characteristic) and
        ``rim_enhancement`` per rim column (overall and per group).
    """
    groups = sorted(participants[group_column].astype(str).unique().tolist())
    part = participants.set_index("participant_id")
    by = {g: part.index[part[group_column].astype(str) == g] for g in groups}
    rows = []
    for col in participants.columns:
        if col in _SKIP or col == group_column:
            continue
        s = part[col]
        num = pd.to_numeric(s, errors="coerce")
        if num.notna().sum() == s.notna().sum() and s.notna().any():
            rows.append(_cont_row(col, {g: num.loc[idx].to_numpy() for g, idx in by.items()}))
        elif 1 < s.dropna().nunique() <= 8:
            rows.append(_cat_row(col, {g: s.loc[idx].tolist() for g, idx in by.items()},
                                 seed=seed))
    counts = patient_counts(participants, lesions, {c: c for c in rim_columns})
    base = baseline_lesions(lesions)
    rows.append(_cont_row("lesions per patient (baseline)",
                          {g: counts.loc[idx, "n_lesions"].to_numpy() for g, idx in by.items()}))
    rows.append(_prop_row("patients without lesions",
                          {g: (int((counts.loc[idx, "n_lesions"] == 0).sum()), len(idx))
                           for g, idx in by.items()}, "patients"))
    enh = {}
    for c in rim_columns:
        rows.append(_prop_row(f"patients with ≥1 PRL ({c})",
                              {g: (int((counts.loc[idx, c] >= 1).sum()), len(idx))
                               for g, idx in by.items()}, "patients"))
        rows.append(_cont_row(f"PRLs per patient ({c})",
                              {g: counts.loc[idx, c].to_numpy() for g, idx in by.items()}))
        kn = {}
        for g, idx in by.items():
            sel = base[base["participant_id"].isin(idx)][c]
            kn[g] = (int(sel.sum()), int(sel.size))
        row = _prop_row(f"lesions with PRL ({c})", kn, "lesions")
        row["note"] = "lesion-level test ignores clustering of lesions within patients"
        rows.append(row)
        enh[c] = {"overall": rim_enhancement(base, c),
                  "by_group": {g: rim_enhancement(base[base["participant_id"].isin(idx)], c)
                               for g, idx in by.items()}}
    return {"group_column": group_column, "groups": {g: int(len(idx)) for g, idx in by.items()},
            "rows": rows, "rim_enhancement": enh,
            "tests": "categorical: Fisher's exact if any expected count < 5, else chi-square; "
                     "continuous: Wilcoxon rank-sum (Kruskal-Wallis for > 2 groups)"}
