"""Review material for readers: a PNG montage per lesion and an offline HTML index.

The montage shows the slice through the lesion centroid (array axis 2, the scan's slice axis)
of QSM (window -0.15...+0.15 ppm, paramagnetic bright), FLAIR and SWI when present, 40 mm
around the lesion, with the lesion outline in colour and the scores in the title. The index
(``OUT_DIR/index.html``) links every montage by a relative path and embeds no external asset,
so the output folder can be zipped and opened anywhere, offline.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qsm_core.io.atomic import atomic_path, write_text

__all__ = ["lesion_montage", "write_review_index", "QSM_WINDOW_PPM"]

QSM_WINDOW_PPM = (-0.15, 0.15)
_FOV_MM = 40.0


def _window(img: np.ndarray, fallback=(0.0, 1.0)) -> tuple[float, float]:
    vals = img[img != 0]
    if vals.size < 10:
        return fallback
    lo, hi = np.percentile(vals, [1, 99.5])
    return (float(lo), float(hi)) if hi > lo else fallback


def lesion_montage(path, images: dict, labels: np.ndarray, lesion_id: int, centre_vox, *,
                   voxel_size_mm, title: str = "", fov_mm: float = _FOV_MM, dpi: int = 80) -> Path:
    """Write a PNG of one lesion on QSM / FLAIR / SWI (those present), atomically.

    Parameters
    ----------
    path : str or Path
        Output ``.png``.
    images : dict of str to ndarray, each shape (X, Y, Z)
        ``qsm`` (ppm) and optionally ``flair`` and ``swi``, on the grid of ``labels``.
    labels : ndarray of int, shape (X, Y, Z)
    lesion_id : int
    centre_vox : sequence of 3 floats
        Lesion centroid (voxels).
    voxel_size_mm : sequence of 3 floats
    title : str
        Shown above the panels (scores).
    fov_mm : float
        In-plane field of view of each panel (mm).
    dpi : int

    Returns
    -------
    Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vs = np.asarray(voxel_size_mm, float)
    c = np.asarray(centre_vox, float)
    k = int(np.clip(np.round(c[2]), 0, labels.shape[2] - 1))
    half = np.ceil(fov_mm / 2 / vs[:2]).astype(int)
    lo = [max(int(np.round(c[a])) - half[a], 0) for a in range(2)]
    hi = [min(int(np.round(c[a])) + half[a] + 1, labels.shape[a]) for a in range(2)]
    sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), k)
    les = (labels[sl] == lesion_id).T
    others = ((labels[sl] > 0) & (labels[sl] != lesion_id)).T
    names = [n for n in ("qsm", "flair", "swi") if images.get(n) is not None]
    extent = (lo[0] * vs[0], hi[0] * vs[0], lo[1] * vs[1], hi[1] * vs[1])
    fig = Figure(figsize=(2.4 * len(names), 2.8), dpi=dpi)
    FigureCanvasAgg(fig)
    for p, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), p + 1)
        img = np.asarray(images[name][sl], float).T
        if name == "qsm":
            vmin, vmax = QSM_WINDOW_PPM
            label = "QSM (ppm)"
        else:
            vmin, vmax = _window(np.asarray(images[name][..., k]))
            label = name.upper()
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", extent=extent,
                  interpolation="nearest")
        if les.any():
            ax.contour(les.astype(float), levels=[0.5], colors=["#ff3030"], linewidths=0.8,
                       origin="lower", extent=extent)
        if others.any():
            ax.contour(others.astype(float), levels=[0.5], colors=["#30a0ff"],
                       linewidths=0.6, origin="lower", extent=extent)
        ax.set_title(f"{label}  z={k}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=6.5)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.82, wspace=0.05)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or (v is pd.NA):
        return "n/a"
    if isinstance(v, float | np.floating):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def write_review_index(out_dir, predictions: pd.DataFrame, subjects: pd.DataFrame,
                       failures: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/index.html``: subjects, failures and every lesion with its montage.

    Lesions are sorted by descending CNN probability (rule score when there is no CNN), so a
    reader reviews the likeliest rims first. Links are relative; no external assets.
    """
    out_dir = Path(out_dir)
    pred = predictions.copy()
    has_cnn = "cnn_prob" in pred and pred["cnn_prob"].notna().any()
    key = "cnn_prob" if has_cnn else "rule_score"
    if len(pred):
        pred = pred.sort_values(key, ascending=False, kind="stable")
    css = ("body{font-family:sans-serif;font-size:13px;margin:1.5em}"
           "table{border-collapse:collapse;margin-bottom:2em}"
           "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:middle}"
           "th{background:#eee}.prl{color:#b00000;font-weight:bold}img{display:block}")
    montages: dict[tuple, str] = {}
    for png in sorted(out_dir.glob("sub-*/**/review/*_lesion-*.png")):
        ents = dict(p.split("-", 1) for p in png.stem.split("_") if "-" in p)
        try:
            lid = int(ents["lesion"])
        except (KeyError, ValueError):
            continue
        ses = f"ses-{ents['ses']}" if "ses" in ents else "n/a"
        montages.setdefault((f"sub-{ents.get('sub')}", ses, lid),
                            os.path.relpath(png, out_dir).replace(os.sep, "/"))
    rows = []
    for r in pred.itertuples(index=False):
        name = "_".join([r.participant_id] + ([r.session_id] if r.session_id != "n/a" else []))
        rel = montages.get((r.participant_id, r.session_id, int(r.lesion_id)))
        if rel is not None:
            href = html.escape(rel, quote=True)
            img = f'<a href="{href}"><img src="{href}" width="300" alt="lesion montage"></a>'
        else:
            img = "no montage"
        cnn_cls = ' class="prl"' if getattr(r, "cnn_call", 0) == 1 else ""
        rule_cls = ' class="prl"' if getattr(r, "rule_call", 0) == 1 else ""
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{int(r.lesion_id)}</td>"
            f"<td>{_fmt(r.volume_mm3, 0)}</td><td{cnn_cls}>{_fmt(r.cnn_prob)}</td>"
            f"<td{rule_cls}>{_fmt(r.rule_score)}</td><td>{img}</td></tr>")
    subj_rows = "".join(
        f"<tr><td>{html.escape(str(s.participant_id))}</td><td>{html.escape(str(s.session_id))}"
        f"</td><td>{_fmt(s.n_lesions)}</td><td>{_fmt(s.n_prl_cnn)}</td>"
        f"<td>{_fmt(s.n_prl_rule)}</td></tr>"
        for s in subjects.itertuples(index=False))
    fail_html = ""
    if failures is not None and len(failures):
        fr = "".join(f"<tr><td>{html.escape(str(f.scan))}</td><td>{html.escape(str(f.error_type))}"
                     f"</td><td>{html.escape(str(f.message))}</td></tr>"
                     for f in failures.itertuples(index=False))
        fail_html = (f"<h2>Failed scans ({len(failures)})</h2><table><tr><th>scan</th>"
                     f"<th>error</th><th>message</th></tr>{fr}</table>")
    doc = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>qsmrim predictions</title><style>{css}</style></head><body>"
        "<h1>qsmrim: paramagnetic rim lesion predictions</h1>"
        "<p>Research use only; not for clinical decisions. Lesions sorted by "
        f"{'CNN probability' if has_cnn else 'rule-based score'}. Red outline: the lesion; "
        "blue: other lesions. Tables: <a href=\"predictions.tsv\">predictions.tsv</a>, "
        "<a href=\"subjects.tsv\">subjects.tsv</a>, <a href=\"failures.tsv\">failures.tsv"
        "</a>.</p>"
        f"<h2>Scans ({len(subjects)})</h2><table><tr><th>participant</th><th>session</th>"
        f"<th>lesions</th><th>PRL (CNN)</th><th>PRL (rule)</th></tr>{subj_rows}</table>"
        f"{fail_html}"
        f"<h2>Lesions ({len(pred)})</h2><table><tr><th>scan</th><th>lesion</th>"
        "<th>volume (mm&sup3;)</th><th>CNN prob</th><th>rule score</th><th>montage</th></tr>"
        f"{''.join(rows)}</table></body></html>\n")
    return write_text(out_dir / "index.html", doc)
