"""The evaluation harness: every analysis of design.md §6 from three kinds of table.

:func:`evaluate` reads participants, lesions and any number of predictions tables, and
returns one nested dict holding every number (the content of ``report.json``); with
``out_dir`` it also writes ``report.json``, ``report.md`` and a self-contained
``report.html`` with figures.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import platform

import numpy as np
import pandas as pd

from evaluation import agreement, binary, calibration, roc
from evaluation._common import collect_not_estimable, json_safe, not_estimable
from evaluation.bootstrap import cluster_bootstrap
from evaluation.cohort import cohort_table
from evaluation.followup import followup_analysis
from evaluation.inputs import EvalData, Scorer, load_inputs, row_names
from evaluation.patient import count_agreement, group_labels, patient_counts, patient_rules
from qsm_core.errors import InputError, NotEstimableError, QSMRimError

__all__ = ["evaluate", "scorer_calls"]

log = logging.getLogger(__name__)


def _safe(fn, *args, **kwargs):
    """Call ``fn``; turn a NotEstimableError (or InputError about the data) into an entry."""
    try:
        return fn(*args, **kwargs)
    except QSMRimError as exc:
        return not_estimable(str(exc))


def scorer_calls(data: EvalData, scorer: Scorer, *, rule, reference: str,
                 n_folds: int = 5, seed: int = 0) -> tuple[np.ndarray | None, dict]:
    """0/1 calls of a scorer under a threshold rule, and how they were made.

    Parameters
    ----------
    rule : 'call', float, 'youden' or 'sensitivity=T'
        ``'call'`` uses the scorer's ``NAME_call`` column; a number is applied to
        probability scorers (``NAME_prob``) and to score-only scorers; scorers with
        ``NAME_score`` and their own calls keep them. 'youden'/'sensitivity=T' choose
        thresholds on out-of-fold patients against ``reference``.

    Returns
    -------
    calls : ndarray of int, shape (N,), or None when not estimable
    info : dict
        ``source`` (how), ``threshold`` or ``fold_thresholds``; or not-estimable.
    """
    kind, value = binary.parse_threshold_rule(rule)
    les = data.lesions
    score = les[scorer.score_column].to_numpy(float) if scorer.score_column else None
    own = les[scorer.call_column].to_numpy(float) if scorer.call_column else None

    def from_own():
        if own is None:
            return None, not_estimable(f"scorer {scorer.name!r} has no {scorer.name}_call "
                                       f"column; give a numeric threshold or 'youden'")
        if np.isnan(own).any():
            return None, not_estimable(f"{int(np.isnan(own).sum())} lesion(s) without "
                                       f"{scorer.call_column}: {row_names(les, np.isnan(own))}")
        return own.astype(int), {"source": f"own call column {scorer.call_column}"}

    if kind == "call" or (kind == "fixed" and scorer.kind == "score" and own is not None):
        return from_own()
    if score is None:
        return None, not_estimable(f"scorer {scorer.name!r} has no continuous score for "
                                   f"threshold rule {rule!r}")
    if np.isnan(score).any():
        return None, not_estimable(f"{int(np.isnan(score).sum())} lesion(s) without "
                                   f"{scorer.score_column}: {row_names(les, np.isnan(score))}")
    if kind == "fixed":
        return (score >= value).astype(int), {"source": f"{scorer.score_column} >= {value:g}",
                                              "threshold": value}
    try:
        r = binary.out_of_fold_calls(les[reference].to_numpy(), score,
                                     les["participant_id"].to_numpy(), rule=rule,
                                     n_folds=n_folds, seed=seed)
    except QSMRimError as exc:
        return None, not_estimable(str(exc))
    return r["calls"], {"source": f"{scorer.score_column} >= out-of-fold {rule} threshold "
                                  f"({r['n_folds']} patient folds vs {reference})",
                        "fold_thresholds": r["fold_thresholds"]}


def _lesion_bootstrap(y, scores: dict, groups, *, n_boot, seed, alpha, max_fpr) -> dict:
    names = list(scores)
    mat = np.vstack([scores[n] for n in names]) if names else np.zeros((0, y.size))
    pairs = list(itertools.combinations(range(len(names)), 2))

    yb_all = np.asarray(y, bool)

    def stat(idx):
        yb = yb_all[idx]
        if yb.all() or not yb.any():
            raise NotEstimableError("single class")
        met = np.array([roc.fast_metrics(yb, s[idx], max_fpr=max_fpr) for s in mat])
        auc = met[:, 0]
        diff = [auc[i] - auc[j] for i, j in pairs]
        return np.r_[auc, met[:, 1], met[:, 2], diff]

    if not names:
        return {}
    try:
        res = cluster_bootstrap(stat, groups, n_boot=n_boot, alpha=alpha, seed=seed)
    except QSMRimError as exc:
        ne = not_estimable(str(exc))
        res = [ne] * (3 * len(names) + len(pairs))
    k = len(names)
    out = {n: {"roc_auc": res[i], "pr_auc": res[k + i], "partial_auc": res[2 * k + i]}
           for i, n in enumerate(names)}
    out["_pairs"] = {(names[i], names[j]): res[3 * k + p] for p, (i, j) in enumerate(pairs)}
    return out


def _lesion_level(data: EvalData, ref: str, calls: dict, *, n_boot, seed, alpha,
                  max_fpr) -> dict:
    les = data.lesions
    y = les[ref].to_numpy(int)
    groups = les["participant_id"].to_numpy()
    out: dict = {"reference": ref, "n_lesions": int(y.size), "n_positive": int(y.sum()),
                 "n_patients": int(pd.unique(groups).size),
                 "prevalence": binary.proportion(int(y.sum()), int(y.size), alpha=alpha)}
    valid: dict[str, np.ndarray] = {}
    scorers: dict = {}
    single = bool(y.all() or not y.any())
    for s in data.scorers:
        e: dict = {"kind": s.kind, "score_column": s.score_column}
        if s.score_column is None:
            msg = f"scorer {s.name!r} has only 0/1 calls (no NAME_prob or NAME_score column)"
            e["roc_auc"] = e["pr_auc"] = e["partial_auc"] = not_estimable(msg)
        else:
            sc = les[s.score_column].to_numpy(float)
            if np.isnan(sc).any():
                msg = (f"{int(np.isnan(sc).sum())} lesion(s) have no {s.score_column} value "
                       f"({row_names(les, np.isnan(sc))}); fix the predictions table")
                e["roc_auc"] = e["pr_auc"] = e["partial_auc"] = not_estimable(msg)
                e["calibration"] = not_estimable(msg)
            elif single:
                msg = (f"only one class by {ref} ({int(y.sum())} positive of {y.size} "
                       f"lesions); ROC/PR need both")
                e["roc_auc"] = e["pr_auc"] = e["partial_auc"] = not_estimable(msg)
                e["calibration"] = _safe(calibration.calibration, y, sc) if s.kind == "prob" \
                    else not_estimable("not a probability (NAME_score column)")
            else:
                valid[s.name] = sc
                e["roc_auc"] = roc.delong(y, sc, alpha=alpha)
                e["pr_auc"] = {"estimate": roc.average_precision(y, sc),
                               "baseline_prevalence": float(y.mean()),
                               "method": "average precision (step-wise PR area)"}
                e["partial_auc"] = {"estimate": roc.partial_auc(y, sc, max_fpr=max_fpr),
                                    "raw": roc.partial_auc(y, sc, max_fpr=max_fpr,
                                                           standardized=False),
                                    "max_fpr": max_fpr,
                                    "method": f"McClish-standardised partial AUC, "
                                              f"FPR <= {max_fpr:g}"}
                rc, pc = roc.roc_curve(y, sc), roc.pr_curve(y, sc)
                e["roc_curve"] = {"fpr": rc["fpr"], "tpr": rc["tpr"]}
                e["pr_curve"] = {"recall": pc["recall"], "precision": pc["precision"]}
                e["calibration"] = (_safe(calibration.calibration, y, sc) if s.kind == "prob"
                                    else not_estimable("not a probability (NAME_score column)"))
        c, info = calls[s.name]
        e["threshold"] = info
        if c is None:
            e["binary"] = not_estimable(info.get("not_estimable", "no calls"))
            e["kappa"] = not_estimable(info.get("not_estimable", "no calls"))
            e["mcnemar_vs_readers"] = {}
        else:
            e["binary"] = binary.sens_spec(y, c, alpha=alpha)
            e["kappa"] = _safe(agreement.cohen_kappa, c, y, alpha=alpha)
            mc = {}
            for r in data.readers:
                rv = les[r].to_numpy(float)
                mc[r] = (not_estimable(f"{r} has missing calls") if np.isnan(rv).any()
                         else agreement.mcnemar(c, rv, method="exact"))
                if "not_estimable" not in mc[r]:
                    mc[r]["p_value_midp"] = agreement.mcnemar(c, rv, method="midp")["p_value"]
            e["mcnemar_vs_readers"] = mc
        scorers[s.name] = e
    boot = _lesion_bootstrap(y, valid, groups, n_boot=n_boot, seed=seed, alpha=alpha,
                             max_fpr=max_fpr) if valid else {}
    for name in valid:
        for key in ("roc_auc", "pr_auc", "partial_auc"):
            scorers[name][key]["bootstrap"] = boot[name][key]
    out["scorers"] = scorers
    comps = []
    for a, b in itertools.combinations(list(valid), 2):
        d = _safe(roc.delong_paired, y, valid[a], valid[b], alpha=alpha)
        d.update(scorer_a=a, scorer_b=b, bootstrap=boot["_pairs"][(a, b)])
        comps.append(d)
    out["paired_delong"] = comps
    readers = {}
    for r in data.readers:
        rv = les[r].to_numpy(float)
        if np.isnan(rv).any():
            readers[r] = {"binary": not_estimable(f"{r} has missing calls"),
                          "kappa": not_estimable(f"{r} has missing calls")}
            continue
        readers[r] = {"binary": binary.sens_spec(y, rv.astype(int), alpha=alpha),
                      "kappa": _safe(agreement.cohen_kappa, rv.astype(int), y, alpha=alpha)}
        if ref == "consensus":
            readers[r]["note"] = "the consensus includes this reader (agreement is inflated)"
    out["readers"] = readers
    return out


def _agreement(data: EvalData, refs: list[str], calls: dict, *, alpha) -> dict:
    les = data.lesions
    raters = {r: les[r].to_numpy(float) for r in data.readers}
    for r in refs:
        raters[r] = les[r].to_numpy(float)
    for name, (c, _) in calls.items():
        if c is not None:
            raters[f"{name} (call)"] = np.asarray(c, float)
    out: dict = {}
    if len(data.readers) >= 2:
        m = les[data.readers].to_numpy(float)
        ok = ~np.isnan(m).any(1)
        out["fleiss_kappa_readers"] = _safe(agreement.fleiss_kappa, m[ok].astype(int))
        if isinstance(out["fleiss_kappa_readers"], dict):
            out["fleiss_kappa_readers"]["n_excluded_missing"] = int((~ok).sum())
        pair = {}
        for a, b in itertools.combinations(data.readers, 2):
            okp = ~(np.isnan(raters[a]) | np.isnan(raters[b]))
            pair[f"{a} vs {b}"] = _safe(agreement.cohen_kappa, raters[a][okp].astype(int),
                                        raters[b][okp].astype(int), alpha=alpha)
        out["pairwise_kappa_readers"] = pair
        vals = [v["estimate"] for v in pair.values() if "not_estimable" not in v]
        out["mean_pairwise_kappa_readers"] = float(np.mean(vals)) if vals else None
    else:
        out["fleiss_kappa_readers"] = not_estimable("fewer than two reader_* columns")
    names = list(raters)
    mat = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            okp = ~(np.isnan(raters[a]) | np.isnan(raters[b]))
            try:
                mat[i, j] = agreement.cohen_kappa(raters[a][okp].astype(int),
                                                  raters[b][okp].astype(int))["estimate"]
            except QSMRimError:
                pass
    out["kappa_matrix"] = {"raters": names, "kappa": [[None if np.isnan(v) else float(v)
                                                       for v in row] for row in mat]}
    return out


def evaluate(participants, lesions, predictions_list=(), *, truth_column: str | None =
             "truth_prl", reference: str = "consensus", scorers=None, threshold="call",
             group_column: str = "diagnosis", positive_group: str = "MS",
             negative_group: str | None = None, n_boot: int = 2000, seed: int = 0,
             alpha: float = 0.05, max_fpr: float = 0.1, n_folds: int = 5,
             min_counts=(1, 4), out_dir=None, title: str | None = None,
             figures: bool = True, scored_only: bool = False) -> dict:
    """Evaluate scorers against readers and consensus, per lesion and per patient.

    Parameters
    ----------
    participants, lesions : path or DataFrame
        participants.tsv and lesions.tsv (see :mod:`evaluation.inputs`).
    predictions_list : sequence of path or DataFrame
        Any number of predictions tables (scorers auto-detected from ``*_prob``,
        ``*_score``, ``*_call``).
    truth_column : str or None
        Ground-truth 0/1 lesion column; when present, everything is also reported
        against it. Absent columns are noted, not an error.
    reference : str
        The primary per-lesion reference column (default ``consensus``).
    scorers : list of str, optional
        Scorer names to evaluate (default: all detected).
    threshold : 'call', float, 'youden' or 'sensitivity=T'
        How 0/1 calls are made (see :func:`scorer_calls`).
    group_column, positive_group, negative_group : str
        Per-patient diagnosis rules: the positive group (e.g. MS) against the negative one
        (default: every other participant).
    n_boot, seed, alpha : int, int, float
        Cluster bootstrap replicates, seed, and 1 - confidence level.
    max_fpr : float
        Upper FPR of the partial AUC.
    n_folds : int
        Patient folds for out-of-fold threshold choice.
    min_counts : tuple of int
        Per-patient "at least k PRLs" rules.
    out_dir : path, optional
        Write ``report.json``, ``report.md`` and ``report.html`` there.
    title : str, optional
        Report title.
    figures : bool
        Draw figures (HTML report only).
    scored_only : bool
        Evaluate only the lesions that the predictions score (see
        :func:`evaluation.inputs.load_inputs`); the excluded ones are listed in the notes.

    Returns
    -------
    dict
        Every number of the report (JSON-safe: no NaN; not-estimable entries carry
        ``null`` and a reason). ``result["files"]`` lists files written.
    """
    started = _dt.datetime.now(_dt.UTC)
    opt_truth = [truth_column] if truth_column and truth_column != reference else []
    data = load_inputs(participants, lesions, predictions_list, group_column=group_column,
                       reference_columns=[reference], optional_reference_columns=opt_truth,
                       scored_only=scored_only)
    notes = list(data.notes)
    refs = [reference]
    if opt_truth:
        if truth_column in data.lesions.columns:
            refs.append(truth_column)
        else:
            notes.append(f"no truth column {truth_column!r} in the lesions table; results "
                         f"are against {reference!r} only")
    if scorers is not None:
        known = [s.name for s in data.scorers]
        unknown = [s for s in scorers if s not in known]
        if unknown:
            raise InputError(f"unknown scorer(s) {unknown}; scorers found in the predictions: "
                             f"{known}")
        data.scorers = [s for s in data.scorers if s.name in scorers]
    binary.parse_threshold_rule(threshold)  # validate early
    labels = group_labels(data.participants, group_column=group_column,
                          positive_group=positive_group, negative_group=negative_group)
    calls = {s.name: scorer_calls(data, s, rule=threshold, reference=reference,
                                  n_folds=n_folds, seed=seed) for s in data.scorers}
    for name, (c, _) in calls.items():
        if c is not None:
            data.lesions[f"{name}__call"] = c
    log.info("evaluating %d lesions of %d participants, %d scorer(s), %d reader(s)",
             len(data.lesions), len(data.participants), len(data.scorers), len(data.readers))

    lesion = {r: _lesion_level(data, r, calls, n_boot=n_boot, seed=seed, alpha=alpha,
                               max_fpr=max_fpr) for r in refs}
    agree = _agreement(data, refs, calls, alpha=alpha)

    rater_cols = {r: r for r in refs}
    rater_cols.update({r: r for r in data.readers})
    rater_cols.update({n: f"{n}__call" for n, (c, _) in calls.items() if c is not None})
    counts = patient_counts(data.participants, data.lesions, rater_cols)
    patient: dict = {"group_column": group_column, "positive_group": positive_group,
                     "negative_group": negative_group or "all other participants",
                     "session": "baseline (earliest session of each participant)"}
    patient["n_positive_group"] = int((labels == 1).sum())
    patient["n_negative_group"] = int((labels == 0).sum())
    patient["rules"] = patient_rules(counts, labels, list(rater_cols), min_counts=min_counts,
                                     alpha=alpha)
    patient["count_agreement"] = {r: count_agreement(counts, r, list(rater_cols))
                                  for r in refs}
    counts_out = counts.reset_index()
    counts_out.insert(1, group_column,
                      data.participants.set_index("participant_id")[group_column]
                      .reindex(counts.index).to_numpy())
    patient["counts"] = counts_out.to_dict("records")

    cohort = cohort_table(data.participants, data.lesions, group_column=group_column,
                          rim_columns=refs, seed=seed)
    follow = followup_analysis(data.participants, data.lesions, group_column=group_column,
                               labels=labels, rim_columns=rater_cols, alpha=alpha)

    from qsm_core import __version__
    result = {
        "title": title or "qsmrim evaluation report",
        "provenance": {
            "generated_by": {"name": "qsmrim", "version": __version__,
                             "module": "evaluation.harness.evaluate"},
            "created_utc": started.isoformat(timespec="seconds"),
            "python": platform.python_version(), "numpy": np.__version__,
            "pandas": pd.__version__, "inputs": data.sources},
        "parameters": {"reference": reference, "references": refs, "truth_column": truth_column,
                       "threshold": threshold, "group_column": group_column,
                       "positive_group": positive_group, "negative_group": negative_group,
                       "n_boot": n_boot, "seed": seed, "alpha": alpha,
                       "confidence_level": 1 - alpha, "max_fpr": max_fpr, "n_folds": n_folds,
                       "min_counts": list(min_counts)},
        "inputs": {"n_participants": int(len(data.participants)),
                   "n_lesions": int(len(data.lesions)),
                   "n_sessions": int(data.lesions[["participant_id", "session_id"]]
                                     .drop_duplicates().shape[0]),
                   "readers": data.readers, "scorers": [s.as_dict() for s in data.scorers],
                   "groups": data.participants[group_column].value_counts().sort_index()
                   .to_dict()},
        "notes": notes,
        "lesion": lesion, "agreement": agree, "patient": patient, "cohort": cohort,
        "followup": follow,
    }
    problems: list = []
    result = json_safe(result, problems=problems)
    result["not_estimable"] = collect_not_estimable(result)
    result["nonfinite_replaced"] = [{"path": p, "reason": r} for p, r in problems]
    if out_dir is not None:
        from evaluation.report import write_report
        result["files"] = [str(p) for p in write_report(result, out_dir, figures=figures)]
    return result
