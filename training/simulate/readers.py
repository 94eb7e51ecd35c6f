"""Simulated readers: PRL calls from rim conspicuity, with vein- and incomplete-rim mistakes.

Each reader sees an *evidence* value per lesion, in units of contrast-to-noise on QSM:

    E = rim contrast x partial-volume factor x coverage factor / sigma_QSM      (true rims)
      + s_vein x vein contrast / sigma_QSM         (a vein running along the lesion edge)
      + s_incomplete x (same as rims, for incomplete rims)
      + small terms for microbleeds, calcifications, central veins, hyperintense lesions

with sigma_QSM from the protocol (echo times, SNR, R2*, voxel volume) plus a structured
term (residual background field, streaking, texture). A reader calls PRL when
``log(E) + u + e_r > tau_r``: ``u`` is a per-lesion ambiguity shared by all readers, ``e_r``
the reader's own noise; readers differ in threshold, vein and incomplete-rim susceptibility.
Readers are thus wrong where physics makes rims faint, thin, partial or vein-like: veins
were 65 % of readers' false positives in one study (design.md section 5).
Consensus is the majority of calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qsm_core import ppm_to_hz

__all__ = ["ReaderModel", "default_readers", "qsm_noise_ppm", "rim_evidence", "read_lesions"]


@dataclass(frozen=True)
class ReaderModel:
    """One simulated reader.

    Attributes
    ----------
    threshold : float
        Log-evidence needed for a PRL call (log CNR).
    noise_sd : float
        Reader's own noise on the log scale (intra-reader variability).
    vein_susceptibility : float
        Weight given to a vein at the lesion edge (0: never fooled).
    incomplete_susceptibility : float
        Weight given to rims covering less than 2/3 of the edge.
    """

    threshold: float
    noise_sd: float = 0.38
    vein_susceptibility: float = 0.04
    incomplete_susceptibility: float = 0.78


def default_readers(n: int = 3) -> list[ReaderModel]:
    """``n`` readers spread around a common threshold (CNR ~ 2.5) and vein weights."""
    # vein weights set so that veins are ~65 % of the consensus false positives (design.md)
    base = [ReaderModel(np.log(2.5), 0.38, 0.040, 0.78),
            ReaderModel(np.log(2.15), 0.42, 0.060, 0.97),
            ReaderModel(np.log(2.9), 0.36, 0.026, 0.65),
            ReaderModel(np.log(2.3), 0.40, 0.045, 0.91),
            ReaderModel(np.log(2.7), 0.38, 0.033, 0.72)]
    return [base[i % len(base)] for i in range(n)]


def qsm_noise_ppm(echo_times_s, snr: float, voxel_size_mm, *, field_strength_t: float = 3.0,
                  r2star_s: float = 20.0, amplification: float = 2.5,
                  structured_ppm: float = 0.008) -> float:
    """Approximate QSM noise SD (ppm) in white matter for a protocol.

    Frequency noise of a weighted multi-echo fit, ``1 / (2 pi SNR sqrt(sum (TE w)^2))`` with
    ``w = exp(-R2* TE)``, times a dipole-inversion noise amplification, combined with a
    structured error term.
    """
    te = np.asarray(echo_times_s, float)
    w = np.exp(-r2star_s * te)
    sig_hz = 1.0 / (2 * np.pi * snr * np.sqrt(np.sum((te * w) ** 2)))
    sig_ppm = sig_hz / ppm_to_hz(field_strength_t) * amplification
    return float(np.sqrt(sig_ppm**2 + structured_ppm**2))


def rim_evidence(df: pd.DataFrame, *, sigma_ppm: float, voxel_size_mm) -> dict:
    """Physics terms of the evidence per lesion (arrays aligned with ``df``)."""
    h = float(np.prod(voxel_size_mm)) ** (1 / 3)
    rim = df["truth_rim_chi_ppm"].to_numpy(float)
    thick = df["truth_rim_thickness_mm"].to_numpy(float)
    cov = df["truth_rim_coverage"].to_numpy(float)
    size = df["long_axis_mm"].to_numpy(float)
    pv = np.clip(thick / h, 0, 1) * np.clip((size - 2.0) / 4.0, 0.15, 1.0)
    is_rim = (df["truth_type"] == "rim").to_numpy()
    complete = is_rim & (df["truth_prl"].to_numpy(int) == 1)
    incomplete = is_rim & ~complete
    covf = np.clip((cov - 0.3) / 0.5, 0, 1.2)
    true_e = np.where(complete, np.clip(rim, 0, None) * pv * covf / sigma_ppm, 0.0)
    inc_e = np.where(incomplete, np.clip(rim, 0, None) * pv * covf / sigma_ppm, 0.0)
    vein = df["vein_at_edge"].to_numpy(bool) * 0.4 * 0.5 / sigma_ppm
    other = (0.6 * df["central_vein"].to_numpy(bool)
             + 2.5 * (df["deposit"] == "microbleed").to_numpy()
             + 0.8 * (df["deposit"] == "calcification").to_numpy()
             + 0.3 * np.clip(df["truth_core_chi_ppm"].to_numpy(float), 0, None) / sigma_ppm
             + 0.8 * df["confluent"].to_numpy(bool))
    return {"true": true_e, "incomplete": inc_e, "vein": vein, "other": other}


def read_lesions(df: pd.DataFrame, rng: np.random.Generator, *, readers: list[ReaderModel],
                 sigma_ppm: float, voxel_size_mm, ambiguity_sd: float = 0.3) -> pd.DataFrame:
    """Add ``reader_1..K`` and ``consensus`` (majority) columns to a lesion table.

    Parameters
    ----------
    df : DataFrame
        Lesion rows with the truth columns written by the cohort planner.
    rng : numpy Generator
    readers : list of ReaderModel
    sigma_ppm : float
        QSM noise (:func:`qsm_noise_ppm`).
    voxel_size_mm : sequence of 3 floats
    ambiguity_sd : float
        SD of the per-lesion ambiguity shared by all readers.

    Returns
    -------
    DataFrame
        A copy with integer 0/1 reader columns, ``consensus`` and ``evidence_cnr``.
    """
    df = df.copy()
    if len(df) == 0:
        for k in range(len(readers)):
            df[f"reader_{k + 1}"] = pd.Series(dtype=int)
        df["consensus"] = pd.Series(dtype=int)
        return df
    ev = rim_evidence(df, sigma_ppm=sigma_ppm, voxel_size_mm=voxel_size_mm)
    u = rng.normal(0, ambiguity_sd, len(df))
    calls = []
    for k, r in enumerate(readers):
        e = (ev["true"] + r.incomplete_susceptibility * ev["incomplete"]
             + r.vein_susceptibility * ev["vein"] + 0.5 * ev["other"])
        score = np.log(e + 0.05) + u + rng.normal(0, r.noise_sd, len(df))
        c = (score > r.threshold).astype(int)
        df[f"reader_{k + 1}"] = c
        calls.append(c)
    df["consensus"] = (np.sum(calls, axis=0) * 2 > len(readers)).astype(int)
    df["evidence_cnr"] = ev["true"] + ev["incomplete"]
    return df
