"""Cross-validated training of the rim CNN; writes the model directory.

:func:`train_model` is the ``fit`` of :class:`rimnet.model.RimCNN`: from patches and a lesion
table it trains one network per patient-grouped fold, picks each fold's best epoch by the
validation PR AUC (early stopping), predicts the held-out fold (out-of-fold predictions, with
the configured test-time augmentation), calibrates the pooled out-of-fold logits by temperature
scaling, chooses the decision threshold, and writes (rank 0 only; layout as nnU-Net)::

    model_dir/
      config.json            resolved TrainConfig
      versions.json          package versions
      data_fingerprint.json  hashes of the training table and patches
      splits.json            patient ids per fold (editable; reused when present)
      fold_K/model.pt        best weights (state dict)
      fold_K/checkpoint_last.pt  resume state (weights, optimiser, scheduler, history)
      fold_K/log.jsonl       one JSON line per epoch
      fold_K/progress.png    losses and validation AUCs per epoch
      fold_K/val_predictions.tsv  the fold's out-of-fold logits
      val_predictions.tsv    all out-of-fold predictions (logit, calibrated probability, call)
      temperature.json       temperature, prior offset and shift, decision threshold
      metrics.json           ROC AUC and PR AUC per fold and pooled, NLL before/after scaling
      model_card.md          data, metrics, limits

Training is seeded (splits, initialisation, sampling, augmentation are re-seeded per fold and
epoch, so a resumed run continues exactly where it stopped) and runs unchanged under
``torchrun`` (see :mod:`training.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from qsm_core.errors import InputError, NotEstimableError
from qsm_core.io.atomic import atomic_path, write_json, write_text
from rimnet.model import (
    RimCNN,
    ensemble_logits,
    load_state_dict_file,
    network_kwargs_from_config,
    save_state_dict,
)
from rimnet.network import build_network
from rimnet.shells import fast_shell_features
from rimnet.transforms import build_train_transforms
from training import calibration
from training.config import TrainConfig
from training.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    gather_arrays,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from training.splits import fold_indices, load_splits, make_splits, save_splits

__all__ = ["train_model", "prepare_labels", "data_fingerprint", "package_versions",
           "cv_metrics", "teacher_probabilities"]

log = logging.getLogger(__name__)

KEY_COLUMNS = ("participant_id", "session_id", "lesion_id")


# ---------------------------------------------------------------------------- data
class _PatchDataset(Dataset):
    """Samples ``{"image", "label", "type"[, "soft"]}`` for rows ``indices`` of ``patches``.

    ``soft``: the teacher's rim probability per patch (distillation), or None.
    """

    def __init__(self, patches, indices, labels, types, transform, soft=None):
        self.patches = patches
        self.indices = np.asarray(indices)
        self.labels = labels
        self.types = types
        self.transform = transform
        self.soft = soft

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        d = {"image": np.array(self.patches[j], dtype=np.float32)}  # a writable copy
        d = self.transform(d)
        d["label"] = torch.tensor(float(self.labels[j]))
        d["type"] = torch.tensor(int(self.types[j]))
        if self.soft is not None:
            d["soft"] = torch.tensor(float(self.soft[j]))
        return d


def teacher_probabilities(teacher_dir, patches, config: TrainConfig, *,
                          device: str = "cpu") -> np.ndarray:
    """The teacher ensemble's uncalibrated rim probability of every patch, shape (N,).

    Uncalibrated: ``sigmoid`` of the mean fold logit, on the same scale as the student's
    own logits (both are trained with the same class weighting), not the deployed
    probability.

    Raises
    ------
    InputError
        The teacher cannot be loaded, or cuts patches differently from the training data.
    """
    teacher = RimCNN.load(teacher_dir, device=device)
    ours = {"channels": list(config.channels), "patch_mm": float(config.patch_mm),
            "patch_voxels": int(config.patch_voxels)}
    theirs = {"channels": list(teacher.channels), "patch_mm": float(teacher.patch_mm),
              "patch_voxels": int(teacher.patch_voxels)}
    if ours != theirs:
        raise InputError(f"teacher {teacher_dir} was trained on patches {theirs}, the "
                         f"training data are {ours}; distil a teacher of the same patches")
    log.info("distillation: scoring %d patches with the teacher %s", len(patches), teacher_dir)
    z = teacher.raw_logits(patches, tta="none")
    return calibration.apply_temperature(z, temperature=1.0).astype(np.float32)  # sigmoid


def prepare_labels(table: pd.DataFrame, config: TrainConfig, *, n_patches: int
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rim labels (0/1), type indices (-1 where unknown) and type names from the table.

    Raises
    ------
    InputError
        Missing label column, missing or non-binary labels, a single class, a table whose
        length differs from the number of patches.
    """
    if len(table) != n_patches:
        raise InputError(f"lesion table has {len(table)} rows but there are {n_patches} "
                         "patches; they must correspond row by row")
    col = config.label_column
    if col not in table.columns:
        label_like = [c for c in table.columns if c in ("consensus", "truth_prl")
                      or c.startswith("reader_")]
        raise InputError(f"lesion table has no label column {col!r}; choose one with "
                         f"--label-column (candidates: {label_like or list(table.columns)})")
    y = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
    if np.isnan(y).any():
        rows = np.flatnonzero(np.isnan(y))[:10].tolist()
        raise InputError(f"label column {col!r} has missing or non-numeric values in rows "
                         f"{rows} (0-based); drop those lesions or fill the labels")
    if not np.isin(y, (0.0, 1.0)).all():
        raise InputError(f"label column {col!r} must hold 0/1 calls")
    if y.min() == y.max():
        raise InputError(f"label column {col!r} holds a single class ({int(y[0])}); training "
                         "needs lesions with and without rims")
    types = np.full(n_patches, -1, dtype=np.int64)
    names: list[str] = []
    if config.n_types > 0:
        tcol = config.type_column
        if tcol not in table.columns:
            raise InputError(f"lesion table has no type column {tcol!r} (--type-column)")
        raw = table[tcol]
        num = pd.to_numeric(raw, errors="coerce")
        if num.notna().all():
            types = num.to_numpy(dtype=np.int64)
            names = [str(i) for i in range(config.n_types)]
        else:
            names = sorted(str(v) for v in raw.dropna().unique())
            lookup = {n: i for i, n in enumerate(names)}
            types = np.array([lookup.get(str(v), -1) if pd.notna(v) else -1 for v in raw])
        if types.max() >= config.n_types or len(names) > config.n_types:
            raise InputError(f"type column {tcol!r} has more than n_types={config.n_types} "
                             f"types ({names})")
    return y.astype(np.float32), types, names


def data_fingerprint(patches, table: pd.DataFrame, *, label_column: str) -> dict:
    """SHA-256 hashes of the training table (keys + labels) and of the patch values."""
    cols = [c for c in (*KEY_COLUMNS, label_column) if c in table.columns]
    t_hash = hashlib.sha256(table[cols].to_csv(sep="\t", index=False).encode()).hexdigest()
    h = hashlib.sha256()
    for start in range(0, len(patches), 256):
        h.update(np.ascontiguousarray(patches[start:start + 256]).tobytes())
    return {"table_sha256": t_hash, "patches_sha256": h.hexdigest(),
            "n_lesions": int(len(table)), "patch_shape": list(np.shape(patches)[1:]),
            "patch_dtype": str(np.asarray(patches[:1]).dtype),
            "n_participants": int(table["participant_id"].nunique()),
            "label_column": label_column,
            "n_positive": int(pd.to_numeric(table[label_column]).sum())}


def package_versions() -> dict:
    """Versions of the packages a model depends on."""
    import monai
    import scipy
    import sklearn

    from qsm_core import __version__

    return {"qsmrim": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
            "pandas": pd.__version__, "platform": platform.platform()}


def train_transforms(config: TrainConfig, *, seed: int | None = None):
    """The training augmentation of ``config``.

    :func:`rimnet.transforms.build_train_transforms` with the augmentation fields of
    ``config``, seeded with ``seed``.
    """
    return build_train_transforms(
        channel_names=config.channels, flip_prob=config.flip_prob,
        rot90_prob=config.rot90_prob, affine_prob=config.affine_prob,
        intensity_prob=config.intensity_prob, gain=config.gain, offset=config.offset,
        noise_std=config.noise_std, slice_blur_prob=config.slice_blur_prob, seed=seed)


# ---------------------------------------------------------------------- metrics
def _auc_pair(y: np.ndarray, s: np.ndarray) -> tuple[float | None, float | None]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if y.min() == y.max():
        return None, None
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def cv_metrics(oof: pd.DataFrame, *, temperature: float, offset: float,
               threshold: float) -> dict:
    """Per-fold and pooled metrics of out-of-fold predictions.

    Parameters
    ----------
    oof : DataFrame
        Columns ``fold``, ``label``, ``logit``, ``prob`` (calibrated).
    """
    out: dict = {"folds": []}
    for k, g in oof.groupby("fold", sort=True):
        roc, pr = _auc_pair(g["label"].to_numpy(), g["logit"].to_numpy())
        out["folds"].append({"fold": int(k), "n_lesions": len(g),
                             "n_positive": int(g["label"].sum()), "roc_auc": roc,
                             "pr_auc": pr})
    y = oof["label"].to_numpy()
    z = oof["logit"].to_numpy()
    p = oof["prob"].to_numpy()
    roc, pr = _auc_pair(y, z)
    calls = p >= threshold
    tp = int(np.sum(calls & (y == 1)))
    tn = int(np.sum(~calls & (y == 0)))
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    po = (tp + tn) / len(y)
    pe = (calls.sum() * n_pos + (~calls).sum() * n_neg) / len(y) ** 2
    rocs = [f["roc_auc"] for f in out["folds"] if f["roc_auc"] is not None]
    prs = [f["pr_auc"] for f in out["folds"] if f["pr_auc"] is not None]
    out["pooled"] = {
        "n_lesions": len(y), "n_positive": n_pos, "roc_auc": roc, "pr_auc": pr,
        "nll_uncalibrated": calibration.binary_nll(z, y),
        "nll_calibrated": calibration.binary_nll((z + offset) / temperature, y),
        "brier_calibrated": float(np.mean((p - y) ** 2)),
        "threshold": threshold, "sensitivity": tp / n_pos if n_pos else None,
        "specificity": tn / n_neg if n_neg else None,
        "kappa": float((po - pe) / (1 - pe)) if pe < 1 else None,
    }
    out["mean_fold"] = {"roc_auc": float(np.mean(rocs)) if rocs else None,
                        "pr_auc": float(np.mean(prs)) if prs else None}
    return out


# -------------------------------------------------------------------- plotting
def _plot_progress(history: list[dict], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [h["train_loss"] for h in history], label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], label="val loss")
    a1.set_xlabel("epoch")
    a1.legend()
    a2.plot(ep, [h["val_roc_auc"] for h in history], label="val ROC AUC")
    a2.plot(ep, [h["val_pr_auc"] for h in history], label="val PR AUC")
    a2.set_ylim(0, 1.02)
    a2.set_xlabel("epoch")
    a2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


@contextlib.contextmanager
def _no_meta_tracking():
    """MONAI transforms without MetaTensor bookkeeping (5x faster on small patches)."""
    from monai.data import get_track_meta, set_track_meta

    old = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(old)


# ------------------------------------------------------------------ one fold
def _sharded_logits(info: DistInfo, net: nn.Module, patches, idx: np.ndarray, *, tta: str,
                    device) -> np.ndarray:
    """Logits of rows ``idx``, computed in shards over ranks and gathered."""
    mine = idx[info.rank::info.world_size]
    z = ensemble_logits([net], _Rows(patches, mine), tta=tta, device=device) if len(mine) \
        else np.zeros(0)
    parts = gather_arrays(info, z)
    out = np.zeros(len(idx))
    for r, part in enumerate(parts):
        out[r::info.world_size] = part
    return out


class _Rows:
    """Lazy row selection of an array (memory-maps stay lazy)."""

    def __init__(self, arr, rows):
        self.arr, self.rows = arr, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl):
        return np.asarray(self.arr[self.rows[sl]], dtype=np.float32)


def _weight_average(net: nn.Module, decay: float):
    """An exponential moving average of ``net``'s weights and buffers, or None if ``decay`` is 0.

    ``update_parameters(net)`` after each optimiser step; the averaged network is
    ``.module`` (batch-norm running statistics averaged too, so it needs no extra pass).
    """
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _train_fold(k: int, patches, labels, types, train_idx, val_idx, *, config: TrainConfig,
                pos_weight: float, fold_dir: Path, info: DistInfo, resume: bool,
                soft: np.ndarray | None = None) -> np.ndarray:
    """Train fold ``k``; return the out-of-fold logits of ``val_idx``.

    ``soft``: the teacher's probability of every patch (distillation), or None.
    """
    cfg = config.to_dict()
    device = torch.device(info.device)
    ckpt_path = fold_dir / "checkpoint_last.pt"
    best_path = fold_dir / "model.pt"
    seed = config.seed + 1000 * (k + 1)
    torch.manual_seed(seed)
    net = build_network(**network_kwargs_from_config(cfg)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bs = max(1, config.batch_size // info.world_size)
    steps = max(1, len(train_idx) // (bs * info.world_size))
    total = steps * config.epochs

    def lr_lambda(step: int) -> float:
        if step < steps:
            return (step + 1) / steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - steps) / max(1, total - steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema = _weight_average(net, config.weight_ema)
    state = {"epoch": 0, "best_pr_auc": -1.0, "best_epoch": -1, "since_best": 0,
             "finished": False, "history": []}
    if resume and ckpt_path.exists():
        ck = load_state_dict_file(ckpt_path, device=device)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        state = {key: ck[key] for key in state}
        log.info("fold %d: resuming after epoch %d", k, state["epoch"])
    model = wrap_model(net, info)
    shells = getattr(net, "shells", None)

    transform = train_transforms(config, seed=seed)
    ds = _PatchDataset(patches, train_idx, labels, types, transform, soft=soft)
    pw = torch.tensor(pos_weight if config.imbalance == "pos_weight" else 1.0, device=device)
    rim_loss = nn.BCEWithLogitsLoss(pos_weight=pw)
    type_loss = nn.CrossEntropyLoss(ignore_index=-1)
    y_val = labels[val_idx]
    if y_val.min() == y_val.max():
        raise InputError(f"fold {k}: its validation patients have lesions of one class only; "
                         "use fewer folds or edit splits.json")
    bar = None
    if config.progress and info.is_main and not state["finished"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=state["epoch"], desc=f"fold {k}", unit="ep")
    while not state["finished"] and state["epoch"] < config.epochs:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        torch.manual_seed(seed + epoch)
        transform.set_random_state(seed=seed + epoch)
        if info.distributed:
            sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank,
                                         shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
        elif config.imbalance == "sampler":
            w = np.where(labels[train_idx] > 0.5, 0.5 / labels[train_idx].sum(),
                         0.5 / (1 - labels[train_idx]).sum())
            sampler = WeightedRandomSampler(torch.as_tensor(w), num_samples=len(ds),
                                            replacement=True,
                                            generator=torch.Generator().manual_seed(seed + epoch))
        else:
            sampler = torch.utils.data.RandomSampler(
                ds, generator=torch.Generator().manual_seed(seed + epoch))
        loader = DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=len(ds) > bs,
                            num_workers=config.num_workers,
                            persistent_workers=False)
        model.train()
        losses = []
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device)
            # shell features are inputs of the head (no gradient): the compiled kernel on CPU
            out = model(x) if shells is None else model(x, fast_shell_features(shells, x))
            loss = rim_loss(out[:, 0], y)
            if soft is not None:  # the teacher's probability as a second, soft target
                w = config.distill_weight
                loss = (1.0 - w) * loss + w * nn.functional.binary_cross_entropy_with_logits(
                    out[:, 0], batch["soft"].to(device))
            if config.n_types > 0 and (batch["type"] >= 0).any():
                loss = loss + config.type_weight * type_loss(out[:, 1:], batch["type"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(float(loss.detach()))
        net.eval()
        scored = net if ema is None else ema.module  # the network validated and saved
        scored.eval()
        z_val = _sharded_logits(info, scored, patches, val_idx, tta="none", device=device)
        roc, pr = _auc_pair(y_val, z_val)
        val_loss = float(nn.functional.binary_cross_entropy_with_logits(
            torch.as_tensor(z_val), torch.as_tensor(y_val, dtype=torch.float64),
            pos_weight=pw.double().cpu()))
        tl = gather_arrays(info, np.array([np.mean(losses) if losses else np.nan]))
        entry = {"epoch": epoch + 1, "train_loss": float(np.nanmean(np.concatenate(tl))),
                 "val_loss": val_loss, "val_roc_auc": roc, "val_pr_auc": pr,
                 "lr": float(opt.param_groups[0]["lr"]),
                 "time_s": round(time.perf_counter() - t0, 3)}
        state["history"].append(entry)
        state["epoch"] = epoch + 1
        improved = pr > state["best_pr_auc"] + 1e-6
        if improved:
            state["best_pr_auc"], state["best_epoch"], state["since_best"] = pr, epoch + 1, 0
            if info.is_main:
                save_state_dict(scored, best_path)
        else:
            state["since_best"] += 1
        if (state["epoch"] >= max(config.min_epochs, 1)
                and state["since_best"] >= config.patience):
            state["finished"] = True
        if state["epoch"] >= config.epochs:
            state["finished"] = True
        if info.is_main:
            ck = {"model": net.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), **state}
            if ema is not None:
                ck["ema"] = ema.state_dict()
            with atomic_path(ckpt_path) as tmp:
                torch.save(ck, tmp)
            write_text(fold_dir / "log.jsonl",
                       "".join(json.dumps(h) + "\n" for h in state["history"]))
            if state["finished"] or state["epoch"] % 5 == 0:
                _plot_progress(state["history"], fold_dir / "progress.png",
                               title=f"fold {k} (best epoch {state['best_epoch']})")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}", pr_auc=f"{pr:.3f}",
                            best=f"{state['best_pr_auc']:.3f}")
        barrier(info)
    if bar is not None:
        bar.close()
    barrier(info)
    net.load_state_dict(load_state_dict_file(best_path, device=device))
    net.eval()
    return _sharded_logits(info, net, patches, val_idx, tta=config.tta, device=device)


# ------------------------------------------------------------------ public
def train_model(patches, table: pd.DataFrame, *, config: TrainConfig, out_dir,
                resume: bool = False, folds=None, command: str | None = None,
                dist_info: DistInfo | None = None) -> RimCNN | None:
    """Train a fold ensemble with patient-grouped cross-validation; write the model dir.

    Parameters
    ----------
    patches : ndarray, shape (N, C, P, P, P)
        Lesion patches (float32 or float16; a memory-map is fine), channels as
        ``config.channels``.
    table : DataFrame
        N rows in patch order with ``participant_id`` (the grouping), ``config.label_column``
        (0/1), and ideally ``session_id`` and ``lesion_id``.
    config : TrainConfig
    out_dir : str or Path
        Model directory (created).
    resume : bool
        Continue an interrupted run in ``out_dir`` (finished folds are kept, a fold in
        progress restarts from its last epoch). Without it, an existing model is an error.
    folds : sequence of int, optional
        Train only these folds (e.g. one per job of an array); calibration, metrics and the
        model card are written once every fold is present.
    command : str, optional
        The command line that ran the training (recorded in the model card).
    dist_info : DistInfo, optional
        Process-group information (default: from the ``torchrun`` environment).

    Returns
    -------
    RimCNN or None
        The trained model (every rank), or None while folds are missing.

    Raises
    ------
    InputError
        Bad patches, labels, table or splits; an existing model without ``resume``.
    """
    out_dir = Path(out_dir)
    own_group = dist_info is None
    info = dist_info or init_distributed(config.device)
    try:
        return _train(patches, table, config=config, out_dir=out_dir, resume=resume,
                      folds=folds, command=command, info=info)
    finally:
        if own_group:
            shutdown_distributed(info)


def _train(patches, table, *, config, out_dir, resume, folds, command, info) -> RimCNN | None:
    shape = tuple(np.shape(patches))
    p = config.patch_voxels
    if len(shape) != 5 or shape[1:] != (len(config.channels), p, p, p):
        raise InputError(f"patches have shape {shape}; the config expects (N, "
                         f"{len(config.channels)}, {p}, {p}, {p}) for channels "
                         f"{config.channels}")
    cache_channels = table.attrs.get("channels") if hasattr(table, "attrs") else None
    if cache_channels and list(cache_channels) != list(config.channels):
        raise InputError(f"patch cache channels {cache_channels} differ from the training "
                         f"config channels {config.channels}")
    cache_snap = table.attrs.get("snap_to_voxels") if hasattr(table, "attrs") else None
    if cache_snap is not None and bool(cache_snap) != config.snap_to_voxels:
        # predict must cut patches the way the training patches were cut
        log.info("patch cache has snap_to_voxels=%s; the model records the same",
                 bool(cache_snap))
        config = dataclasses.replace(config, snap_to_voxels=bool(cache_snap))
    if "participant_id" not in table.columns:
        raise InputError("lesion table has no participant_id column (needed to group folds)")
    if info.distributed and config.imbalance == "sampler":
        raise InputError("imbalance 'sampler' (class-balanced sampling) works in one process "
                         "only; use imbalance 'pos_weight' under torchrun")
    table = table.reset_index(drop=True)
    labels, types, type_names = prepare_labels(table, config, n_patches=shape[0])
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    cfg_path = out_dir / "config.json"
    cfg_dict = {**config.to_dict(), "type_names": type_names}
    if info.is_main:
        # sibling jobs of a job array (folds=[k]) share config.json and splits.json; only
        # a fold that already has files, or a whole run over an existing one, is refused
        started = folds is None or any((out_dir / f"fold_{int(k)}").exists() for k in folds)
        if cfg_path.exists() and not resume and started:
            raise InputError(f"{out_dir} already holds a model; pass --resume to continue "
                             "it or choose another --out folder")
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            volatile = {"progress", "device", "num_workers", "threads"}
            diff = sorted(key for key in cfg_dict if key not in volatile
                          and old.get(key) != cfg_dict[key])
            if diff:
                raise InputError(f"{cfg_path}: the saved config differs in {diff}; resume "
                                 "with the same settings or choose another --out folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, cfg_dict)
        write_json(out_dir / "versions.json", package_versions())
        write_json(out_dir / "data_fingerprint.json",
                   data_fingerprint(patches, table, label_column=config.label_column))
    barrier(info)

    patients = sorted(table["participant_id"].astype(str).unique())
    split_path = out_dir / "splits.json"
    if info.is_main:
        if split_path.exists():
            splits = load_splits(split_path, patients)
        else:
            splits = make_splits(table.assign(_y=labels), n_folds=config.n_folds,
                                 seed=config.seed, label_column="_y")
            save_splits(splits, split_path)
    else:
        splits = None
    splits = broadcast_object(info, splits)
    if len(splits) != config.n_folds:
        raise InputError(f"{split_path} has {len(splits)} folds but n_folds={config.n_folds}")
    todo = range(len(splits)) if folds is None else [int(f) for f in folds]
    for f in todo:
        if not 0 <= f < len(splits):
            raise InputError(f"fold {f} does not exist (0..{len(splits) - 1})")

    n_pos = float(labels.sum())
    pos_weight = float(np.sqrt((len(labels) - n_pos) / n_pos))
    soft = (teacher_probabilities(config.teacher, patches, config, device=info.device)
            if config.teacher is not None else None)
    with _no_meta_tracking():
        for k in todo:
            fold_dir = out_dir / f"fold_{k}"
            tr, va = fold_indices(table, splits[k])
            done_tsv = fold_dir / "val_predictions.tsv"
            if resume and done_tsv.exists() and (fold_dir / "model.pt").exists():
                log.info("fold %d already finished; skipping", k)
                continue
            log.info("fold %d: %d training, %d validation lesions", k, len(tr), len(va))
            z = _train_fold(k, patches, labels, types, tr, va, config=config,
                            pos_weight=pos_weight, fold_dir=fold_dir, info=info,
                            resume=resume, soft=soft)
            if info.is_main:
                fold_df = _keys(table.iloc[va]).assign(fold=k, label=labels[va].astype(int),
                                                       logit=z)
                with atomic_path(done_tsv) as tmp:
                    fold_df.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
            barrier(info)

    complete = all((out_dir / f"fold_{k}" / "val_predictions.tsv").exists()
                   for k in range(len(splits)))
    if not complete:
        log.info("not every fold is trained yet; calibration waits for the others")
        return None
    if info.is_main:
        _finalise(out_dir, table, labels, config=config, pos_weight=pos_weight,
                  n_folds=len(splits), command=command)
    barrier(info)
    return RimCNN.load(out_dir, device=info.device)


def _keys(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in KEY_COLUMNS if c in table.columns]
    return table[cols].reset_index(drop=True)


def _finalise(out_dir: Path, table, labels, *, config: TrainConfig, pos_weight: float,
              n_folds: int, command: str | None) -> None:
    """Pool the out-of-fold logits, calibrate, choose the threshold, write metrics."""
    oof = pd.concat([pd.read_csv(out_dir / f"fold_{k}" / "val_predictions.tsv", sep="\t",
                                 dtype={"participant_id": str, "session_id": str},
                                 keep_default_na=False, na_values=[""])
                     for k in range(n_folds)], ignore_index=True)
    offset = (calibration.prior_offset(pos_weight) if config.imbalance == "pos_weight"
              else 0.0)
    y = oof["label"].to_numpy(dtype=float)
    try:
        temperature = calibration.fit_temperature(oof["logit"], y, offset=offset)
    except NotEstimableError as exc:
        raise InputError(f"cannot calibrate: {exc}") from None
    train_prev = float(y.mean())
    deploy = config.deploy_prevalence
    shift = calibration.prior_shift(train_prev, deploy) if deploy is not None else 0.0
    weights = calibration.prevalence_weights(y, deploy) if deploy is not None else None
    oof["prob"] = calibration.apply_temperature(oof["logit"], temperature=temperature,
                                                offset=offset, shift=shift)
    threshold = calibration.choose_threshold(oof["prob"], y, rule=config.threshold_rule,
                                             weights=weights)
    oof["call"] = (oof["prob"] >= threshold).astype(int)
    with atomic_path(out_dir / "val_predictions.tsv") as tmp:
        oof.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="n/a")
    write_json(out_dir / "temperature.json",
               {"temperature": temperature, "offset": offset, "prior_shift": shift,
                "threshold": threshold, "threshold_rule": config.threshold_rule,
                "pos_weight": pos_weight, "train_prevalence": train_prev,
                "deploy_prevalence": deploy,
                "fitted_on": "out-of-fold logits (val_predictions.tsv)"})
    metrics = cv_metrics(oof, temperature=temperature, offset=offset, threshold=threshold)
    metrics["best_epochs"] = []
    for k in range(n_folds):
        ck = out_dir / f"fold_{k}" / "log.jsonl"
        hist = [json.loads(line) for line in ck.read_text().splitlines()] if ck.exists() else []
        best = max(hist, key=lambda h: h["val_pr_auc"] or -1) if hist else None
        metrics["best_epochs"].append(best["epoch"] if best else None)
    write_json(out_dir / "metrics.json", metrics)
    from training.model_card import write_model_card

    write_model_card(out_dir, config=config, metrics=metrics, command=command,
                     fingerprint=json.loads((out_dir / "data_fingerprint.json").read_text()))
    pooled = metrics["pooled"]
    log.info("cross-validation: ROC AUC %.3f, PR AUC %.3f (pooled out-of-fold); T=%.3g",
             pooled["roc_auc"], pooled["pr_auc"], temperature)
