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

__all__ = ["MontageWriter", "lesion_montage", "write_review_index", "QSM_WINDOW_PPM"]

QSM_WINDOW_PPM = (-0.15, 0.15)
_FOV_MM = 40.0


def _window(img: np.ndarray, fallback=(0.0, 1.0)) -> tuple[float, float]:
    img = np.asarray(img)
    if img.size > 200_000:  # a regular subsample is plenty for percentiles
        img = img.ravel()[:: img.size // 200_000]
    vals = img[img != 0]
    if vals.size < 10:
        return fallback
    lo, hi = np.percentile(vals, [1, 99.5])
    return (float(lo), float(hi)) if hi > lo else fallback


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels just outside ``mask`` (4-neighbours): an outline that hides none of it."""
    m = np.pad(mask, 1)
    grown = m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
    return grown & ~mask


def _rgb(img: np.ndarray, vmin: float, vmax: float, outline, others) -> np.ndarray:
    g = np.clip((img - vmin) / (vmax - vmin if vmax > vmin else 1.0), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=2)
    rgb[others] = (0.2, 0.6, 1.0)
    rgb[outline] = (1.0, 0.15, 0.15)
    return rgb


class MontageWriter:
    """Writes lesion montages, reusing one matplotlib figure (fast for many lesions).

    Parameters
    ----------
    images : dict of str to ndarray, each shape (X, Y, Z)
        ``qsm`` (ppm) and optionally ``flair`` and ``swi``, on the grid of ``labels``.
    labels : ndarray of int, shape (X, Y, Z)
    voxel_size_mm : sequence of 3 floats
    fov_mm : float
        In-plane field of view of each panel (mm).
    dpi : int
    """

    def __init__(self, images: dict, labels: np.ndarray, *, voxel_size_mm,
                 fov_mm: float = _FOV_MM, dpi: int = 80):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.images = {n: images[n] for n in ("qsm", "flair", "swi")
                       if images.get(n) is not None}
        self.labels = labels
        self.vs = np.asarray(voxel_size_mm, float)
        self.fov_mm = float(fov_mm)
        self.dpi = int(dpi)
        self.windows = {n: (QSM_WINDOW_PPM if n == "qsm" else _window(np.asarray(v)))
                        for n, v in self.images.items()}
        self.fig = Figure(figsize=(2.4 * len(self.images), 2.8), dpi=dpi)
        FigureCanvasAgg(self.fig)
        self.axes, self.artists = [], []
        for p in range(len(self.images)):
            ax = self.fig.add_subplot(1, len(self.images), p + 1)
            art = ax.imshow(np.zeros((2, 2, 3)), origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            self.axes.append(ax)
            self.artists.append(art)
        self.title = self.fig.suptitle("", fontsize=6.5)
        self.fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.82, wspace=0.05)

    def write(self, path, lesion_id: int, centre_vox, *, title: str = "") -> Path:
        """Write the montage of one lesion (slice through ``centre_vox``) atomically."""
        vs, c, labels = self.vs, np.asarray(centre_vox, float), self.labels
        k = int(np.clip(np.round(c[2]), 0, labels.shape[2] - 1))
        half = np.ceil(self.fov_mm / 2 / vs[:2]).astype(int)
        lo = [max(int(np.round(c[a])) - half[a], 0) for a in range(2)]
        hi = [min(int(np.round(c[a])) + half[a] + 1, labels.shape[a]) for a in range(2)]
        sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), k)
        lab = labels[sl].T
        outline = _edges(lab == lesion_id)
        others = _edges((lab > 0) & (lab != lesion_id))
        extent = (lo[0] * vs[0], hi[0] * vs[0], lo[1] * vs[1], hi[1] * vs[1])
        for (name, vol), ax, art in zip(self.images.items(), self.axes, self.artists):
            vmin, vmax = self.windows[name]
            art.set_data(_rgb(np.asarray(vol[sl], float).T, vmin, vmax, outline, others))
            art.set_extent(extent)
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            label = "QSM (ppm)" if name == "qsm" else name.upper()
            ax.set_title(f"{label}  z={k}", fontsize=7)
        self.title.set_text(title)
        path = Path(path)
        with atomic_path(path) as tmp:
            self.fig.savefig(tmp, format="png", dpi=self.dpi)
        return path


def lesion_montage(path, images: dict, labels: np.ndarray, lesion_id: int, centre_vox, *,
                   voxel_size_mm, title: str = "", fov_mm: float = _FOV_MM, dpi: int = 80) -> Path:
    """Write a PNG of one lesion on QSM / FLAIR / SWI (those present), atomically.

    The slice through the centroid (array axis 2), ``fov_mm`` wide, windowed (QSM
    -0.15...+0.15 ppm; FLAIR/SWI 1st-99.5th percentile), the lesion outlined in red (pixels
    just outside it) and other lesions in blue, ``title`` above. For many lesions of one scan
    use :class:`MontageWriter`.

    Parameters
    ----------
    path : str or Path
        Output ``.png``.
    images : dict of str to ndarray, each shape (X, Y, Z)
    labels : ndarray of int, shape (X, Y, Z)
    lesion_id : int
    centre_vox : sequence of 3 floats
    voxel_size_mm : sequence of 3 floats
    title : str
    fov_mm : float
    dpi : int

    Returns
    -------
    Path
    """
    return MontageWriter(images, labels, voxel_size_mm=voxel_size_mm, fov_mm=fov_mm,
                         dpi=dpi).write(path, lesion_id, centre_vox, title=title)


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
