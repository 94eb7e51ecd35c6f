"""Synthetic lesion patches for tests and benchmarks (not shipped for training).

Each patch is a FLAIR-bright ellipsoidal lesion; rim lesions (label 1) carry a paramagnetic
shell (+0.03..0.07 ppm, 1-2 voxels thick) covering most of the edge. Distractors: a vein (a
bright line roughly along the slice axis), partial rims on some non-rim lesions, a
hyper-/hypo-intense core, a neighbouring lesion, noise. Channel layout and scaling follow
``rimnet.patches`` (qsm x10, flair normalised to ~1, lesion and others masks).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CHANNELS = ("qsm", "flair", "lesion", "others")


def make_synthetic_patches(n: int, *, patch_voxels: int = 32, prevalence: float = 0.3,
                           n_patients: int | None = None, seed: int = 0,
                           noise: float = 0.15) -> tuple[np.ndarray, pd.DataFrame]:
    """Return ``patches`` (n, 4, P, P, P) float32 and a table with keys and labels."""
    rng = np.random.default_rng(seed)
    p = patch_voxels
    c = (p - 1) / 2.0
    g = np.stack(np.meshgrid(*[np.arange(p) - c] * 3, indexing="ij"))  # (3, P, P, P)
    out = np.zeros((n, 4, p, p, p), np.float32)
    labels = (rng.random(n) < prevalence).astype(int)
    scale = p / 32.0
    for i in range(n):
        radii = rng.uniform(3.0, 7.0, size=3) * scale
        ax = g / radii[:, None, None, None]
        r = np.sqrt((ax**2).sum(0))  # normalised radius, 1 at the edge
        lesion = r <= 1.0
        edge_dist = (r - 1.0) * radii.mean()  # approx distance to the edge (voxels)
        qsm = rng.normal(-0.2, 0.05) + noise * rng.standard_normal((p, p, p))
        core = rng.choice([0.0, -0.3, 0.3, 0.0])
        qsm = qsm + core * lesion
        theta = np.arctan2(g[1], g[0])
        shell = (edge_dist > -1.5) & (edge_dist < 1.0 * scale + 0.5)
        if labels[i]:
            cover = rng.uniform(0.75, 1.0) * 2 * np.pi
            start = rng.uniform(-np.pi, np.pi)
            arc = np.mod(theta - start, 2 * np.pi) < cover
            qsm = qsm + rng.uniform(0.35, 0.7) * (shell & arc)
        elif rng.random() < 0.3:  # incomplete rim: a hard negative
            cover = rng.uniform(0.1, 0.3) * 2 * np.pi
            arc = np.mod(theta - rng.uniform(-np.pi, np.pi), 2 * np.pi) < cover
            qsm = qsm + rng.uniform(0.35, 0.7) * (shell & arc)
        if rng.random() < 0.5:  # vein along the slice axis
            x0, y0 = rng.uniform(-c, c, size=2) * 0.6
            vein = ((g[0] - x0) ** 2 + (g[1] - y0) ** 2) < (1.2 * scale) ** 2
            qsm = qsm + rng.uniform(2.0, 4.0) * vein
        flair = 1.0 + 0.1 * rng.standard_normal((p, p, p)) + rng.uniform(0.8, 1.8) * lesion
        others = np.zeros((p, p, p), bool)
        if rng.random() < 0.2:
            off = rng.uniform(-c, c, size=3)
            others = (((g - off[:, None, None, None]) / (3 * scale)) ** 2).sum(0) <= 1
            others &= ~lesion
            flair = flair + 1.0 * others
        out[i, 0] = np.clip(qsm, -5, 5)
        out[i, 1] = np.clip(flair, 0, 5)
        out[i, 2] = lesion
        out[i, 3] = others
    if n_patients is None:
        n_patients = max(2, n // 10)
    pid = rng.integers(0, n_patients, size=n)
    pid[:n_patients] = np.arange(min(n, n_patients))  # every patient has a lesion
    table = pd.DataFrame({
        "participant_id": [f"sub-{k:03d}" for k in pid],
        "session_id": "n/a",
        "lesion_id": np.arange(1, n + 1),
        "label": labels, "consensus": labels, "truth_prl": labels,
    })
    return out, table
