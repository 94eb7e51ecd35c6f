"""Synthetic evaluation tables with known properties (used by the evaluation tests)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_tables(rng, *, n_ms=20, n_nmosd=15, lesions_ms=8, lesions_nmosd=3, rim_ms=0.4,
                rim_nmosd=0.08, reader_error=0.1, n_readers=3, followup=False,
                cnn_shift=2.0, rule_shift=1.0):
    """participants, lesions, predictions DataFrames of a simulated MS/NMOSD cohort.

    Scores: ``cnn_prob = sigmoid(cnn_shift * truth + N(0,1) - cnn_shift/2)`` and
    ``rule_score = rule_shift * truth + N(0,1)``; readers flip the truth with probability
    ``reader_error``; consensus is the majority.
    """
    parts, les = [], []
    pid = 0
    for diag, n, lam, p_rim in (("MS", n_ms, lesions_ms, rim_ms),
                                ("NMOSD", n_nmosd, lesions_nmosd, rim_nmosd)):
        for _ in range(n):
            pid += 1
            sub = f"sub-{pid:03d}"
            parts.append({"participant_id": sub, "diagnosis": diag,
                          "age": float(rng.normal(40 if diag == "MS" else 45, 10)),
                          "sex": str(rng.choice(["F", "M"], p=[0.7, 0.3]))})
            sessions = ["ses-01", "ses-02"] if followup else ["n/a"]
            n_les = int(rng.poisson(lam))
            truth = (rng.random(n_les) < p_rim).astype(int)
            enh = (rng.random(n_les) < 0.1).astype(int)
            ids = list(range(1, n_les + 1))
            for si, ses in enumerate(sessions):
                if si == 1:
                    n_new = int(rng.poisson(1.0 if diag == "MS" else 0.2))
                    ids = ids + list(range(len(ids) + 1, len(ids) + 1 + n_new))
                    new_truth = (rng.random(n_new) < (0.5 if diag == "MS" else 0.02)).astype(int)
                    truth = np.r_[truth, new_truth]
                    enh = np.r_[enh, (rng.random(n_new) < 0.5).astype(int)]
                for k, lid in enumerate(ids):
                    les.append({"participant_id": sub, "session_id": ses, "lesion_id": lid,
                                "centroid_x_mm": 0.0, "centroid_y_mm": 0.0,
                                "centroid_z_mm": 0.0, "volume_mm3": 50.0,
                                "truth_prl": int(truth[k]), "enhancing": int(enh[k])})
    part = pd.DataFrame(parts)
    lesions = pd.DataFrame(les)
    t = lesions["truth_prl"].to_numpy()
    n = len(lesions)
    reads = []
    for r in range(n_readers):
        flip = rng.random(n) < reader_error
        call = np.where(flip, 1 - t, t)
        lesions[f"reader_{r + 1}"] = call
        reads.append(call)
    lesions["consensus"] = (np.sum(reads, axis=0) * 2 > n_readers).astype(int)
    z = cnn_shift * t + rng.normal(size=n) - cnn_shift / 2
    cnn = 1 / (1 + np.exp(-z))
    rule = rule_shift * t + rng.normal(size=n)
    pred = lesions[["participant_id", "session_id", "lesion_id"]].copy()
    pred["cnn_prob"] = cnn
    pred["cnn_call"] = (cnn >= 0.5).astype(int)
    pred["rule_score"] = rule
    pred["rule_call"] = (rule >= 0.5).astype(int)
    return part, lesions, pred
